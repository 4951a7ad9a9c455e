import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from strategies.common import apply_ac, apply_compile


def apply_ddp(model: nn.Module, mesh, cfg, *, device: torch.device, **_) -> nn.Module:
    # A full replica per rank; DDP broadcasts rank 0's weights at construction, then all-reduces
    # gradients in buckets of bucket_cap_mb while backward runs.
    apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=cfg.bucket_cap_mb,
        static_graph=cfg.static_graph,
    )
