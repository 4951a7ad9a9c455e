# Pieces every strategy applies before wrapping (activation checkpointing, per-block torch.compile) and what the
# loop asks of any wrapped model (the gradient norm). Imported by the methods that wrap a model: it loads torch.
import sys

import torch
from torch import nn

from strategies.base import checkpointed


def blocks(model: nn.Module) -> nn.ModuleList:
    # The repeated transformer blocks, where the model's own plan says (models/plan.py: each family keeps one).
    plan = getattr(model, "parallel_plan", None)
    if plan is None:
        raise ValueError(
            f"{type(model).__name__} has no parallel_plan saying where its transformer blocks are"
        )
    return plan.block_list(model)


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


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    # max_norm 0 reports the norm without clipping. Under FSDP the grads are DTensor shards and the norm
    # is a DTensor reduced over the mesh.
    params = [p for p in model.parameters() if p.grad is not None]
    groups = _by_mesh(params)
    if len(groups) > 1:
        return _clip_groups(groups, max_norm)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return as_tensor(norm)


def _by_mesh(params: list) -> list[list]:
    # Parameters whose gradients live on one device mesh (None: plain tensors), in order of first appearance.
    groups: dict = {}
    for p in params:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    return list(groups.values())


def _clip_groups(groups: list[list], max_norm: float) -> torch.Tensor:
    # Gradients on more than one mesh (TP without sequence parallelism: the norms' weights are plain tensors, or,
    # under FSDP x TP, DTensors on the data-parallel mesh beside the 2-D ones), which torch's foreach norm cannot
    # stack together: each group's norm, reduced over its mesh, then the total and one clip coefficient for all,
    # as clip_grad_norm_ computes them.
    norms = [as_tensor(torch.nn.utils.get_total_norm([p.grad for p in group])) for group in groups]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for group in groups:
            torch._foreach_mul_([p.grad for p in group], coef)
    return norm


def as_tensor(t: torch.Tensor) -> torch.Tensor:
    # A DTensor's full value (tensor parallelism's loss is one, replicated), a plain tensor as it is.
    return t.full_tensor() if instance_of(t, "torch.distributed.tensor", "DTensor") else t


def instance_of(obj, module: str, name: str) -> bool:
    # isinstance against a class of a module that is imported only where it is used (FSDP2, DTensor):
    # until that module is loaded, nothing can be an instance of its class, and nothing need load it.
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(obj, getattr(loaded, name))
