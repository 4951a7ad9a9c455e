# What the memory planner reads of a run: PlanSpec, filled from the Hydra config by spec_from_config, and the
# bytes per element of each precision, derived from the precision table (trainer/precision.py) itself.
import dataclasses
from dataclasses import dataclass

from strategies import ParallelDims, Strategy, get_strategy
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
    # The config values the arithmetic reads (spec_from_config fills it from the Hydra config; PlanSpec.of from a
    # strategy's name and a world size). The strategy is asked what it shards, over which dimension of dims.
    precision: str = "fp32"
    optim: str = "adamw"
    strategy: str = "single"  # a name of strategies.STRATEGIES
    dims: ParallelDims = (
        ParallelDims()
    )  # the layout: the data-parallel size splits the batch, dp_shard the state
    micro_batch: int = 1  # sequences per rank per forward
    seq_len: int = 256
    grad_accum: int = 1
    reshard_after_forward: bool = True  # fsdp/hsdp: false = shard-grad-op (ZeRO-2)
    cpu_offload: bool = False
    sequence_parallel: bool = (
        False  # tensor parallel: norms and the residual stream sharded over the sequence
    )
    # pipeline parallelism (dims.pp > 1): the schedule, the stages per rank, the layers per stage (None: even)
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1
    pp_split: tuple[int, ...] | None = None
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = 2
    optim_impl: str = "auto"  # auto | fused | foreach | for_loop
    device: str = "cuda"  # cuda | cpu: which AdamW kernel "auto" picks; on cpu, offload stays on the device
    # finetune=lora: adapters of this rank on the blocks' Linears named lora_targets (empty: every one), the base
    # frozen (trainer/memory/lora.py); 0: full fine-tuning
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()

    @classmethod
    def of(cls, strategy: str, world_size: int = 1, per_node: int | None = None, **fields) -> "PlanSpec":
        # A spec of `strategy` over world_size ranks. fields: PlanSpec's own, and the strategy's options its
        # layout needs (hsdp: shard_size).
        names = {f.name for f in dataclasses.fields(cls)}
        options = {k: v for k, v in fields.items() if k not in names}
        spec = {k: v for k, v in fields.items() if k in names}
        return cls(strategy=strategy, dims=get_strategy(strategy).dims(options, world_size, per_node), **spec)

    @property
    def layout(self) -> Strategy:
        return get_strategy(self.strategy)

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def sharded(self) -> bool:  # parameters, gradients and optimizer state split over dp_shard
        return self.layout.shards_state

    @property
    def casts_params(
        self,
    ) -> bool:  # FSDP's MixedPrecisionPolicy gathers weights in the compute dtype: no autocast
        return self.layout.casts_params

    @property
    def shard(self) -> int:  # ranks that share one copy of the model state
        return self.dims.dp_shard if self.sharded else 1

    @property
    def offloaded(self) -> bool:  # model state in host memory; on a CPU run the host is the device
        return self.sharded and self.cpu_offload and self.device != "cpu"


def spec_from_config(
    s, t, precision: str, optim_cfg, dims: ParallelDims, device: str, finetune_cfg=None
) -> PlanSpec:
    # A run's strategy and trainer sub-configs, precision, optim sub-config and layout (and its finetune
    # sub-config) -> PlanSpec.
    micro, accum = batch_layout(t, dims)
    lora = finetune_cfg is not None and finetune_cfg.name == "lora"
    return PlanSpec(
        lora_rank=finetune_cfg.rank if lora else 0,
        lora_targets=tuple(finetune_cfg.target_modules or ()) if lora else (),
        precision=precision,
        optim=optim_cfg.name,
        strategy=s.name,
        dims=dims,
        micro_batch=micro,
        seq_len=t.seq_len,
        grad_accum=accum,
        **get_strategy(s.name).plan_options(s),
        activation_checkpointing=s.activation_checkpointing,
        ac_every=s.ac_every,
        optim_impl=optim_cfg.get("implementation", "auto"),
        device=device,
    )
