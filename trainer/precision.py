# What each `precision=` option does, behind one object so the loop never branches on names:
#   prepare_model(model)   before any strategy wraps it: bf16-true casts the parameters; fp8 and int8 swap the
#                          Linear layers for torchao's training versions (torchao is imported only then)
#   context()              autocast for the mixed options (under FSDP its MixedPrecisionPolicy does the cast)
#   backward / unscale_ / step   fp16-mixed: loss scaling; a step whose gradients overflowed is skipped, counted
# PRECISIONS is the one table of per-precision facts: the memory planner reads its bytes from the dtypes here
# (trainer/memory/spec.py), and MFU its peak's numeric class (peak_class).
import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from strategies.base import (
    one_of,  # config.one_of itself; trainer.config would bring Hydra to the GPU benchmarks
)

logger = logging.getLogger(__name__)

_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16

# name -> fields of Precision. param_dtype: what the parameters (so the gradients and AdamW's states) are
# held in; compute_dtype: what matmuls run in; linear: torchao's replacement for the Linear layers. No option
# keeps a separate master copy: mixed precision holds fp32 weights (they are the master) and casts per matmul;
# bf16-true trains the bf16 weights themselves.
PRECISIONS: dict[str, dict] = {
    "fp32": dict(param_dtype=_F32, compute_dtype=_F32, autocast=False),
    "tf32": dict(param_dtype=_F32, compute_dtype=_F32, autocast=False, tf32=True),
    "bf16-mixed": dict(param_dtype=_F32, compute_dtype=_BF16, autocast=True),
    "fp16-mixed": dict(param_dtype=_F32, compute_dtype=_F16, autocast=True, loss_scaling=True),
    "bf16-true": dict(param_dtype=_BF16, compute_dtype=_BF16, autocast=False),
    # fp8 and int8 are bf16-mixed whose Linear matmuls run in the low type (torchtitan's recipe): norms,
    # attention and the output head stay in bf16 / fp32.
    "fp8": dict(param_dtype=_F32, compute_dtype=_BF16, autocast=True, linear="float8_tensorwise"),
    "fp8-rowwise": dict(param_dtype=_F32, compute_dtype=_BF16, autocast=True, linear="float8_rowwise"),
    "int8": dict(param_dtype=_F32, compute_dtype=_BF16, autocast=True, linear="int8"),
    # QLoRA: the frozen base in bf16, the Linear weights of its blocks stored in torchao's NF4 (4-bit NormalFloat,
    # blocks of 64 with double-quantised scalers) and dequantized to bf16 per matmul; only with finetune=lora,
    # whose adapters stay fp32. torchao's NF4Tensor rather than bitsandbytes' Params4bit: NF4Tensor is a tensor
    # subclass that implements the ops FSDP2 shards with (split and view along dim 0) and FSDP2's all-gather hooks
    # (fsdp_pre_all_gather / fsdp_post_all_gather), on CPU and CUDA alike, so fully_shard keeps it as 4-bit DTensor
    # shards (tests/test_finetune.py checks them against torchao's whole-weight quantization). Params4bit keeps its
    # scales in a separate quant_state that FSDP2's sharding drops (the local shard becomes a plain tensor), which is
    # why accelerate leaves Params4bit out of fully_shard.
    "nf4": dict(param_dtype=_BF16, compute_dtype=_BF16, autocast=False, quantize="nf4"),
}
# The precisions every weight can train in (precision=nf4 freezes its base: finetune=lora only).
FULL_TRAINING = tuple(name for name, fields in PRECISIONS.items() if not fields.get("quantize"))
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # torchao's defaults (QLoRA's): 64 weights a scale, 256 scales a factor
_CLASS = {_F32: "fp32", _BF16: "bf16", _F16: "fp16"}


def precision_fields(name: str) -> dict:
    one_of("precision", name, PRECISIONS)
    return PRECISIONS[name]


def peak_class(name: str) -> str:
    # The numeric class whose dense peak MFU divides by (trainer/peaks.py's PEAK_TFLOPS columns). fp8 and
    # int8 runs are measured against the bf16 peak, as torchtitan does: attention, norms and the output head
    # run in bf16, and against the fp8 peak their MFU would read half of bf16's at the same speed.
    f = precision_fields(name)
    return "tf32" if f.get("tf32") else _CLASS[f["compute_dtype"]]


def low_precision_class(name: str) -> str | None:
    # fp8 / int8 runs: the class of their converted Linears, whose peak MFU is also reported against.
    linear = precision_fields(name).get("linear")
    return None if linear is None else ("fp8" if linear.startswith("float8") else "int8")


