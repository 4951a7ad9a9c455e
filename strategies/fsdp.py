# FSDP2: fully_shard each transformer block, then the root. Parameters are DTensors sharded on dim 0 over the
# mesh's "shard" dimension (and replicated over "replicate" under HSDP, strategies/hsdp.py). Built on the meta
# device; only each rank's shards get storage.
from __future__ import annotations

from dataclasses import dataclass

from strategies.base import Strategy, StrategyConfig, instance_of
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
    quantized = {}
    with torch.no_grad():
        for key, p in model.named_parameters():
            name = key
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            local = p.to_local() if isinstance(p, DTensor) else p
            nf4 = instance_of(local, NF4_MODULE, "NF4Tensor")
            if not nf4 and model.load_pretrained_(name, p):  # pretrained weights: this rank's rows only
                continue
            full = torch.empty(p.shape, dtype=p.dtype, device=device)
            model.fill_param_(name, full, seed)
            if nf4:
                quantized[key] = nf4_shard(full, p, local)
                continue
            if isinstance(p, DTensor):
                # src_data_rank=None: every rank holds the same full tensor, so each keeps its slice locally.
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            local.copy_(full)  # to the CPU shard under offload
    if quantized:  # precision=nf4: the base's 4-bit shards replace their meta placeholders
        model.load_state_dict(quantized, strict=False, assign=True)
    model.reset_buffers(device)  # RoPE tables live where compute runs, even when parameters are offloaded


NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


def nf4_shard(full, param, meta_local):
    # precision=nf4 under FSDP2: the full weight quantized as one process quantizes it (torchao's blocks run along
    # its rows; its double quantization subtracts the mean of all the weight's block scales, so a shard's 4-bit
    # values depend on the whole weight: this is why NF4, pretrained or not, reads each full weight, one at a
    # time, as torchtune's FSDP2 QLoRA does), then this rank's rows, which FSDP2 shards along dim 0 as torch.chunk does (the check before launch
    # made them whole blocks). NF4 has no to_empty: the placeholder on the meta device is replaced, not filled
    # (FSDP2 picks the new tensor up on load_state_dict(assign=True), as torchtune loads NF4).
    import torch
    from torch.distributed.tensor import DTensor
    from torchao.quantization import to_nf4

    nf4 = to_nf4(full, meta_local.block_size, meta_local.scaler_block_size)
    mesh, placements = param.device_mesh, param.placements
    rank = mesh.get_local_rank(0) if mesh.ndim == 1 else mesh.get_coordinate()[-1]
    chunk = list(torch.chunk(nf4, mesh.size(mesh.ndim - 1), dim=0))[rank]
    shard = DTensor.from_local(
        chunk, mesh, placements, run_check=False, shape=param.shape, stride=param.stride()
    )
    return torch.nn.Parameter(shard, requires_grad=False)
