# What is trained. One registry of named model presets across families; a family is a file.
import dataclasses

import torch.nn as nn

from . import gpt2, llama
from .flops import flops_per_token, num_params, param_count
from .gpt2 import GPT2, GPT2Args
from .llama import ModelArgs, Transformer

FAMILIES = {"llama": (ModelArgs, Transformer), "gpt2": (GPT2Args, GPT2)}

# preset name -> (family, argument dict)
MODEL_PRESETS: dict[str, tuple[str, dict]] = {
    **{name: ("llama", args) for name, args in llama.PRESETS.items()},
    **{name: ("gpt2", args) for name, args in gpt2.PRESETS.items()},
}


def build_model_args(name: str, overrides: dict | None = None) -> ModelArgs | GPT2Args:
    # Overrides set to None are ignored, so a config can list every field and leave most unset.
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_PRESETS)}")
    family, preset = MODEL_PRESETS[name]
    args_cls = FAMILIES[family][0]
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    valid = [f.name for f in dataclasses.fields(args_cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"model {name!r} ({family}) has no field(s) {unknown}; valid: {', '.join(valid)}")
    return args_cls(**{**preset, **overrides})


def build_model(args: ModelArgs | GPT2Args) -> nn.Module:
    # Allocates on the current default device; build under `with torch.device("meta"):`, then
    # to_empty() and init_weights(seed), to shard a model before its weights exist.
    for args_cls, model_cls in FAMILIES.values():
        if isinstance(args, args_cls):
            return model_cls(args)
    raise TypeError(f"build_model: unsupported args type {type(args).__name__}")


__all__ = [
    "FAMILIES",
    "GPT2",
    "GPT2Args",
    "MODEL_PRESETS",
    "ModelArgs",
    "Transformer",
    "build_model",
    "build_model_args",
    "flops_per_token",
    "num_params",
    "param_count",
]