# Leaf names of output heads (native models: output; Hugging Face: lm_head). torchao keeps the head in high
# precision, as torchtitan does: the logits feed the loss directly and are the most sensitive matmul.
HEAD_NAMES = ("output", "lm_head")


class LossScaler:
    # fp16 underflows below 6e-8 and overflows above 65504: the loss is multiplied by a large scale so small
    # gradients survive, and a step whose gradients came out inf/nan is skipped and the scale halved. Under
    # FSDP each rank sees only its shards' gradients, so ShardedGradScaler all-reduces the inf check and every
    # rank skips the same steps.
    def __init__(self, device_type: str, sharded: bool):
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device=device_type)
        else:
            self.scaler = torch.amp.GradScaler(device_type)
        self.skipped_steps = 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # The scale and the count of good steps since it last changed: checkpointed, so a resumed fp16 run
        # goes on at the scale it had reached instead of starting over at 65536 and skipping steps to get back.
        sd = self.scaler.state_dict()
        return {
            "loss_scale": torch.tensor(sd["scale"], dtype=torch.float64),
            "loss_scale_growth_tracker": torch.tensor(sd["_growth_tracker"], dtype=torch.int64),
        }

    def load_state_tensors(self, state: dict) -> None:
        sd = self.scaler.state_dict()
        sd.update(scale=float(state["loss_scale"]), _growth_tracker=int(state["loss_scale_growth_tracker"]))
        self.scaler.load_state_dict(sd)

    def step(self, optimizer) -> bool:
        # GradScaler.update() lowers the scale exactly when the step found inf/nan and was skipped.
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale
        self.skipped_steps += not stepped
        return stepped


@dataclass(frozen=True)
class Precision:
    name: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    autocast: bool  # mixed: fp32 parameters, compute autocast to compute_dtype
    device_type: str = "cpu"
    tf32: bool = False  # CUDA: fp32 matmuls on TF32 tensor cores (10-bit mantissa); nothing on CPU
    loss_scaling: bool = False
    linear: str | None = None  # float8_tensorwise | float8_rowwise | int8
    quantize: str | None = None  # nf4: the blocks' Linear weights stored in 4 bits (frozen)
    scaler: LossScaler | None = None

    @property
    def emulated(self) -> bool:
        # torchao has no fp8 GEMM off CUDA: it runs the same casts and scales, then a high-precision matmul.
        return self.linear is not None and self.linear.startswith("float8") and self.device_type != "cuda"

    @property
    def skipped_steps(self) -> int | None:
        return self.scaler.skipped_steps if self.scaler is not None else None

    def context(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)

    def with_scaler(self, sharded: bool) -> "Precision":
        # A fresh scaler of the kind the strategy needs; options without loss scaling are returned as they are.
        if not self.loss_scaling:
            return self
        return dataclasses.replace(self, scaler=LossScaler(self.device_type, sharded))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # Before any strategy wraps the model (and on the meta device, for the sharded strategies).
        if (
            self.device_type == "cuda"
        ):  # process-wide: set by every option, so one run never inherits another's
            torch.set_float32_matmul_precision("high" if self.tf32 else "highest")
        if self.param_dtype != torch.float32:
            # Parameters only: buffers (RoPE tables) keep their fp32, as the models compute them.
            with torch.no_grad():
                for p in model.parameters():
                    p.data = p.data.to(self.param_dtype)
        if self.quantize == "nf4":
            quantize_nf4(model)
        if self.linear is not None:
            require_convertible(model, self.name)
            convert_linears(model, self.linear, emulate=self.emulated)
            if self.emulated:
                logger.warning(
                    "precision=%s on %s: torchao emulates the fp8 matmuls in high precision; the loss is "
                    "fp8's, the speed and memory are not",
                    self.name,
                    self.device_type,
                )
        return model

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scaler.scale(loss)).backward()

    def unscale_(self, optimizer) -> None:
        # Before clipping: the norm and the clip threshold are about the true gradients, not scaled ones.
        if self.scaler is not None:
            self.scaler.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        # False: skipped because a gradient was inf/nan (fp16-mixed only; others always step).
        if self.scaler is None:
            optimizer.step()
            return True
        return self.scaler.step(optimizer)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # What a checkpoint keeps of the precision: the loss scaler's state under fp16-mixed, else nothing.
        return self.scaler.state_tensors() if self.scaler is not None else {}

    def load_state_tensors(self, state: dict) -> None:
        if self.scaler is not None and "loss_scale" in state:
            self.scaler.load_state_tensors(state)

    def describe(self) -> dict:
        # What was applied, for summary.json.
        return {
            "name": self.name,
            "param_dtype": str(self.param_dtype).removeprefix("torch."),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "autocast": self.autocast,
            "tf32": self.tf32 and self.device_type == "cuda",
            "linear": self.linear,
            "quantize": self.quantize,
            "emulated": self.emulated,
            "loss_scaler": type(self.scaler.scaler).__name__ if self.scaler is not None else None,
            "loss_scale": self.scaler.scaler.get_scale() if self.scaler is not None else None,
        }


