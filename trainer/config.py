# Typed schemas for every config group, registered with Hydra's ConfigStore so that an unknown key or a
# wrong type fails at composition with Hydra's own message. Every numeric field states its valid range
# beside it (`ranged`), and check_schema checks them all, and that no key was added that nothing reads, in
# one walk. Cross-field checks live in trainer/checks.py's `validate`, which runs once, before any worker
# starts. No torch here: train.py imports this before Hydra has parsed the command line.
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from strategies import StrategyConfig
from strategies import schemas as strategy_schemas
from strategies.base import RANGE_RULE, one_of, ranged

__all__ = ["SCHEMAS", "batch_layout", "check_schema", "one_of", "ranged", "register_configs"]


def _in_range(value, rule: str) -> bool:
    m = RANGE_RULE.match(rule)
    if m.group(1):
        bound = float(m.group(2))
        return value >= bound if m.group(1) == ">=" else value > bound
    lo, hi = float(m.group(4)), float(m.group(5))
    above = value >= lo if m.group(3) == "[" else value > lo
    below = value <= hi if m.group(6) == "]" else value < hi
    return above and below


def _phrase(rule: str) -> str:
    m = RANGE_RULE.match(rule)
    if m.group(1) == ">=":
        return "not be negative" if float(m.group(2)) == 0 else f"be at least {m.group(2)}"
    if m.group(1) == ">":
        return "be positive" if float(m.group(2)) == 0 else f"be above {m.group(2)}"
    return f"be in {rule}"


# Fields of the model config that say how it trains, not what it is: never passed to a model's arguments.
NOT_MODEL_ARGS = ("lr", "init_from")


@dataclass
class ModelConfig:
    name: str = MISSING  # a preset of models.MODEL_PRESETS; the fields below override it when set
    dim: int | None = ranged(None, ">= 1")
    n_layers: int | None = ranged(None, ">= 1")
    n_heads: int | None = ranged(None, ">= 1")
    n_kv_heads: int | None = ranged(None, ">= 1")
    vocab_size: int | None = ranged(None, ">= 1")
    multiple_of: int | None = ranged(None, ">= 1")
    ffn_dim_multiplier: float | None = ranged(None, "> 0")
    norm_eps: float | None = ranged(None, "> 0")
    rope_theta: float | None = ranged(None, "> 0")
    max_seq_len: int | None = ranged(None, ">= 1")
    tie_embeddings: bool | None = None
    # Hugging Face models (model=hf*): a local directory with config.json (and weights, if present), and/or
    # config fields (model_type when there is no directory); the generic fields above override them.
    name_or_path: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    # the learning rate this model trains well at, which optim.lr defaults to (each preset sets its own, as
    # nanoGPT's and litgpt's do); not a model argument
    lr: float = ranged(3e-4, "> 0")
    # native models: start from these weights (a Hugging Face Llama directory, or a shardlab checkpoint or run
    # directory) instead of a random initialisation; not a model argument
    init_from: str | None = None


@dataclass
class AttentionConfig:
    impl: str = "sdpa"  # standard | flash | sdpa
    # K/V heads: an explicit count wins; else n_heads // kv_head_divisor; else the model preset's own.
    n_kv_heads: int | None = ranged(None, ">= 1")
    kv_head_divisor: int | None = ranged(None, ">= 1")


@dataclass
class PrecisionConfig:
    name: str = "fp32"


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | text | tokens
    path: str | None = None  # text: a file or a directory (read recursively, sorted); tokens: a prepared dir
    glob: str = "*"  # text, directory: which files to read
    max_bytes: int = ranged(
        8_000_000, ">= 1"
    )  # text: read at most this many bytes (deterministic: sorted file order)
    tokenizer: str | None = None  # text: None = bytes (vocab 256); or a local HF tokenizer directory
    # text: the last part of the token stream held out for validation; no training window reaches it
    val_fraction: float = ranged(0.05, "[0, 1)")
    # tokens: read the token files through before training, against the digests and largest token id meta.json
    # records (null: where they total under 4 GB; false: sizes only; true: always)
    verify: bool | None = None


