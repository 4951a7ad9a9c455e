# A run's layout, in the spirit of torchtitan's ParallelDims: how many ways its ranks replicate and shard the
# data-parallel work, and the tensor- and pipeline-parallel degrees (1 until those layouts exist). The world
# size is their product. Ranks are laid out row-major over (pp, replicate, shard, tp), outer to inner, which
# is also the order of the device mesh's dimensions: tensor-parallel peers are neighbours (one node), pipeline
# stages the farthest apart.
#
# Two sizes, two meanings. The data-parallel rank and size decide which rows of the global batch a rank reads,
# the eval rows, and how many tokens a step has; the world rank and size decide processes and collectives.
# Nothing else infers the layout from the world size. Standard library at import: the parent that validates
# a config before any worker starts asks it too; DeviceMesh (and DTensor) load only where a mesh is built.
import dataclasses
import math
from dataclasses import dataclass, field

MESH_ORDER = ("pp", "replicate", "shard", "tp")  # outer to inner


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1  # full copies of the model state (DDP; HSDP's replica groups)
    dp_shard: int = 1  # ranks that split one copy of the model state (FSDP; HSDP's shard groups)
    tp: int = 1
    pp: int = 1
    rank: int = 0  # this process's world rank (0 where no process exists yet: planning, validation)
    # The named dimensions of the strategy's device mesh, in MESH_ORDER; () for one that needs no mesh (DDP
    # all-reduces over the default process group). A dimension of size 1 is kept when named: HSDP over 2
    # replicas of 1 shard is still a 2-D mesh.
    mesh_dims: tuple[str, ...] = ()
    ranks_per_node: int | None = (
        None  # where the ranks sit (None: all on one node): TP should stay within one
    )
    # A pipeline's micro-batches per step where its config asks for a count (strategy.pp_microbatches), 0 where
    # not: with trainer.micro_batch_size unset it sets the micro-batch (trainer/config.py's batch_layout)
    pp_microbatches: int = 0
    _meshes: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for name in ("dp_replicate", "dp_shard", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel degree {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        if [d for d in MESH_ORDER if d in self.mesh_dims] != list(self.mesh_dims):
            raise ValueError(f"mesh dimensions {self.mesh_dims} must be a subsequence of {MESH_ORDER}")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def degree(self, dim: str) -> int:
        return {"pp": self.pp, "replicate": self.dp_replicate, "shard": self.dp_shard, "tp": self.tp}[dim]

    def coords(self, rank: int | None = None) -> dict[str, int]:
        # -> a rank's coordinate along each dimension (row-major over MESH_ORDER, as init_device_mesh lays it out)
        rest, out = self.rank if rank is None else rank, {}
        for dim in reversed(MESH_ORDER):
            rest, out[dim] = divmod(rest, self.degree(dim))
        return {dim: out[dim] for dim in MESH_ORDER}

    @property
    def dp_rank(self) -> int:
        c = self.coords()
        return c["replicate"] * self.dp_shard + c["shard"]

    def with_rank(self, rank: int) -> "ParallelDims":
        return dataclasses.replace(self, rank=rank, _meshes={})

    def describe(self) -> dict[str, int]:
        # The mesh as summary.json reports it: its named dimensions and their sizes.
        return {dim: self.degree(dim) for dim in self.mesh_dims}

    def submesh(self, device_type: str, names: tuple[str, ...]):
        # The mesh's dimensions `names` (all of them: the mesh itself).
        mesh = self.mesh(device_type)
        return mesh if tuple(names) == self.mesh_dims else mesh[tuple(names) if len(names) > 1 else names[0]]

    def mesh(self, device_type: str):
        # The named device mesh, built once per device type (every rank must build it: a collective); None
        # for a layout that needs none.
        if not self.mesh_dims:
            return None
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import init_device_mesh

            shape = tuple(self.degree(d) for d in self.mesh_dims)
            if self.world_size != math.prod(shape):
                raise ValueError(
                    f"the mesh {self.describe()} leaves out ranks of a world of {self.world_size}"
                )
            self._meshes[device_type] = init_device_mesh(device_type, shape, mesh_dim_names=self.mesh_dims)
        return self._meshes[device_type]
