# Cross-field checks of a composed config, run once in the process that composed it, before any worker
# starts (launcher/main.py; under torchrun, once on each rank). Each failure is one ValueError whose message
# names the keys and the fix. Each section's own rules live with what it configures (the schema's ranges in
# trainer/config.py, strategies.check_config, optim.check_config, checkpoint.preflight, the model's shapes in
# models.build_model_args); here they are called in order, and the rules that span sections are kept.
# Workers run only check_device_capabilities: what needs their own GPU.
import torch
from omegaconf import DictConfig, OmegaConf

import strategies
from models import MODEL_PRESETS, build_model, build_model_args, parallel_plan
from models.attention import check_attention_supported
from trainer import checkpoint, optim
from trainer.config import NOT_MODEL_ARGS, batch_layout, check_schema, one_of
from trainer.data import data_facts, read_meta
from trainer.dist import device_type as resolve_device
from trainer.evaluate import PROMPT_TOKENS, check_held_out
from trainer.finetune import FINETUNES, targets
from trainer.loggers import BACKENDS
from trainer.precision import Precision, build_precision, nf4_refusal, require_convertible
from trainer.pretrained import check_source

NONFINITE_POLICIES = ("error", "skip")  # trainer.on_nonfinite


def model_args(cfg: DictConfig):
    # The model's arguments as the config gives them, with the attention option's kernel and K/V heads.
    vocab_from_data(cfg)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for key in NOT_MODEL_ARGS:  # how it trains (its learning rate, its starting weights), not what it is
        model.pop(key, None)
    return build_model_args(model.pop("name"), model, OmegaConf.to_container(cfg.attention, resolve=True))


def vocab_from_data(cfg: DictConfig) -> None:
    # A prepared token directory knows its vocabulary (meta.json): a native model trained on it takes that size
    # where model.vocab_size is unset, written into the config, so that the workers and the checkpoint's record
    # of the model have it (a size the user set is kept, and refused in validate() if too small). A pretrained
    # Hugging Face model keeps its own: its embedding is its checkpoint's.
    family = MODEL_PRESETS.get(cfg.model.name, ("",))[0]
    if cfg.data.name != "tokens" or cfg.model.vocab_size is not None or family == "hf":
        return
    cfg.model.vocab_size = read_meta(cfg.data.path)["vocab_size"]  # sizes only: data_facts reads it through


def check_capability(precision: Precision, capability) -> None:
    # capability: the CUDA device's (major, minor), None off CUDA or where unknown. Every strategy has a
    # loss-scaling path (GradScaler; ShardedGradScaler under FSDP), so fp16-mixed needs no check here.
    if precision.linear and precision.linear.startswith("float8") and capability is not None:
        if tuple(capability) < (8, 9):
            major, minor = capability
            raise ValueError(
                f"precision={precision.name} needs fp8 tensor cores, on NVIDIA GPUs of compute capability 8.9 or "
                f"newer (L4, L40S, H100, H200); this GPU is {major}.{minor}: use precision=bf16-mixed or "
                "precision=int8"
            )