@dataclass
class FinetuneConfig:
    name: str = "full"  # full | lora
    # lora: adapters of this rank on each target Linear, scaled by alpha / rank (peft's LoraConfig)
    rank: int = ranged(8, ">= 1")
    alpha: float = ranged(16.0, "> 0")
    dropout: float = ranged(0.0, "[0, 1)")
    # the Linear layers' names (their last part: wq, q_proj, ...) that get adapters; None: every Linear of the
    # transformer blocks, as QLoRA does
    target_modules: list[str] | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = ranged("${model.lr}", "> 0")  # unless set: the model preset's learning rate (model.lr)
    weight_decay: float = ranged(0.1, ">= 0")
    beta1: float = ranged(0.9, "[0, 1)")
    beta2: float = ranged(0.95, "[0, 1)")
    eps: float = ranged(1e-8, ">= 0")
    warmup_steps: int = ranged(10, ">= 0")
    min_lr_ratio: float = ranged(0.1, "[0, 1]")  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = ranged(1.0, ">= 0")  # 0 disables clipping (the norm is still reported)
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
    nnodes: int = ranged(1, ">= 1")
    rdzv_endpoint: str = ""  # host:port of the first node (multi-node)
    rdzv_id: str = ""  # shared by all nodes of one job
    max_restarts: int = ranged(0, ">= 0")
    # How long a collective waits for a rank that never comes, seconds; null: torch's default (nccl 10 min,
    # gloo 30 min). Under nccl a failed rank's peers block in a CUDA sync until it expires.
    timeout_s: float | None = ranged(None, "> 0")
    monitor_interval: float = ranged(0.5, "> 0")  # seconds between the elastic agent's polls


@dataclass
class TrainerConfig:
    max_steps: int = ranged(100, ">= 1")
    global_batch_size: int = ranged(8, ">= 1")  # sequences per optimizer step, all ranks together
    micro_batch_size: int | None = ranged(
        None, ">= 1"
    )  # per rank per forward; None = no gradient accumulation
    seq_len: int = ranged(256, ">= 1")
    seed: int = ranged(1234, ">= 0")
    log_every: int = ranged(10, ">= 1")
    device: str = "auto"  # auto | cpu | cuda
    progress_bar: bool = True
    print_summary: bool = True  # the table at the end (tune's trials say one line each instead)
    on_nonfinite: str = "error"  # a NaN/inf loss: error (stop, keep the last good checkpoint) | skip the step


@dataclass
class CheckpointConfig:
    every_n_steps: int = ranged(0, ">= 0")  # 0: no periodic saves
    save_final: bool = False  # also save after the last step
    keep_last: int = ranged(3, ">= 0")  # older complete checkpoints are pruned
    resume: str = "auto"  # auto: newest complete checkpoint in the run dir; none; or a checkpoint directory
    dir: str | None = None  # default: <run dir>/checkpoints


@dataclass
class MetricsConfig:
    warmup_steps: int = ranged(3, ">= 0")  # kept out of throughput figures
    peak_tflops: float | None = ranged(
        None, "> 0"
    )  # dense peak per device, for MFU where the device is unknown
    # One step measured with PyTorch's MemTracker (params / grads / optimizer / activations / temporaries),
    # next to the memory planner's prediction, in summary.json
    memory_breakdown: bool = False


@dataclass
class EvalConfig:
    # Validation loss on the data's held-out tokens (data=tokens: its val split; text: the held-out tail;
    # synthetic: a seed stream of its own).
    every_n_steps: int = ranged(0, ">= 0")  # 0: only at the end (eval.at_end)
    batches: int = ranged(
        8, ">= 1"
    )  # held-out batches of trainer.global_batch_size sequences, the same each time
    at_end: bool = True  # evaluate after the last step
    # at each validation, this many greedy continuations of held-out prompts (their first tokens), printed and kept
    # in samples.jsonl and the loggers: what the model writes, beside its loss
    samples: int = ranged(0, ">= 0")
    sample_tokens: int = ranged(32, ">= 1")  # new tokens per sample


@dataclass
class PlanConfig:
    # python -m commands.plan: per-rank memory of this config, and whether it fits
    device_memory_gb: float | None = ranged(
        None, "> 0"
    )  # per device, decimal GB; None: the visible GPU's, if any
    device: str | None = None  # cuda | cpu: what to plan for; None: trainer.device if set, else cuda


@dataclass
class TuneConfig:
    # python -m commands.tune: the search space, axis by axis (None: a default that suits the device), and how
    # the budget is spent. Candidates are strategy x precision x attention x activation checkpointing x
    # compile, each with the micro-batches the planner lets fit.
    strategies: list[str] | None = None  # default: single on one device; ddp, fsdp, fsdp_grad_op on more
    precisions: list[str] | None = (
        None  # default: bf16-mixed and fp8 on CUDA (the checks prune what can't), fp32 and bf16-mixed on CPU
    )
    attentions: list[str] | None = None  # default: sdpa, flash
    activation_checkpointing: list[str] | None = None  # default: none, selective, full
    compile: list[bool] | None = None  # default: [false]
    finetunes: list[str] | None = None  # default: the config's finetune (e.g. [full, lora] to compare them)
    # tensor-parallel degrees for the strategies that split tensors (tp, fsdp_tp, ...); default: the divisors
    # (above 1) of the ranks of a node that the model's heads, K/V heads, dim, MLP and vocabulary allow
    tp: list[int] | None = None
    # pipeline degrees and schedules for strategy=pp (in tune.strategies; by default on more than one node):
    # default the divisors (above 1) of the world size that leave each stage a block, and gpipe, 1f1b,
    # interleaved_1f1b and zbv (the last two with 2 stages per rank)
    pp: list[int] | None = None
    pp_schedules: list[str] | None = None
    micro_batch_sizes: list[int] | None = None  # default: the powers of two that divide the per-rank batch
    headroom: float = ranged(
        0.1, "[0, 1)"
    )  # a candidate fits when its predicted peak <= (1 - headroom) x memory
    trial_steps: int = ranged(6, ">= 1")  # measured steps of a first trial (doubled for each later round)
    warmup_steps: int = ranged(2, ">= 0")  # per trial, kept out of its tokens/s
    rounds: int = ranged(2, ">= 1")  # successive halving: the better half goes on, with twice the steps
    # The time model (trainer/speed/model.py) ranks the candidates that fit; trials go only to those predicted within
    # this fraction of the best (widened by the model's own error on the first trials). 1: every candidate.
    margin: float = ranged(0.15, "[0, 1]")
    budget_minutes: float | None = ranged(None, "> 0")  # stop and report the best so far
    then_train: bool = False  # train the winner at once, with the trainer.max_steps given
    dir: str | None = (
        None  # default: tune/<a hash of the model, device and space>, so a rerun reuses its trials
    )


