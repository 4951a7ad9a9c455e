# What is trained. One registry of named model presets across families; a family is a file.
import dataclasses

import torch.nn as nn

from . import flops, gpt2, hf, llama
from .flops import num_params
from .gpt2 import GPT2, GPT2Args
from .hf import HFArgs, HFCausalLM
from .llama import ModelArgs, Transformer

FAMILIES = {"llama": (ModelArgs, Transformer), "gpt2": (GPT2Args, GPT2), "hf": (HFArgs, HFCausalLM)}

# preset name -> (family, argument dict)
MODEL_PRESETS: dict[str, tuple[str, dict]] = {
    **{name: ("llama", args) for name, args in llama.PRESETS.items()},
    **{name: ("gpt2", args) for name, args in gpt2.PRESETS.items()},
    **{name: ("hf", args) for name, args in hf.PRESETS.items()},
}


def build_model_args(name: str, overrides: dict | None = None) -> ModelArgs | GPT2Args | HFArgs:
    # Overrides set to None are ignored, so a config can list every field and leave most unset.
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_PRESETS)}")
    family, preset = MODEL_PRESETS[name]
    args_cls = FAMILIES[family][0]
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    valid = [f.name for f in dataclasses.fields(args_cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        hint = " (any Hugging Face config field goes under model.hf_config)" if family == "hf" else ""
        raise ValueError(
            f"model {name!r} ({family}) has no field(s) {unknown}{hint}; valid: {', '.join(valid)}"
        )
    return args_cls(**{**preset, **overrides})


def build_model(args: ModelArgs | GPT2Args | HFArgs) -> nn.Module:
    # Allocates on the current default device; build under `with torch.device("meta"):`, then
    # to_empty() and init_weights(seed), to shard a model before its weights exist.
    for args_cls, model_cls in FAMILIES.values():
        if isinstance(args, args_cls):
            return model_cls(args)
    raise TypeError(f"build_model: unsupported args type {type(args).__name__}")


def param_count(args, exclude_embedding: bool = False) -> int:
    if isinstance(args, HFArgs):  # counted on the module its config builds (meta device)
        return hf.param_count(args, exclude_embedding)
    return flops.param_count(args, exclude_embedding)


def flops_per_token(args, seq_len: int) -> float:
    # models.flops.flops_per_token's formula (PaLM appendix B), for HF models with N and the shapes from
    # the model's config: 6 * N_non_embedding + 12 * L * H * d_head * T.
    if isinstance(args, HFArgs):
        n = param_count(args, exclude_embedding=True)
        return 6.0 * n + 12.0 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return flops.flops_per_token(args, seq_len)


__all__ = [
    "FAMILIES",
    "GPT2",
    "GPT2Args",
    "HFArgs",
    "HFCausalLM",
    "MODEL_PRESETS",
    "ModelArgs",
    "Transformer",
    "build_model",
    "build_model_args",
    "flops_per_token",
    "num_params",
    "param_count",
]
