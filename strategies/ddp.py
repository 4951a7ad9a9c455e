# DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets while backward runs.
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from strategies.base import Strategy, StrategyConfig, ranged
from strategies.parallel_dims import ParallelDims


@dataclass
class DDPConfig(StrategyConfig):
    name: str = "ddp"
    bucket_cap_mb: int = ranged(25, ">= 1")  # DDP's gradient bucket size, MB
    static_graph: bool = False


class DDP(Strategy):
    name = "ddp"
    schema = DDPConfig
    grad_buckets = True  # the buckets hold a second copy of the gradients, allocated up front

    def dims(self, cfg, world_size, per_node=None, rank=0) -> ParallelDims:
        return ParallelDims(dp_replicate=world_size, rank=rank)  # the default process group: no mesh

    def check(self, cfg, dims, micro, accum, args=None, plan=None) -> None:
        if cfg.get("static_graph") and accum > 1:
            # torch 2.13's DDP reducer fails an INTERNAL ASSERT on the first no_sync backward under a static
            # graph, and past that stops all-reducing (pytorch/pytorch#143580, the open fix #187732).
            raise ValueError(
                f"strategy.static_graph=true cannot be combined with gradient accumulation ({accum} micro-batches "
                f"of {micro} per rank): DDP's static graph breaks under no_sync in this torch. Set "
                f"strategy.static_graph=false, or trainer.micro_batch_size={micro * accum} for one micro-batch a step"
            )

    def plan_layout(self, spec) -> str:
        return f"replicated on {spec.world_size} rank(s)"

    def tune_presets(self, world_size, nnodes) -> list[str]:
        return ["ddp"] if world_size > 1 else []

    def apply(self, model, dims, cfg, *, device, precision):
        from torch.nn.parallel import DistributedDataParallel

        from strategies.common import apply_ac, apply_compile

        # DDP broadcasts rank 0's weights at construction.
        apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
        if cfg.compile:
            apply_compile(model)
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.bucket_cap_mb,
            static_graph=cfg.static_graph,
        )

    def grad_sync(self, model, enabled: bool):
        return contextlib.nullcontext() if enabled else model.no_sync()
