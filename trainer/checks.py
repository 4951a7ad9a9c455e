# Cross-field checks, run once at the boundary before any worker starts. Each failure is one ValueError
# whose message names the fields and the fix.
import dataclasses
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import strategies
from models import FAMILIES, MODEL_PRESETS, build_model, build_model_args
from models.attention import check_attention_supported
from strategies.common import AC_MODES
from trainer import checkpoint
from trainer.data import data_vocab_size
from trainer.loggers import BACKENDS
from trainer.optim import IMPLEMENTATIONS, OPTIMIZERS
from trainer.precision import PRECISIONS, Precision, build_precision, require_convertible

DEVICES = ("auto", "cpu", "cuda")
NONFINITE_POLICIES = ("error", "skip")  # trainer.on_nonfinite


def _model_fields(name: str, overrides: dict) -> tuple[str, dict]:
    # -> (family, every argument the model will be built with), before building it: the model's own
    # __post_init__ checks would otherwise fail first, naming its fields rather than the config's keys.
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model.name {name!r}: valid options are {', '.join(MODEL_PRESETS)}")
    family, preset = MODEL_PRESETS[name]
    fields = dataclasses.fields(FAMILIES[family][0])
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    return family, {**defaults, **preset, **overrides}


def _kv_heads(att, name: str, fields: dict, user_kv: int | None) -> tuple[int | None, str]:
    # -> (K/V head count, which key set it); an explicit attention.n_kv_heads wins over the divisor.
    if att.n_kv_heads is None and att.kv_head_divisor is None:
        return fields.get("n_kv_heads"), "model.n_kv_heads"
    if "n_kv_heads" not in fields:
        raise ValueError(
            f"model={name} has no grouped K/V heads: use attention=standard, flash or sdpa with it"
        )
    if user_kv is not None:  # never silently overrule a value the user set
        raise ValueError(
            f"model.n_kv_heads={user_kv} and the attention option's K/V heads (attention.n_kv_heads="
            f"{att.n_kv_heads}, attention.kv_head_divisor={att.kv_head_divisor}) both set the K/V head "
            "count: keep one of them"
        )
    if att.n_kv_heads is not None:
        return att.n_kv_heads, "attention.n_kv_heads"
    n_heads, divisor = fields["n_heads"], att.kv_head_divisor
    if divisor < 1 or n_heads % divisor:
        raise ValueError(
            f"model.n_heads ({n_heads}) is not divisible by attention.kv_head_divisor ({divisor}): "
            f"set attention.n_kv_heads to a divisor of {n_heads}"
        )
    return n_heads // divisor, f"model.n_heads / attention.kv_head_divisor ({divisor})"


