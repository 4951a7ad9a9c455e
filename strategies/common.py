# Pieces every strategy applies before wrapping (activation checkpointing, per-block torch.compile) and what the
# loop asks of any wrapped model (the gradient norm). Imported by the methods that wrap a model: it loads torch.
import torch
from torch import nn

from strategies.base import as_tensor, checkpointed


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

    layers, held = blocks(model), _held(model)
    # by each block's index in the whole model (a pipeline rank holds some of them, keyed by their indices)
    wrap = checkpointed(mode, every, 1 + max(i for i, _ in held)) if held else []
    for i, block in held:
        if wrap[i]:
            layers[_key(layers, i)] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    # Per block rather than whole-model: the blocks are identical, so one graph is compiled and reused.
    layers = blocks(model)
    for i, block in _held(model):
        layers[_key(layers, i)] = torch.compile(block, fullgraph=True)


def _held(model: nn.Module) -> list[tuple[int, nn.Module]]:
    blocks(model)  # the plan's check
    return model.parallel_plan.indexed_blocks(model)


def _key(layers, i: int):
    return str(i) if isinstance(layers, nn.ModuleDict) else i


def clip_grad_norm(model: nn.Module, max_norm: float, group=None) -> torch.Tensor:
    # max_norm 0 reports the norm without clipping. Under FSDP the grads are DTensor shards and the norm
    # is a DTensor reduced over the mesh. group: the ranks holding the other parts of the model (a pipeline's
    # stages), whose gradients enter the one norm.
    params = [p for p in model.parameters() if p.grad is not None]
    groups = _by_mesh(params)
    if len(groups) > 1 or group is not None:
        return _clip_groups(groups, max_norm, group)
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


def _clip_groups(groups: list[list], max_norm: float, group=None) -> torch.Tensor:
    # Gradients on more than one mesh (TP without sequence parallelism: the norms' weights are plain tensors, or,
    # under FSDP x TP, DTensors on the data-parallel mesh beside the 2-D ones), which torch's foreach norm cannot
    # stack together: each group's norm, reduced over its mesh, then the total and one clip coefficient for all,
    # as clip_grad_norm_ computes them.
    # A pipeline's stages: the squares summed over the group's ranks.
    norms = [as_tensor(torch.nn.utils.get_total_norm([p.grad for p in params])) for params in groups]
    norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if group is not None:
        import torch.distributed as dist

        square = norm.double().square()
        dist.all_reduce(square, group=group)
        norm = square.sqrt().float()
    if max_norm > 0:
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for params in groups:
            torch._foreach_mul_([p.grad for p in params], coef)
    return norm