def validate(cfg: DictConfig, world_size: int, available: str, capability=None, per_node: int | None = None):
    # -> the model's arguments. available: what the machine offers ("cuda" or "cpu"); trainer.device=cpu narrows
    # it, so a CPU run on a GPU host is checked as the CPU run it is. per_node: ranks per node (None: all).
    check_schema(cfg)
    device_type = resolve_device(cfg.trainer.device, available)
    if device_type != "cuda":
        capability = None
    args = model_args(cfg)
    t = cfg.trainer
    if t.seq_len > args.max_seq_len:
        raise ValueError(
            f"trainer.seq_len ({t.seq_len}) is longer than the model's maximum (model.max_seq_len = "
            f"{args.max_seq_len}): lower trainer.seq_len or raise model.max_seq_len"
        )
    one_of("trainer.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
    dims = run_dims(cfg.strategy, world_size, per_node)
    micro, accum = batch_layout(t, dims)
    plan = parallel_plan(args) if strategies.get_strategy(cfg.strategy.name).needs_plan else None
    strategies.check_config(cfg.strategy, dims, micro, accum, args, plan)
    optim.check_config(cfg.optim)
    one_of("logger.name", cfg.logger.name, BACKENDS)
    precision = build_precision(cfg.precision.name, torch.device(device_type))
    check_capability(precision, capability)
    if strategies.get_strategy(cfg.strategy.name).pipelined and precision.loss_scaling:
        raise ValueError(
            f"precision={precision.name} with strategy={cfg.strategy.name}: the pipeline's schedule runs the "
            "backward itself, past the loss scaler: use precision=bf16-mixed (no loss scaling) with pipelines"
        )
    if dims.tp > 1 and precision.linear == "int8":
        raise ValueError(
            f"precision=int8 with strategy={cfg.strategy.name}: torch 2.13's DTensor has no sharding rule for "
            "torchao's int8 matmul (aten._int_mm): use precision=bf16-mixed with tensor parallelism"
        )
    fp8 = precision.linear is not None and precision.linear.startswith("float8")
    if fp8 and device_type == "cuda" and (micro * t.seq_len) % 16:
        # torch._scaled_mm needs every inner dimension divisible by 16; the weight gradient's is the
        # micro-batch's token count. The emulated CPU path has no such limit, so it never showed.
        raise ValueError(
            f"precision={precision.name} on CUDA needs trainer.micro_batch_size x trainer.seq_len divisible by "
            f"16 (fp8 matmuls), got {micro} x {t.seq_len} = {micro * t.seq_len}: choose a trainer.seq_len that "
            "is a multiple of 16"
        )
    if precision.linear is not None:
        with torch.device("meta"):  # shapes only
            require_convertible(build_model(args), precision.name)
    check_finetune(cfg, args, precision, dims)
    check_attention_supported(args.attention, device_type, precision.compute_dtype, capability)
    need, held_out = data_facts(cfg.data, t.seq_len)
    if need is not None and need > args.vocab_size:
        where = " (its meta.json)" if cfg.data.name == "tokens" else ""
        raise ValueError(
            f"data needs a vocabulary of {need} tokens{where} but model.vocab_size is {args.vocab_size}: "
            f"set model.vocab_size={need} or pick a model with a larger vocabulary"
        )
    if cfg.eval.every_n_steps or cfg.eval.at_end:
        check_held_out(held_out, t.seq_len, cfg.eval.batches, t.global_batch_size, cfg.eval.every_n_steps)
    check_samples(cfg, held_out, args)
    checkpoint.preflight(cfg, args)
    if cfg.metrics.memory_breakdown and cfg.strategy.compile:
        raise ValueError(
            "metrics.memory_breakdown=true cannot measure a torch.compile'd model (PyTorch's MemTracker does not "
            "run under compile): set strategy.compile=false for the measured run"
        )
    return args


def check_finetune(cfg: DictConfig, args, precision: Precision, dims) -> None:
    # finetune=lora and precision=nf4 (QLoRA), and model.init_from, against the model and the layout.
    f, strategy = cfg.finetune, strategies.get_strategy(cfg.strategy.name)
    one_of("finetune", f.name, FINETUNES)
    if precision.quantize and f.name != "lora":
        raise ValueError(
            f"precision={precision.name} freezes the base in 4 bits, and with finetune={f.name} nothing would train: "
            "add finetune=lora (QLoRA), or use precision=bf16-true"
        )
    if cfg.model.get("init_from"):
        check_source(cfg.model.init_from, args)
    if f.name == "full":
        return
    # Not composed here. Tensor layouts: the parallel plans name the block Linears (attention.wq, ...) that peft
    # replaces with its LoraLayer, and ColwiseParallel / RowwiseParallel shard an nn.Linear's weight only; each
    # adapter's A and B would need placements of their own (A split as its base's input, B as its output) and the
    # plan a second set of names. Pipeline layouts: the stages are views onto the model's modules and save their
    # state by single-process names, which the adapters' checkpoint, the base record and export have not been
    # checked against. Both are refused rather than run untested.
    if strategy.splits_tensors or strategy.pipelined:
        raise ValueError(
            f"finetune={f.name} with strategy={cfg.strategy.name}: adapters are trained under single, ddp and the "
            "FSDP strategies (fsdp, fsdp_grad_op, hsdp), not split over tensor or pipeline ranks: use strategy=fsdp"
        )
    if precision.linear is not None:
        raise ValueError(
            f"finetune={f.name} with precision={precision.name}: its Linear swap and peft's adapters do not "
            "compose here: use precision=bf16-true, bf16-mixed, fp32, or nf4 (QLoRA)"
        )
    with torch.device("meta"):  # shapes only
        model = build_model(args)
    targets(model, f)  # names that match no layer: one line
    if precision.quantize and (why := nf4_refusal(model, dims.dp_shard if strategy.shards_state else 1)):
        raise ValueError(
            f"precision={precision.name} cannot store {why}: use precision=bf16-true (plain LoRA)"
        )


def check_samples(cfg: DictConfig, held_out: int | None, args) -> None:
    # eval.samples: greedy continuations of held-out prompts at each validation (trainer/evaluate.samples).
    e = cfg.eval
    if not e.samples:
        return
    if strategies.get_strategy(cfg.strategy.name).pipelined:
        raise ValueError(
            f"eval.samples={e.samples} with strategy={cfg.strategy.name}: a pipeline runs its stages through its "
            "schedule, never the whole model in one forward, which sampling needs: set eval.samples=0"
        )
    if held_out is not None and e.samples > held_out:
        raise ValueError(
            f"eval.samples={e.samples} needs as many held-out windows, but the data holds {held_out}: lower eval.samples"
        )
    if PROMPT_TOKENS >= min(cfg.trainer.seq_len, args.max_seq_len):
        raise ValueError(
            f"eval.samples continue the first {PROMPT_TOKENS} tokens of a held-out window, which trainer.seq_len="
            f"{cfg.trainer.seq_len} does not exceed: raise trainer.seq_len, or set eval.samples=0"
        )


def run_dims(strategy_cfg, world_size: int, per_node: int | None = None, rank: int = 0):
    # The run's ParallelDims, as its strategy lays out a world of world_size ranks.
    return strategies.get_strategy(strategy_cfg.name).dims(strategy_cfg, world_size, per_node, rank)


def capability(device: torch.device) -> tuple[int, int] | None:
    # Asked only by a process that owns the GPU: it creates a CUDA context.
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def check_device_capabilities(cfg: DictConfig, args, device: torch.device) -> None:
    # In each worker, before it trains, on its own device: what only a process that owns the GPU can ask (the
    # parent that validated never touches CUDA). Nothing to ask off CUDA: validate() covered the CPU.
    if device.type != "cuda":
        return
    precision = build_precision(cfg.precision.name, device)
    if precision.compute_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision={precision.name} needs a GPU with bfloat16 support: use precision=fp32")
    cap = capability(device)
    check_capability(precision, cap)
    check_attention_supported(args.attention, "cuda", precision.compute_dtype, cap)