def build_precision(name: str, device: torch.device) -> Precision:
    # Touches no device: whether a GPU can run it is checks.check_device_capabilities' question.
    return Precision(name, device_type=device.type, **precision_fields(name)).with_scaler(sharded=False)


def nf4_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    # What precision=nf4 stores in 4 bits: the Linear layers of the transformer blocks (embeddings, norms and the
    # output head stay bf16, as in QLoRA).
    from strategies.common import blocks

    inside = {id(m) for m in blocks(model).modules()}
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


def nf4_refusal(model: nn.Module, shards: int = 1) -> str | None:
    # -> why NF4 cannot store some Linear weight, else None. torchao quantizes in blocks of 64 weights and
    # double-quantizes their scales in blocks of 256, so a weight (and under FSDP each rank's slice of its rows)
    # must hold a multiple of 64 x 256 elements.
    unit = NF4_BLOCK * NF4_SCALER_BLOCK
    for name, m in nf4_linears(model):
        rows, cols = m.weight.shape
        if rows % shards or (rows // shards) * cols % unit:
            where = f" split over {shards} FSDP ranks" if shards > 1 else ""
            return (
                f"{name} ({rows} x {cols}){where} is not a multiple of NF4's {unit} weights (blocks of "
                f"{NF4_BLOCK}, scales in blocks of {NF4_SCALER_BLOCK})"
            )
    return None


def quantize_nf4(model: nn.Module) -> None:
    # In place, on the meta device too (FSDP materializes the real NF4 shards: strategies/fsdp.py).
    from torchao.quantization import to_nf4

    for _, m in nf4_linears(model):
        m.weight = nn.Parameter(to_nf4(m.weight.data, NF4_BLOCK, NF4_SCALER_BLOCK), requires_grad=False)


def is_convertible(module: nn.Module, fqn: str) -> bool:
    # torchao's (and torchtitan's) filter: not the output head, and both dims multiples of 16, which the
    # fp8 GEMM (torch._scaled_mm) requires. Embeddings are lookups, not Linears, and are never converted.
    return (
        isinstance(module, nn.Linear)
        and fqn.rsplit(".", 1)[-1] not in HEAD_NAMES
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def count_convertible(model: nn.Module) -> int:
    return sum(is_convertible(m, fqn) for fqn, m in model.named_modules())


def require_convertible(model: nn.Module, name: str) -> None:
    if count_convertible(model) == 0:
        raise ValueError(
            f"precision={name} converts nn.Linear layers, and {type(model).__name__} has none that qualify "
            "(not the output head, both dims multiples of 16; Hugging Face GPT-2 uses Conv1D, not Linear): "
            "use precision=bf16-mixed, or a model built of nn.Linear (the native ones, Hugging Face Llama)"
        )


def convert_linears(model: nn.Module, kind: str, emulate: bool) -> None:
    if kind.startswith("float8"):
        from torchao.float8 import Float8LinearConfig, Float8LinearRecipeName, convert_to_float8_training

        recipe = {"float8_tensorwise": Float8LinearRecipeName.TENSORWISE}.get(
            kind, Float8LinearRecipeName.ROWWISE
        )
        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
        convert_to_float8_training(model, config=config, module_filter_fn=is_convertible)
    elif kind == "int8":
        import torchao
        from torchao.prototype.quantized_training import int8_mixed_precision_training

        # Forward and both backward matmuls in int8 with dynamic row-wise scales; weights stay in the param
        # dtype. module_swap: in torchao 0.18 the default tensor-subclass form registers its F.linear override
        # in the aten table, where F.linear never looks, so it silently computes in high precision.
        config = int8_mixed_precision_training(module_swap=True)
        torchao.quantize_(model, config, filter_fn=is_convertible)
    else:
        raise ValueError(
            f"unknown Linear conversion {kind!r}: valid are float8_tensorwise, float8_rowwise, int8"
        )
