# Per-rank memory of a training config before anything runs, from the same Hydra config as train.py:
#   python -m launcher.plan model=llama3_8b strategy=fsdp precision=bf16-mixed launcher.nproc_per_node=8 plan.device_memory_gb=80
# prints parameters, gradients, optimizer state, activations (per block and in all), temporaries and the peak,
# whether it fits the device, and if not, the cheapest changes that would make it fit (trainer/planner.py).
import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from launcher.compose import config_dir, fail, setup_hydra
from launcher.elastic import resolve_nproc
from launcher.errors import describe_error
from trainer.checks import check_known_keys, check_strategy, resolve_model_args
from trainer.planner import GB, OPTIMIZERS, MemoryPlan, plan_memory, precision_bytes, spec_from_config

# Changes the planner may propose, cheapest first, by what they cost a run that fits either way:
# bf16 and flash attention make steps faster, not slower; FSDP adds all-gathers that overlap with compute;
# 8-bit optimizer states cost some optimizer time and a little accuracy; activation checkpointing recomputes
# the forward (selective: every other block); a smaller micro-batch keeps the global batch through gradient
# accumulation at lower arithmetic intensity; GQA changes the model; more ranks cost hardware; CPU offload
# moves every optimizer step over PCIe.
# (label, overrides, applies to the current config)
CANDIDATES = [
    ("bf16 mixed precision", ["precision=bf16-mixed"], lambda c: c.precision.name in ("fp32", "tf32")),
    ("flash attention", ["attention=flash"], lambda c: c.attention.impl == "standard"),
    ("FSDP full shard", ["strategy=fsdp"], lambda c: c.strategy.name in ("single", "ddp") and _world(c) > 1),
    (
        "FSDP full shard",
        ["strategy=fsdp"],
        lambda c: c.strategy.name == "fsdp" and not c.strategy.reshard_after_forward,
    ),
    ("8-bit optimizer states", ["optim=adamw8bit"], lambda c: c.optim.name == "adamw"),
    (
        "selective activation checkpointing",
        ["strategy.activation_checkpointing=selective"],
        lambda c: _no_ac(c),
    ),
    ("full activation checkpointing", ["strategy.activation_checkpointing=full"], lambda c: _no_ac(c)),
    ("a smaller micro-batch", None, lambda c: True),  # halved until it fits (gradient accumulation)
    ("GQA (4 query heads per K/V head)", ["attention=gqa"], lambda c: _gqa_possible(c)),
    ("FSDP over more ranks", None, lambda c: True),  # GPUs per node, then nodes, doubled
    ("CPU offload", ["strategy=fsdp_offload"], lambda c: c.strategy.name in ("single", "ddp", "fsdp")),
]


def _world(cfg: DictConfig) -> int:
    return resolve_nproc(str(cfg.launcher.nproc_per_node)) * cfg.launcher.nnodes


def _no_ac(cfg: DictConfig) -> bool:
    return cfg.strategy.activation_checkpointing == "none"


def _gqa_possible(cfg: DictConfig) -> bool:
    args = resolve_model_args(cfg)
    return hasattr(args, "ffn_hidden_dim") and args.kv_heads == args.n_heads and args.n_heads % 4 == 0


def compose_config(overrides: list[str]) -> DictConfig:
    setup_hydra()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]  # its run-dir resolver must not run: planning writes nothing
        cfg.choices = choices
    return cfg


def device_of(cfg: DictConfig) -> str:
    if cfg.plan.device is not None:
        if cfg.plan.device not in ("cpu", "cuda"):
            raise ValueError(f"plan.device must be cpu or cuda, got {cfg.plan.device!r}")
        return cfg.plan.device
    return cfg.trainer.device if cfg.trainer.device in ("cpu", "cuda") else "cuda"


def device_bytes(cfg: DictConfig) -> float | None:
    if cfg.plan.device_memory_gb is not None:
        if cfg.plan.device_memory_gb <= 0:
            raise ValueError(f"plan.device_memory_gb must be positive, got {cfg.plan.device_memory_gb}")
        return cfg.plan.device_memory_gb * GB
    import torch

    if device_of(cfg) == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return None  # unknown: the plan prints the numbers and no verdict


