# FSDP2: fully_shard each transformer block, then the root. Parameters are DTensors sharded on dim 0 over the
# mesh's "shard" dimension (and replicated over "replicate" under HSDP, strategies/hsdp.py). Built on the meta
# device; only each rank's shards get storage.
from __future__ import annotations

from dataclasses import dataclass

from strategies.base import Strategy, StrategyConfig
from strategies.parallel_dims import ParallelDims

# Wrapper prefixes that AC and compile add to parameter names; initialisation uses the model's own names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class FSDPConfig(StrategyConfig):
    name: str = "fsdp"
    reshard_after_forward: bool = True  # true: full shard (ZeRO-3); false: shard grad/optimizer (ZeRO-2)
    cpu_offload: bool = False  # parameters, gradients and optimizer state live on the CPU


class FSDP(Strategy):
    name = "fsdp"
    schema = FSDPConfig
    on_meta = True
    shards_state = True  # over dp_shard: every rank of the world, here
    casts_params = True  # MixedPrecisionPolicy gathers parameters in the compute dtype
    dp_dims = ("shard",)  # the mesh dimensions FSDP shards over

    def dims(self, cfg, world_size, per_node=None, rank=0) -> ParallelDims:
        return ParallelDims(dp_shard=world_size, rank=rank, mesh_dims=("shard",))

    def plan_options(self, cfg) -> dict:
        return {
            "reshard_after_forward": cfg.get("reshard_after_forward", True),
            "cpu_offload": cfg.get("cpu_offload", False),
        }

    def plan_layout(self, spec) -> str:
        layout = "full shard" if spec.reshard_after_forward else "shard-grad-op"
        offload = ", CPU offload" if spec.cpu_offload else ""
        return f"{layout} over {spec.shard} of {spec.world_size} ranks{offload}"

    def tune_presets(self, world_size, nnodes) -> list[str]:
        return ["fsdp", "fsdp_grad_op"] if world_size > 1 else []

    def apply(self, model, dims, cfg, *, device, precision):
        # FSDP2 is imported here, by the runs that shard: it costs the others a second of start-up.
        import torch
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from strategies.common import apply_ac, apply_compile, blocks

        self.before_wrap(model, dims, cfg, device)
        mesh = dims.submesh(device.type, self.dp_dims)
        apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
        if cfg.compile:
            apply_compile(model)
        # Mixed precision: parameters gathered in the compute dtype, gradients reduced in fp32; the sharded
        # master parameters stay in precision.param_dtype.
        mp = MixedPrecisionPolicy(
            param_dtype=precision.compute_dtype if precision.autocast else None, reduce_dtype=torch.float32
        )
        # Pinned host memory needs an accelerator: on a CPU-only run the "offload" is a plain CPU copy.
        offload = (
            CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
        )
        for block in blocks(model):
            fully_shard(
                block,
                mesh=mesh,
                reshard_after_forward=cfg.reshard_after_forward,
                mp_policy=mp,
                offload_policy=offload,
            )
        # The root's parameters (embeddings, final norm, head) are used last in forward and first in backward:
        # resharding them after forward would only gather them again at once.
        fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
        return model

    def materialize(self, model, device, seed, cfg) -> None:
        materialize(model, device, seed, cpu_offload=cfg.cpu_offload)

    def grad_sync(self, model, enabled: bool):
        import contextlib

        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()


def materialize(model, device, seed: int, cpu_offload: bool) -> None:
    # Meta -> real storage for the local shards only, then each shard filled with its slice of the same
    # full tensor a single-process run initialises, so every strategy starts from identical weights. The
    # full tensor is filled on the compute device even under CPU offload: a CUDA generator draws other
    # numbers than the CPU's, and every other strategy of a GPU run fills on the GPU.
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            local = p.to_local() if isinstance(p, DTensor) else p
            full = torch.empty(p.shape, dtype=p.dtype, device=device)
            model.fill_param_(name, full, seed)
            if isinstance(p, DTensor):
                # src_data_rank=None: every rank holds the same full tensor, so each keeps its slice locally.
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            local.copy_(full)  # to the CPU shard under offload
    model.reset_buffers(device)  # RoPE tables live where compute runs, even when parameters are offloaded
