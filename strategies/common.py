# Pieces every strategy applies before wrapping: activation checkpointing and per-block torch.compile.
import torch
from torch import nn

AC_MODES = ("none", "full", "selective")


def checkpointed(mode: str, every: int, n_layers: int) -> list[bool]:
    # Which blocks recompute their activations in backward (keeping only their input): full, every one;
    # selective, every `every`-th, trading some memory back for speed. The memory planner reads the same.
    if mode not in AC_MODES:
        raise ValueError(
            f"unknown strategy.activation_checkpointing {mode!r}: valid options are {', '.join(AC_MODES)}"
        )
    return [mode == "full" or (mode == "selective" and i % every == 0) for i in range(n_layers)]


def blocks(model: nn.Module) -> nn.ModuleList:
    # The repeated transformer blocks: native models keep them in `layers`; HF decoders under .model.
    for owner in (model, getattr(model, "model", None)):
        if owner is not None and isinstance(getattr(owner, "layers", None), nn.ModuleList):
            return owner.layers
    # Hugging Face models name their decoder-layer class in _no_split_modules (what accelerate's and FSDP's
    # auto-wrap policies use): the blocks are the ModuleList made of it (LlamaDecoderLayer, GPT2Block, ...).
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(_is_one_of(b, names) for b in m):
            return m
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__} (no .layers ModuleList, and no "
        "ModuleList of the classes its _no_split_modules names)"
    )


def _is_one_of(block: nn.Module, class_names: set[str]) -> bool:
    # Through the wrappers compile and AC put around a block, and FSDP2's subclass of its class.
    for attr in ("_orig_mod", "_checkpoint_wrapped_module"):
        block = getattr(block, attr, block)
    return any(cls.__name__ in class_names for cls in type(block).__mro__)


def apply_ac(model: nn.Module, mode: str, every: int) -> None:
    if mode == "none":
        return
    if hasattr(model, "enable_activation_checkpointing"):  # HF models: their own checkpointing hook
        checkpointed(mode, every, 0)  # the mode's check
        model.enable_activation_checkpointing(1 if mode == "full" else every)
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,  # runs that use it
    )

    layers = blocks(model)
    for i, wrap in enumerate(checkpointed(mode, every, len(layers))):
        if wrap:
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    # Per block rather than whole-model: the blocks are identical, so one graph is compiled and reused.
    layers = blocks(model)
    for i, block in enumerate(layers):
        layers[i] = torch.compile(block, fullgraph=True)