def plan_config(cfg: DictConfig) -> MemoryPlan:
    # The config's per-rank plan; raises ValueError (with the fix) for what the planner cannot plan.
    world = _world(cfg)
    check_strategy(cfg.strategy, world)
    args = resolve_model_args(cfg)
    if cfg.trainer.seq_len > args.max_seq_len:
        raise ValueError(
            f"trainer.seq_len ({cfg.trainer.seq_len}) exceeds model.max_seq_len ({args.max_seq_len})"
        )
    nproc = resolve_nproc(str(cfg.launcher.nproc_per_node))
    return plan_memory(args, spec_from_config(cfg, world, device_of(cfg), nproc))


def _with(overrides: list[str], extra: list[str]) -> list[str]:
    # extra replaces any override of the same key (and, for a group, of its keys): strategy=fsdp drops
    # strategy.bucket_cap_mb=..., which the FSDP schema would reject.
    keys = {o.split("=", 1)[0] for o in extra}
    kept = [o for o in overrides if o.split("=", 1)[0] not in keys and o.split(".", 1)[0] not in keys]
    return kept + extra


def _try(overrides: list[str]) -> tuple[list[str], MemoryPlan] | None:
    try:
        cfg = compose_config(overrides)
        check_known_keys(cfg)
        return overrides, plan_config(cfg)
    except Exception:  # noqa: BLE001 - a candidate that does not compose or validate is not a suggestion
        return None


def _expand(cfg: DictConfig, label: str, extra: list[str] | None, overrides: list[str], limit: float):
    # -> [(label, overrides, plan)] for one candidate; micro-batch and rank count are searched by halving
    # and doubling until the plan fits (or cannot go further).
    if extra is not None:
        tried = _try(_with(overrides, extra))
        return [(label, *tried)] if tried else []
    if label == "a smaller micro-batch":
        micro = plan_config(cfg).spec.micro_batch
        found = None
        while micro > 1 and (found is None or found[1].peak > limit):
            micro //= 2
            found = _try(_with(overrides, [f"trainer.micro_batch_size={micro}"])) or found
        return [(label, *found)] if found else []
    # More ranks: GPUs per node up to 8, then nodes, under FSDP (switched to it from single/ddp).
    nproc, nnodes, found = resolve_nproc(str(cfg.launcher.nproc_per_node)), cfg.launcher.nnodes, None
    sharded = [] if cfg.strategy.name in ("fsdp", "hsdp") else ["strategy=fsdp"]
    for _ in range(4):  # up to 16x the ranks
        nproc, nnodes = (nproc * 2, nnodes) if nproc < 8 else (nproc, nnodes * 2)
        extra = [*sharded, f"launcher.nproc_per_node={nproc}"]
        extra += [f"launcher.nnodes={nnodes}"] if nnodes != cfg.launcher.nnodes else []
        found = _try(_with(overrides, extra)) or found
        if found is not None and found[1].peak <= limit:
            break
    return [(label, *found)] if found else []


def suggestions(
    cfg: DictConfig, overrides: list[str], limit: float
) -> list[tuple[str, list[str], MemoryPlan]]:
    # The candidates that fit on their own, cheapest first; if none does, the cheapest combination that
    # fits, built by adding candidates in order of cost (each kept only if it lowers the peak).
    single = []
    for label, extra, applies in CANDIDATES:
        if applies(cfg):
            single += _expand(cfg, label, extra, overrides, limit)
    fitting = [s for s in single if s[2].peak <= limit]
    if fitting:
        return fitting
    combined, labels, best = list(overrides), [], plan_config(cfg)
    for label, extra, applies in CANDIDATES:
        current = compose_config(combined)
        if not applies(current):
            continue
        for _, trial, plan in _expand(current, label, extra, combined, limit):
            if plan.peak < best.peak:
                combined, best = trial, plan
                labels.append(label)
        if best.peak <= limit:
            break
    return [(" + ".join(labels), combined, best)] if labels else []


def _row(text: str, value: float) -> str:
    return f"{text:72s}{value / GB:10.3f}"


