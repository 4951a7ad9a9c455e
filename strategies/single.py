# One process, one device: the model as it is (with activation checkpointing and per-block compile if asked).
from __future__ import annotations

from strategies.base import Strategy
from strategies.parallel_dims import ParallelDims


class Single(Strategy):
    name = "single"
    needs_group = False

    def dims(self, cfg, world_size, per_node=None, rank=0) -> ParallelDims:
        # Every rank a replica of its own (check refuses more than one: nothing would average their gradients).
        return ParallelDims(dp_replicate=world_size, rank=rank)

    def check(self, cfg, dims, micro, accum, args=None, plan=None) -> None:
        if dims.world_size > 1:
            raise ValueError(
                f"strategy=single trains one process, but the world size is {dims.world_size}: "
                "use strategy=ddp or strategy=fsdp, or launcher.nproc_per_node=1"
            )

    def plan_layout(self, spec) -> str:
        return "1 rank"

    def tune_presets(self, world_size, nnodes) -> list[str]:
        return ["single"] if world_size == 1 else []

    def apply(self, model, dims, cfg, *, device, precision):
        from strategies.common import apply_ac, apply_compile

        apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
        if cfg.compile:
            apply_compile(model)
        return model
