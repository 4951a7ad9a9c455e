# Cross-field checks, run once at the boundary before any worker starts. Each failure is one ValueError
# whose message names the fields and the fix.
import torch
from omegaconf import DictConfig

from models import build_model_args
from models.attention import check_attention_supported
from trainer.data import data_vocab_size
from trainer.precision import PRECISIONS, build_precision


def resolve_model_args(cfg: DictConfig):
    name = cfg.model.name
    overrides = {k: v for k, v in cfg.model.items() if k != "name" and v is not None}
    overrides["attention"] = cfg.attention.impl
    att = cfg.attention
    if att.n_kv_heads is not None or att.kv_head_divisor is not None:
        base = build_model_args(name, overrides)
        if not hasattr(base, "n_kv_heads"):
            raise ValueError(
                f"model={name} has no grouped K/V heads: use attention=standard, flash or sdpa with it"
            )
        n_kv = att.n_kv_heads
        if n_kv is None:
            if base.n_heads % att.kv_head_divisor:
                raise ValueError(
                    f"model.n_heads ({base.n_heads}) is not divisible by attention.kv_head_divisor "
                    f"({att.kv_head_divisor}): set attention.n_kv_heads to a divisor of {base.n_heads}"
                )
            n_kv = base.n_heads // att.kv_head_divisor
        overrides["n_kv_heads"] = n_kv
    return build_model_args(name, overrides)


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
    micro = trainer_cfg.micro_batch_size or per_rank
    if micro < 1 or per_rank % micro:
        raise ValueError(
            f"trainer.micro_batch_size ({micro}) must divide the per-rank batch "
            f"(global_batch_size {gbs} / world size {world_size} = {per_rank})"
        )
    return micro, per_rank // micro


def validate(cfg: DictConfig, world_size: int, device_type: str, capability=None):
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
    if cfg.metrics.warmup_steps >= t.max_steps:
        raise ValueError(
            f"metrics.warmup_steps ({cfg.metrics.warmup_steps}) leaves no measured step of trainer.max_steps "
            f"({t.max_steps}): lower metrics.warmup_steps or raise trainer.max_steps"
        )
    batch_layout(t, world_size)
    if cfg.precision.name not in PRECISIONS:
        raise ValueError(
            f"unknown precision {cfg.precision.name!r}: valid options are {', '.join(PRECISIONS)}"
        )
    precision = build_precision(cfg.precision.name, torch.device(device_type))
    check_attention_supported(args.attention, device_type, precision.compute_dtype, capability)
    need = data_vocab_size(cfg.data)
    if need is not None and need > args.vocab_size:
        raise ValueError(
            f"data needs a vocabulary of {need} tokens but model.vocab_size is {args.vocab_size}: "
            f"set model.vocab_size={need} or pick a model with a larger vocabulary"
        )
    return args