def describe(cfg: DictConfig, plan: MemoryPlan) -> str:
    s, p = plan.spec, precision_bytes(plan.spec.precision)
    shard = f", sharded 1/{s.shard}" if s.shard > 1 else ""
    layout = "shard-grad-op" if not s.reshard_after_forward else "full shard"
    where = {"single": "1 rank", "ddp": f"replicated on {s.world_size} rank(s)"}.get(
        s.strategy,
        f"{layout} over {s.shard} of {s.world_size} ranks" + (", CPU offload" if s.cpu_offload else ""),
    )
    weights = {4: "fp32", 2: "bf16"}[p.weights]
    block, blocks = max(plan.layer_bytes), len(plan.layer_bytes)
    checkpointed = sum(b < block for b in plan.layer_bytes)
    model = cfg.choices.get("model", cfg.model.name)
    lines = [
        f"shardlab plan: model={model} ({plan.n_params / 1e9:.3g} B parameters), precision={s.precision}, "
        f"optim={s.optim}, strategy={s.strategy} ({where}), attention={cfg.choices.get('attention', '?')} "
        f"({cfg.attention.impl})",
        f"  per rank: micro-batch {s.micro_batch} x {s.seq_len} tokens, {s.grad_accum} micro-batch(es) per "
        f"step, activation checkpointing {s.activation_checkpointing}, planned for {s.device}",
        "",
        f"{'per rank':72s}{'GB':>10s}",
        _row(f"  {'parameters':18s}{weights} weights{shard}", plan.params),
        _row(f"  {'gradients':18s}{weights}{shard}", plan.grads),
        _row(f"  {'optimizer state':18s}{OPTIMIZERS[s.optim].split(':')[0]}{shard}", plan.optimizer),
        _row(f"  {'activations':18s}{blocks} blocks + head, saved for backward", plan.activations),
        _row(
            f"    one block{f' ({checkpointed} checkpointed keep their input only)' if checkpointed else ''}",
            block,
        ),
        *(_row(f"      {k}", v) for k, v in plan.layer_terms.items()),
        _row("    head and loss", sum(plan.head_terms.values())),
        *(_row(f"      {k}", v) for k, v in plan.head_terms.items()),
        _row(f"  {'temporaries':18s}and communication buffers, at the peak", sum(plan.temporaries.values())),
        *(_row(f"      {k}", v) for k, v in plan.temporaries.items()),
    ]
    if plan.buffers:
        lines.append(_row(f"  {'buffers':18s}RoPE tables", plan.buffers))
    if plan.host:
        lines.append(_row(f"  {'host memory':18s}offloaded model state, not on the device", plan.host))
    at = plan.events[plan.peak_event]
    held = ", ".join(f"{k} {v / GB:.3g}" for k, v in at.items() if v)
    lines += [_row(f"  {'total (peak)':18s}at {plan.peak_event}", plan.peak), f"    = {held} (GB)"]
    return "\n".join(lines)


def verdict(cfg: DictConfig, plan: MemoryPlan, overrides: list[str], limit: float | None) -> str:
    if limit is None:
        return "device memory unknown: set plan.device_memory_gb=<GB per device> for a verdict"
    used = plan.peak / limit
    if plan.peak <= limit:
        return f"fits: {plan.peak / GB:.2f} of {limit / GB:.4g} GB per device ({used:.0%}), {(limit - plan.peak) / GB:.2f} GB free"
    lines = [f"does not fit: {plan.peak / GB:.2f} GB per rank > {limit / GB:.4g} GB ({used:.0%})"]
    found = suggestions(cfg, overrides, limit)
    if not found:
        return "\n".join(lines + ["  no change the planner knows makes it fit"])
    lines.append("  cheapest changes that fit, predicted peak per rank:")
    for label, trial, p in found:
        added = [o for o in trial if o not in overrides]
        lines.append(f"    {label:38s}{' '.join(added):58s}{p.peak / GB:8.2f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose_config(overrides)
        check_known_keys(cfg)
        plan = plan_config(cfg)
        limit = device_bytes(cfg)
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        fail(describe_error(e))
    print(describe(cfg, plan))
    print(verdict(cfg, plan, overrides, limit), flush=True)


if __name__ == "__main__":
    main()