@dataclass
class SweepConfig:
    resume: bool = False  # -m: skip jobs whose config already has a successful summary.json under resume_dir
    resume_dir: str = "multirun"


@dataclass
class RunConfig:
    # run.name=exp1: the run's directory is outputs/exp1 (not a new time-stamped one), so the same command run
    # again finds its checkpoints and resumes (checkpoint.resume=auto), as output_dir does in transformers
    name: str | None = None


@dataclass
class Config:
    model: Any = MISSING
    finetune: Any = MISSING
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    run_dir: str | None = None  # set by the launcher: where this run's outputs go
    choices: dict[str, str] = field(default_factory=dict)  # set by the launcher: the option of each group


SCHEMAS = {
    "model": ModelConfig,
    "finetune": FinetuneConfig,
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


# Options whose schema extends their group's, e.g. conf/strategy/fsdp.yaml extends /schema/strategy_fsdp: each
# strategy's own, from its file.
OPTION_SCHEMAS = strategy_schemas()


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, schema in {**SCHEMAS, **OPTION_SCHEMAS}.items():
        cs.store(group="schema", name=name, node=schema)


def unknown_key_message(full_key: str, schema: type) -> str:
    parent = full_key.rpartition(".")[0]
    where = f"a key of {parent}" if parent else "a top-level key"
    names = ", ".join(f.name for f in dataclasses.fields(schema))
    return f"{full_key} is not {where}: valid keys are {names}"


def check_schema(cfg: DictConfig, prefix: str = "") -> None:
    # One walk of the composed config against its schemas. Hydra's `+key=value` adds a key even to a typed
    # node, and nothing would ever read it: a typo such as +trainer.max_step=10 must not pass silently. And
    # each numeric field must lie in the range its schema states.
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return  # a free-form dict field (model.hf_config)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key not in fields and not (prefix == "" and key == "hydra"):
            raise ValueError(unknown_key_message(f"{prefix}{key}", schema))
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            if not child._is_missing() and not child._is_none():
                check_schema(child, f"{prefix}{key}.")
            continue
        rule = fields[key].metadata.get("range") if key in fields else None
        value = cfg[key]
        if rule and value is not None and not _in_range(value, rule):
            raise ValueError(f"{prefix}{key} must {_phrase(rule)}, got {value}")


def batch_layout(trainer_cfg, dims) -> tuple[int, int]:
    # -> (micro_batch_size per rank, gradient accumulation steps). dims: the run's ParallelDims; the global
    # batch is split over its data-parallel ranks (tensor- and pipeline-parallel peers read the same rows).
    gbs, dp = trainer_cfg.global_batch_size, dims.dp_size
    size = "world size" if dp == dims.world_size else "data-parallel size"
    if gbs < 1 or gbs % dp:
        raise ValueError(
            f"trainer.global_batch_size ({gbs}) must be a positive multiple of the {size} ({dp})"
        )
    per_rank = gbs // dp
    micro = trainer_cfg.micro_batch_size
    if micro is None and dims.pp > 1:
        # A pipeline runs in micro-batches: strategy.pp_microbatches of them, or one sequence each (the most
        # micro-batches, the smallest bubble; 1F1B keeps at most pp of them in flight)
        n = dims.pp_microbatches or per_rank
        if per_rank % n:
            raise ValueError(
                f"strategy.pp_microbatches={n} must divide the per-rank batch (global_batch_size {gbs} / {size} "
                f"{dp} = {per_rank})"
            )
        micro = per_rank // n
    elif micro is None:
        micro = per_rank
    if micro < 1 or per_rank % micro:
        raise ValueError(
            f"trainer.micro_batch_size ({micro}) must divide the per-rank batch "
            f"(global_batch_size {gbs} / {size} {dp} = {per_rank})"
        )
    return micro, per_rank // micro
