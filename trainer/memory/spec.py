# What the memory planner reads of a run: PlanSpec, filled from the Hydra config by spec_from_config, and the
# bytes per element of each precision, derived from the precision table (trainer/precision.py) itself.
from dataclasses import dataclass

from strategies import SHARDED
from trainer.config import batch_layout
from trainer.precision import precision_fields

GB = 1e9  # decimal, like every *_gb key of shardlab


@dataclass(frozen=True)
class PrecisionBytes:
    weights: int  # bytes per parameter as held on the device (what the optimizer updates); gradients alike
    compute: int  # per element of a matmul output, and of what matmuls save for backward
    autocast: bool  # fp32 weights and residual stream, matmuls in `compute` (FSDP: MixedPrecisionPolicy)
    linear: str | None = None  # torchao swaps the Linears (fp8, int8): they save their input as given

    @property
    def grads(self) -> int:  # gradients take the weights' dtype
        return self.weights


def precision_bytes(name: str) -> PrecisionBytes:
    f = precision_fields(name)
    return PrecisionBytes(
        f["param_dtype"].itemsize, f["compute_dtype"].itemsize, f["autocast"], f.get("linear")
    )


@dataclass(frozen=True)
class PlanSpec:
    # The config values the arithmetic reads (spec_from_config fills it from the Hydra config).
    precision: str = "fp32"
    optim: str = "adamw"
    strategy: str = "single"  # single | ddp | fsdp | hsdp
    world_size: int = 1
    micro_batch: int = 1  # sequences per rank per forward
    seq_len: int = 256
    grad_accum: int = 1
    reshard_after_forward: bool = True  # fsdp/hsdp: false = shard-grad-op (ZeRO-2)
    cpu_offload: bool = False
    shard_size: int = 0  # hsdp: ranks per shard group (resolved, > 0)
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = 2
    optim_impl: str = "auto"  # auto | fused | foreach | for_loop
    device: str = "cuda"  # cuda | cpu: which AdamW kernel "auto" picks; on cpu, offload stays on the device

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED

    @property
    def shard(self) -> int:  # ranks that share one copy of the model state
        if self.strategy == "hsdp":
            return self.shard_size or self.world_size
        return self.world_size if self.strategy == "fsdp" else 1

    @property
    def offloaded(self) -> bool:  # model state in host memory; on a CPU run the host is the device
        return self.sharded and self.cpu_offload and self.device != "cpu"


def spec_from_config(cfg, world_size: int, device: str, local_world_size: int | None = None) -> PlanSpec:
    # The run's Hydra config -> PlanSpec. local_world_size: ranks per node, HSDP's default shard group.
    s, t = cfg.strategy, cfg.trainer
    micro, accum = batch_layout(t, world_size)
    return PlanSpec(
        precision=cfg.precision.name,
        optim=cfg.optim.name,
        strategy=s.name,
        world_size=world_size,
        micro_batch=micro,
        seq_len=t.seq_len,
        grad_accum=accum,
        reshard_after_forward=s.get("reshard_after_forward", True),
        cpu_offload=s.get("cpu_offload", False),
        shard_size=(s.get("shard_size") or local_world_size or world_size) if s.name == "hsdp" else 0,
        activation_checkpointing=s.activation_checkpointing,
        ac_every=s.ac_every,
        optim_impl=cfg.optim.get("implementation", "auto"),
        device=device,
    )