def resolve_model_args(cfg: DictConfig):
    name = cfg.model.name
    model = OmegaConf.to_container(cfg.model, resolve=True)
    overrides = {k: v for k, v in model.items() if k != "name" and v is not None and v != {}}
    overrides["attention"] = cfg.attention.impl
    family, fields = _model_fields(name, overrides)
    if family == "hf":
        return _resolve_hf_args(cfg, name, overrides)
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
        if fields[key] < 1:
            raise ValueError(f"model.{key} must be at least 1, got {fields[key]}")
    dim, n_heads = fields["dim"], fields["n_heads"]
    if dim % n_heads:
        raise ValueError(
            f"model.dim ({dim}) is not divisible by model.n_heads ({n_heads}): "
            f"choose model.n_heads that divides {dim}"
        )
    n_kv, source = _kv_heads(cfg.attention, name, fields, cfg.model.get("n_kv_heads"))
    if n_kv is not None and (n_kv < 1 or n_heads % n_kv):
        raise ValueError(
            f"model.n_heads ({n_heads}) is not divisible by the K/V head count ({n_kv}, from {source}): "
            f"choose a K/V head count that divides {n_heads}"
        )
    if family == "llama" and (dim // n_heads) % 2:
        raise ValueError(
            f"model.dim / model.n_heads = {dim} / {n_heads} = {dim // n_heads} is odd, but rotary "
            "embeddings need an even head dimension: choose model.n_heads so that the quotient is even"
        )
    if n_kv is not None:
        overrides["n_kv_heads"] = n_kv
    return build_model_args(name, overrides)


def _resolve_hf_args(cfg: DictConfig, name: str, overrides: dict):
    # transformers builds the config (a local config.json and/or model.hf_config): read its shapes, then
    # the attention option's K/V heads become its num_key_value_heads.
    args = build_model_args(name, overrides)
    fields = {"n_heads": args.n_heads}
    if args.has_kv_heads:
        fields["n_kv_heads"] = args.n_kv_heads
    user_kv = overrides.get("n_kv_heads", overrides.get("hf_config", {}).get("num_key_value_heads"))
    n_kv, source = _kv_heads(cfg.attention, name, fields, user_kv)
    if n_kv is not None and (n_kv < 1 or args.n_heads % n_kv):
        raise ValueError(
            f"the model's {args.n_heads} attention heads are not divisible by the K/V head count ({n_kv}, "
            f"from {source}): choose a K/V head count that divides {args.n_heads}"
        )
    if n_kv != args.n_kv_heads:
        args = build_model_args(name, {**overrides, "n_kv_heads": n_kv})
    return args


def check_model_args(args) -> None:
    if args.dim % args.n_heads:
        raise ValueError(
            f"model.dim ({args.dim}) is not divisible by model.n_heads ({args.n_heads}): "
            "choose n_heads that divides dim"
        )
    n_kv = getattr(args, "n_kv_heads", None) or args.n_heads
    if args.n_heads % n_kv:
        raise ValueError(
            f"model.n_heads ({args.n_heads}) is not divisible by the K/V head count ({n_kv}, from "
            "attention.n_kv_heads or model.n_kv_heads): choose a K/V head count that divides n_heads"
        )


def batch_layout(trainer_cfg, world_size: int) -> tuple[int, int]:
    # -> (micro_batch_size per rank, gradient accumulation steps)
    gbs = trainer_cfg.global_batch_size
    if gbs < 1 or gbs % world_size:
        raise ValueError(
            f"trainer.global_batch_size ({gbs}) must be a positive multiple of the world size ({world_size})"
        )
    per_rank = gbs // world_size
    micro = per_rank if trainer_cfg.micro_batch_size is None else trainer_cfg.micro_batch_size
    if micro < 1 or per_rank % micro:
        raise ValueError(
            f"trainer.micro_batch_size ({micro}) must divide the per-rank batch "
            f"(global_batch_size {gbs} / world size {world_size} = {per_rank})"
        )
    return micro, per_rank // micro


def _one_of(key: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {key} {value!r}: valid options are {', '.join(valid)}")


def check_strategy(s, world_size: int) -> None:
    _one_of("strategy.name", s.name, strategies.STRATEGIES)
    _one_of("strategy.activation_checkpointing", s.activation_checkpointing, AC_MODES)
    if s.ac_every < 1:
        raise ValueError(f"strategy.ac_every must be at least 1, got {s.ac_every}")
    if s.name == "single" and world_size > 1:
        # Without a wrapper nothing would average the gradients: each rank would train its own model.
        raise ValueError(
            f"strategy=single trains one process, but the world size is {world_size}: "
            "use strategy=ddp or strategy=fsdp, or launcher.nproc_per_node=1"
        )
    shard = s.get("shard_size", 0)
    if s.name == "hsdp" and (shard < 0 or (shard and world_size % shard)):
        raise ValueError(
            f"strategy.shard_size={shard} does not divide the world size {world_size}: "
            f"choose a shard_size that divides {world_size} (or 0 for the ranks of one node)"
        )


def check_optim(o) -> None:
    _one_of("optim.name", o.name, OPTIMIZERS)
    _one_of("optim.implementation", o.implementation, ("auto", *IMPLEMENTATIONS))
    if o.name == "adamw8bit" and o.implementation != "auto":
        raise ValueError(
            f"optim.implementation={o.implementation} picks a kernel of torch's AdamW; optim=adamw8bit has its "
            "own (compiled on the first step): leave optim.implementation=auto"
        )
    if not o.lr > 0:
        raise ValueError(f"optim.lr must be positive, got {o.lr}")
    for key in ("beta1", "beta2"):
        if not 0 <= o[key] < 1:
            raise ValueError(f"optim.{key} must be in [0, 1), got {o[key]}")
    for key in ("weight_decay", "eps", "warmup_steps", "grad_clip"):
        if o[key] < 0:
            raise ValueError(f"optim.{key} must not be negative, got {o[key]}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")


def check_device(device: str, available: str) -> str:
    # -> the device type the run will use; `available` is what the machine has ("cuda" or "cpu").
    _one_of("trainer.device", device, DEVICES)
    if device == "cuda" and available != "cuda":
        raise ValueError("trainer.device=cuda but no CUDA GPU is visible: use trainer.device=cpu or auto")
    return "cpu" if device == "cpu" else available


def check_precision(precision: Precision, capability, args) -> None:
    # capability: the CUDA device's (major, minor), None off CUDA. Every strategy has a loss-scaling path
    # (GradScaler; ShardedGradScaler under FSDP), so fp16-mixed needs no check here.
    name = precision.name
    if precision.linear and precision.linear.startswith("float8") and capability is not None:
        if tuple(capability) < (8, 9):
            major, minor = capability
            raise ValueError(
                f"precision={name} needs fp8 tensor cores, on NVIDIA GPUs of compute capability 8.9 or newer "
                f"(L4, L40S, H100, H200); this GPU is {major}.{minor}: use precision=bf16-mixed or precision=int8"
            )
    if precision.linear is not None:
        with torch.device("meta"):  # shapes only
            require_convertible(build_model(args), name)


def unknown_key_message(full_key: str, schema: type) -> str:
    parent = full_key.rpartition(".")[0]
    where = f"a key of {parent}" if parent else "a top-level key"
    names = ", ".join(f.name for f in dataclasses.fields(schema))
    return f"{full_key} is not {where}: valid keys are {names}"


def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    # Hydra's `+key=value` adds a key even to a typed node, and nothing would ever read it: a typo such as
    # +trainer.max_step=10 must not pass silently.
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return  # a free-form dict field (model.hf_config)
    names = {f.name for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key not in names and not (prefix == "" and key == "hydra"):
            raise ValueError(unknown_key_message(f"{prefix}{key}", schema))
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_known_keys(child, f"{prefix}{key}.")


def validate(cfg: DictConfig, world_size: int, device_type: str, capability=None):
    # device_type: what the machine offers; trainer.device=cpu narrows it, so a CPU run on a GPU host is
    # checked as the CPU run it is.
    check_known_keys(cfg)
    device_type = check_device(cfg.trainer.device, device_type)
    if device_type != "cuda":
        capability = None
    args = resolve_model_args(cfg)
    check_model_args(args)
    t = cfg.trainer
    if t.seq_len > args.max_seq_len:
        raise ValueError(
            f"trainer.seq_len ({t.seq_len}) is longer than the model's maximum (model.max_seq_len = "
            f"{args.max_seq_len}): lower trainer.seq_len or raise model.max_seq_len"
        )
    for key in ("max_steps", "log_every", "seq_len"):
        if t[key] < 1:
            raise ValueError(f"trainer.{key} must be at least 1, got {t[key]}")
    if cfg.metrics.warmup_steps < 0:
        raise ValueError(f"metrics.warmup_steps must not be negative, got {cfg.metrics.warmup_steps}")
    if cfg.metrics.peak_tflops is not None and cfg.metrics.peak_tflops <= 0:
        raise ValueError(f"metrics.peak_tflops must be positive (or null), got {cfg.metrics.peak_tflops}")
    if cfg.metrics.warmup_steps >= t.max_steps:
        raise ValueError(
            f"metrics.warmup_steps ({cfg.metrics.warmup_steps}) leaves no measured step of trainer.max_steps "
            f"({t.max_steps}): lower metrics.warmup_steps or raise trainer.max_steps"
        )
    micro, accum = batch_layout(t, world_size)
    check_strategy(cfg.strategy, world_size)
    if cfg.strategy.get("static_graph") and accum > 1:
        # torch 2.13's DDP reducer fails an INTERNAL ASSERT on the first no_sync backward under a static
        # graph, and past that stops all-reducing (pytorch/pytorch#143580, the open fix #187732).
        raise ValueError(
            f"strategy.static_graph=true cannot be combined with gradient accumulation ({accum} micro-batches "
            f"of {micro} per rank): DDP's static graph breaks under no_sync in this torch. Set "
            f"strategy.static_graph=false, or trainer.micro_batch_size={micro * accum} for one micro-batch a step"
        )
    check_optim(cfg.optim)
    _one_of("logger.name", cfg.logger.name, BACKENDS)
    _one_of("precision.name", cfg.precision.name, PRECISIONS)
    precision = build_precision(cfg.precision.name, torch.device(device_type))
    check_precision(precision, capability, args)
    check_attention_supported(args.attention, device_type, precision.compute_dtype, capability)
    if cfg.data.max_bytes < 1:
        raise ValueError(f"data.max_bytes must be at least 1, got {cfg.data.max_bytes}")
    need = data_vocab_size(cfg.data, t.seq_len)
    if need is not None and need > args.vocab_size:
        raise ValueError(
            f"data needs a vocabulary of {need} tokens but model.vocab_size is {args.vocab_size}: "
            f"set model.vocab_size={need} or pick a model with a larger vocabulary"
        )
    check_checkpoint(cfg, args)
    if cfg.metrics.memory_breakdown and cfg.strategy.compile:
        raise ValueError(
            "metrics.memory_breakdown=true cannot measure a torch.compile'd model (PyTorch's MemTracker does not "
            "run under compile): set strategy.compile=false for the measured run"
        )
    return args


def unwritable_reason(path) -> str | None:
    # -> why a directory cannot be made at path, or None if it can; creates nothing. The nearest existing
    # ancestor must be a directory this process may write into (a path under a regular file fails even as root).
    path = Path(path).expanduser().absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                return f"{p} is a file, not a directory"
            return None if os.access(p, os.W_OK | os.X_OK) else f"{p} is not writable"
    return None


def check_checkpoint(cfg: DictConfig, args) -> None:
    # Fault tolerance and the checkpoint a run would resume from (readable, complete, of this model's shapes,
    # below trainer.max_steps), all before any worker starts. Reads the checkpoint; writes nothing.
    c, t = cfg.checkpoint, cfg.trainer
    _one_of("trainer.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
    for key in ("every_n_steps", "keep_last"):
        if c[key] < 0:
            raise ValueError(f"checkpoint.{key} must not be negative, got {c[key]}")
    restarts = cfg.launcher.max_restarts
    if restarts > 0 and c.every_n_steps < 1:
        raise ValueError(
            f"launcher.max_restarts={restarts} restarts failed workers from the newest checkpoint, but "
            "checkpoint.every_n_steps=0 saves none, so a restart would start over: add checkpoint=periodic "
            "(or checkpoint.every_n_steps=N), or set launcher.max_restarts=0"
        )
    run_dir = cfg.get("run_dir")
    root = checkpoint.checkpoint_root(c, Path(run_dir or ".")) if c.dir or run_dir else None
    if root is not None and (c.every_n_steps > 0 or c.save_final) and (why := unwritable_reason(root)):
        raise ValueError(
            f"checkpoint directory {root} cannot be created ({why}): set checkpoint.dir to a writable "
            "directory, or checkpoint=none"
        )
    if root is None and c.resume == "auto":
        return  # composed without a run directory (tests, planning): nothing to resume
    path = checkpoint.resolve_resume(c.resume, root)
    if path is None:
        return
    checkpoint.verify(path)
    with torch.device("meta"):  # shapes only
        checkpoint.check_compatible(path, build_model(args).state_dict())
    checkpoint.check_below_max_steps(path, checkpoint.read_train_state(path)["step"], t.max_steps)
