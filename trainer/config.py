# Typed schemas for every config group, registered with Hydra's ConfigStore so that an unknown key or a
# wrong type fails at composition with Hydra's own message. Cross-field checks live in `validate`, which
# runs once, before any worker starts.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING  # a preset of models.MODEL_PRESETS; the fields below override it when set
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None
    # Hugging Face models (model=hf*): a local directory with config.json (and weights, if present), and/or
    # config fields (model_type when there is no directory); the generic fields above override them.
    name_or_path: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttentionConfig:
    impl: str = "sdpa"  # standard | flash | sdpa
    # K/V heads: an explicit count wins; else n_heads // kv_head_divisor; else the model preset's own.
    n_kv_heads: int | None = None
    kv_head_divisor: int | None = None


@dataclass
class PrecisionConfig:
    name: str = "fp32"


@dataclass
class StrategyConfig:
    name: str = "single"
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = 2  # selective: checkpoint every n-th block
    compile: bool = False  # torch.compile each block


@dataclass
class DDPConfig(StrategyConfig):
    name: str = "ddp"
    bucket_cap_mb: int = 25
    static_graph: bool = False


@dataclass
class FSDPConfig(StrategyConfig):
    name: str = "fsdp"
    reshard_after_forward: bool = True  # true: full shard (ZeRO-3); false: shard grad/optimizer (ZeRO-2)
    cpu_offload: bool = False  # parameters, gradients and optimizer state live on the CPU


@dataclass
class HSDPConfig(FSDPConfig):
    name: str = "hsdp"
    shard_size: int = 0  # ranks per shard group (the mesh's inner dim); 0 = the ranks of one node


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | text
    path: str | None = None  # text: a file or a directory (read recursively, sorted)
    glob: str = "*"  # text, directory: which files to read
    max_bytes: int = 8_000_000  # text: read at most this many bytes (deterministic: sorted file order)
    tokenizer: str | None = None  # text: None = bytes (vocab 256); or a local HF tokenizer directory


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still reported)
    implementation: str = "auto"  # auto | fused | foreach | for_loop


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb | tensorboard
    project: str = "shardlab"
    mode: str = "offline"  # WANDB_MODE in the environment wins
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LauncherConfig:
    nproc_per_node: str = "1"  # an integer, or "auto" (GPUs present; CPU: 2)
    nnodes: int = 1
    rdzv_endpoint: str = ""  # host:port of the first node (multi-node)
    rdzv_id: str = ""  # shared by all nodes of one job
    max_restarts: int = 0
    monitor_interval: float = 0.5


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, all ranks together
    micro_batch_size: int | None = None  # per rank per forward; None = no gradient accumulation
    seq_len: int = 256
    seed: int = 1234
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    progress_bar: bool = True
    on_nonfinite: str = "error"  # a NaN/inf loss: error (stop, keep the last good checkpoint) | skip the step


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0: no periodic saves
    save_final: bool = False  # also save after the last step
    keep_last: int = 3  # older complete checkpoints are pruned
    resume: str = "auto"  # auto: newest complete checkpoint in the run dir; none; or a checkpoint directory
    dir: str | None = None  # default: <run dir>/checkpoints


@dataclass
class MetricsConfig:
    warmup_steps: int = 3  # kept out of throughput figures
    peak_tflops: float | None = None  # dense peak per device, for MFU where the device is unknown
    # One step measured with PyTorch's MemTracker (params / grads / optimizer / activations / temporaries),
    # next to the memory planner's prediction, in summary.json
    memory_breakdown: bool = False


@dataclass
class PlanConfig:
    # python -m launcher.plan: per-rank memory of this config, and whether it fits
    device_memory_gb: float | None = None  # per device, decimal GB; None: the visible GPU's, if any
    device: str | None = None  # cuda | cpu: what to plan for; None: trainer.device if set, else cuda


@dataclass
class SweepConfig:
    resume: bool = False  # -m: skip jobs whose config already has a successful summary.json under resume_dir
    resume_dir: str = "multirun"


@dataclass
class Config:
    model: Any = MISSING
    attention: Any = MISSING
    precision: Any = MISSING
    strategy: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    logger: Any = MISSING
    launcher: Any = MISSING
    trainer: Any = MISSING
    checkpoint: Any = MISSING
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    run_dir: str | None = None  # set by the launcher: where this run's outputs go
    choices: dict[str, str] = field(default_factory=dict)  # set by the launcher: the option of each group


SCHEMAS = {
    "model": ModelConfig,
    "attention": AttentionConfig,
    "precision": PrecisionConfig,
    "strategy": StrategyConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "logger": LoggerConfig,
    "launcher": LauncherConfig,
    "trainer": TrainerConfig,
    "checkpoint": CheckpointConfig,
}


# Options whose schema extends their group's, e.g. conf/strategy/fsdp.yaml extends /schema/strategy_fsdp.
OPTION_SCHEMAS = {"strategy_ddp": DDPConfig, "strategy_fsdp": FSDPConfig, "strategy_hsdp": HSDPConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, schema in {**SCHEMAS, **OPTION_SCHEMAS}.items():
        cs.store(group="schema", name=name, node=schema)
