# How a model is spread over ranks. Each strategy is a plain function apply_x(model, mesh, cfg, ...) that
# returns the model, taking only its own sub-config. Order inside each: AC -> compile -> DDP/FSDP.
# FSDP2 and DTensor (a second or so to import) load only in a run that uses them: the launcher's parent
# checks strategy configs here, and a DDP worker never needs them.
import contextlib
import os
import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from strategies import fsdp
from strategies.common import checkpointed
from strategies.ddp import apply_ddp
from strategies.single import apply_single

STRATEGIES = {"single": apply_single, "ddp": apply_ddp, "fsdp": fsdp.apply_fsdp, "hsdp": fsdp.apply_fsdp}
SHARDED = ("fsdp", "hsdp")  # built on the meta device, then only local shards are materialised


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: valid options are {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def is_sharded(name: str) -> bool:
    return name in SHARDED


def check_config(cfg, world_size: int) -> None:
    # The strategy sub-config against the world it will run in, before any worker starts.
    get_strategy(cfg.name)
    checkpointed(cfg.activation_checkpointing, cfg.ac_every, 0)  # the mode's name
    if cfg.name == "single" and world_size > 1:
        # Without a wrapper nothing would average the gradients: each rank would train its own model.
        raise ValueError(
            f"strategy=single trains one process, but the world size is {world_size}: "
            "use strategy=ddp or strategy=fsdp, or launcher.nproc_per_node=1"
        )
    if cfg.name == "hsdp" and cfg.shard_size:  # 0, the ranks of one node, divides the world by construction
        hsdp_shape(cfg.shard_size, world_size)


def hsdp_shape(shard_size: int, world_size: int) -> tuple[int, int]:
    # -> (replicate, shard) sizes of the 2-D mesh; shard_size 0 means the ranks of one node.
    shard = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if shard < 1 or world_size % shard:
        raise ValueError(
            f"strategy.shard_size={shard} does not divide the world size {world_size}: "
            f"choose a shard_size that divides {world_size} (or 0 for the ranks of one node)"
        )
    return world_size // shard, shard


def build_mesh(cfg, world_size: int, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    if cfg.name == "fsdp":
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    if cfg.name == "hsdp":
        return init_device_mesh(
            device.type, hsdp_shape(cfg.shard_size, world_size), mesh_dim_names=("replicate", "shard")
        )
    return None  # single and ddp use the default process group


def materialize(model: nn.Module, device: torch.device, seed: int, cfg) -> None:
    fsdp.materialize(model, device, seed, cpu_offload=cfg.cpu_offload)


def grad_sync(model: nn.Module, enabled: bool):
    # Gradient accumulation: reduce across ranks only on the last micro-batch of a step.
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if instance_of(model, "torch.distributed.fsdp", "FSDPModule"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    # max_norm 0 reports the norm without clipping. Under FSDP the grads are DTensor shards and the norm
    # is a DTensor reduced over the mesh.
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if instance_of(norm, "torch.distributed.tensor", "DTensor") else norm


def instance_of(obj, module: str, name: str) -> bool:
    # isinstance against a class of a module that is imported only where it is used (FSDP2, DTensor):
    # until that module is loaded, nothing can be an instance of its class, and nothing need load it.
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(obj, getattr(loaded, name))


def describe(model: nn.Module, cfg, mesh) -> dict:
    # What was actually applied, for summary.json.
    out = {k: v for k, v in cfg.items()}
    if mesh is not None:
        out["mesh"] = dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))
    out["wrapper"] = type(model).__name__
    return out
