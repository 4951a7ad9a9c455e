# Hybrid sharding: FSDP2 over a 2-D mesh, the model state sharded within groups of shard_size ranks (one node
# by default) and replicated across the groups; gradients are reduce-scattered within a group, then
# all-reduced across the groups.
from __future__ import annotations

from dataclasses import dataclass

from strategies.base import option, ranged
from strategies.fsdp import FSDP, FSDPConfig
from strategies.parallel_dims import ParallelDims


@dataclass
class HSDPConfig(FSDPConfig):
    name: str = "hsdp"
    shard_size: int = ranged(
        0, ">= 0"
    )  # ranks per shard group (the mesh's inner dim); 0 = the ranks of one node


class HSDP(FSDP):
    name = "hsdp"
    schema = HSDPConfig
    dp_dims = ("replicate", "shard")

    def dims(self, cfg, world_size, per_node=None, rank=0) -> ParallelDims:
        shard = option(cfg, "shard_size", 0) or per_node or world_size
        if shard < 1 or world_size % shard:
            raise ValueError(
                f"strategy.shard_size={shard} does not divide the world size {world_size}: "
                f"choose a shard_size that divides {world_size} (or 0 for the ranks of one node)"
            )
        return ParallelDims(
            dp_replicate=world_size // shard, dp_shard=shard, rank=rank, mesh_dims=("replicate", "shard")
        )

    def tune_presets(self, world_size, nnodes) -> list[str]:
        return ["hsdp"] if nnodes > 1 else []
