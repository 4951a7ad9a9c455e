# What is trained. One registry of named model presets across families; a family is a file.
import dataclasses
from collections.abc import Mapping

import torch.nn as nn

from . import flops, gpt2, hf, llama
from .attention import one_of
from .flops import num_params
from .gpt2 import GPT2, GPT2Args
from .hf import HFArgs, HFCausalLM
from .llama import ModelArgs, ParamShapes, Transformer, check_heads
from .plan import ParallelPlan

FAMILIES = {"llama": (ModelArgs, Transformer), "gpt2": (GPT2Args, GPT2), "hf": (HFArgs, HFCausalLM)}
SHAPES = {ModelArgs: llama.param_shapes, GPT2Args: gpt2.param_shapes, HFArgs: hf.param_shapes}
HF_EXPORT = {ModelArgs: llama, GPT2Args: gpt2, HFArgs: hf}  # each family's hf_config and to_hf

# preset name -> (family, argument dict)
MODEL_PRESETS: dict[str, tuple[str, dict]] = {
    **{name: ("llama", args) for name, args in llama.PRESETS.items()},
    **{name: ("gpt2", args) for name, args in gpt2.PRESETS.items()},
    **{name: ("hf", args) for name, args in hf.PRESETS.items()},
}


def build_model_args(
    name: str, overrides: Mapping | None = None, attention: Mapping | None = None
) -> ModelArgs | GPT2Args | HFArgs:
    # A preset, its fields overridden (None = keep the preset's), and the attention option's kernel and K/V
    # head count (attention: impl, n_kv_heads, kv_head_divisor, as conf/attention/*.yaml). Shapes that cannot
    # work fail here with the config keys to change, before any module is built.
    one_of("model.name", name, MODEL_PRESETS)
    family, preset = MODEL_PRESETS[name]
    args_cls = FAMILIES[family][0]
    given = {k: v for k, v in (overrides or {}).items() if k != "name" and v is not None and v != {}}
    valid = [f.name for f in dataclasses.fields(args_cls)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        hint = " (any Hugging Face config field goes under model.hf_config)" if family == "hf" else ""
        raise ValueError(
            f"model {name!r} ({family}) has no field(s) {unknown}{hint}; valid: {', '.join(valid)}"
        )
    if attention is not None:
        given["attention"] = attention["impl"]
    if family == "hf":
        return _hf_args(name, preset, given, attention)
    defaults = {
        f.name: f.default for f in dataclasses.fields(args_cls) if f.default is not dataclasses.MISSING
    }
    fields = {**defaults, **preset, **given}
    dim, n_heads = fields["dim"], fields["n_heads"]
    check_heads(dim, n_heads)  # before the K/V heads, whose checks divide by n_heads
    user_kv = given.get("n_kv_heads")
    n_kv, source = _kv_heads(
        attention, name, n_heads, "n_kv_heads" in fields, fields.get("n_kv_heads"), user_kv
    )
    check_heads(dim, n_heads, n_kv, source, rotary=family == "llama")
    if n_kv is not None:
        given["n_kv_heads"] = n_kv
    return args_cls(**{**preset, **given})


def _kv_heads(attention, name: str, n_heads: int, grouped: bool, own: int | None, user_kv: int | None):
    # -> (K/V head count, which key set it). An explicit attention.n_kv_heads wins over the divisor; neither:
    # the model's own (own). grouped: the family has K/V heads of its own to set.
    n_kv, divisor = (attention or {}).get("n_kv_heads"), (attention or {}).get("kv_head_divisor")
    if n_kv is None and divisor is None:
        return own, "model.n_kv_heads"
    if not grouped:
        raise ValueError(
            f"model={name} has no grouped K/V heads: use attention=standard, flash or sdpa with it"
        )
    if user_kv is not None:  # never silently overrule a value the user set
        raise ValueError(
            f"model.n_kv_heads={user_kv} and the attention option's K/V heads (attention.n_kv_heads="
            f"{n_kv}, attention.kv_head_divisor={divisor}) both set the K/V head count: keep one of them"
        )
    if n_kv is not None:
        return n_kv, "attention.n_kv_heads"
    if n_heads % divisor:
        raise ValueError(
            f"model.n_heads ({n_heads}) is not divisible by attention.kv_head_divisor ({divisor}): "
            f"set attention.n_kv_heads to a divisor of {n_heads}"
        )
    return n_heads // divisor, f"model.n_heads / attention.kv_head_divisor ({divisor})"


def _hf_args(name: str, preset: dict, given: dict, attention) -> HFArgs:
    # transformers builds the config (a local config.json and/or model.hf_config): read its shapes, then
    # the attention option's K/V heads become its num_key_value_heads.
    args = HFArgs(**{**preset, **given})
    user_kv = given.get("n_kv_heads", given.get("hf_config", {}).get("num_key_value_heads"))
    n_kv, source = _kv_heads(attention, name, args.n_heads, args.has_kv_heads, args.n_kv_heads, user_kv)
    check_heads(args.dim, args.n_heads, n_kv, source)
    if n_kv != args.n_kv_heads:
        args = HFArgs(**{**preset, **given, "n_kv_heads": n_kv})
    return args


def build_model(args: ModelArgs | GPT2Args | HFArgs) -> nn.Module:
    # Allocates on the current default device; build under `with torch.device("meta"):`, then
    # to_empty() and init_weights(seed), to shard a model before its weights exist.
    for args_cls, model_cls in FAMILIES.values():
        if isinstance(args, args_cls):
            return model_cls(args)
    raise TypeError(f"build_model: unsupported args type {type(args).__name__}")


def param_shapes(args) -> ParamShapes:
    # Each family's parameters by name, from its arguments (a Hugging Face model's: its module on meta).
    return SHAPES[type(args)](args)


def family(args) -> str | None:
    # "llama" or "gpt2": which native family's structure a model has (a Hugging Face model's: its
    # architecture's, or None where it is neither). Arguments of no family known here are an error, not GPT-2.
    if isinstance(args, HFArgs):
        return args.family
    for name, (args_cls, _) in FAMILIES.items():
        if type(args) is args_cls:
            return name
    raise TypeError(f"no model family has arguments of type {type(args).__name__}: add it to models.FAMILIES")


def parallel_plan(args) -> ParallelPlan:
    # How the model these arguments build can be split (models/plan.py), without building it: a native
    # family's plan is its class's; a Hugging Face model's is read off its module on the meta device.
    if isinstance(args, HFArgs):
        return hf.parallel_plan(args)
    for args_cls, model_cls in FAMILIES.values():
        if type(args) is args_cls:
            return model_cls.parallel_plan
    raise TypeError(f"no model family has arguments of type {type(args).__name__}: add it to models.FAMILIES")


def hf_export(args, state: dict) -> tuple:
    # -> (a transformers config, the state dict under transformers' names): what from_pretrained loads.
    family = HF_EXPORT[type(args)]
    return family.hf_config(args), family.to_hf(state)


def param_count(args, exclude_embedding: bool = False) -> int:
    if isinstance(args, HFArgs):  # counted on the module its config builds (meta device)
        return hf.param_count(args, exclude_embedding)
    return flops.count(param_shapes(args), args.n_layers, exclude_embedding)


def flops_per_token(args, seq_len: int) -> float:
    # models/flops.py's formula (PaLM appendix B), with N and the shapes from the arguments (HF models: from
    # the module their config builds).
    n = param_count(args, exclude_embedding=True)
    return flops.flops_per_token(n, args.n_layers, args.n_heads, args.head_dim, seq_len)


__all__ = [
    "FAMILIES",
    "GPT2",
    "GPT2Args",
    "HFArgs",
    "HFCausalLM",
    "MODEL_PRESETS",
    "ModelArgs",
    "ParamShapes",
    "Transformer",
    "build_model",
    "build_model_args",
    "flops_per_token",
    "hf_export",
    "num_params",
    "param_count",
    "param_shapes",
    "family",
]
