# Per-rank memory of a training config before anything runs, from the same Hydra config as train.py:
#   python -m commands.plan model=llama3_8b strategy=fsdp precision=bf16-mixed launcher.nproc_per_node=8 plan.device_memory_gb=80
# prints parameters, gradients, optimizer state, activations (per block and in all), temporaries and the peak,
# whether it fits the device, and if not, the cheapest changes that would make it fit. The arithmetic is in
# trainer/memory/; this is its command line.

from omegaconf import DictConfig

import strategies
from commands.cli import overrides_and_debug
from launcher.compose import compose_config
from launcher.elastic import resolve_nproc
from launcher.errors import command_errors
from models import parallel_plan
from trainer import gpus
from trainer.checks import model_args, run_dims
from trainer.config import batch_layout, check_schema
from trainer.memory import GB, MemoryPlan, precision_bytes, spec_from_config
from trainer.memory.suggest import Setup, suggestions
from trainer.optim import OPTIMIZERS
from trainer.speed import calibration
from trainer.speed.calibrate import calibrate
from trainer.speed.model import predict_setup


def device_of(cfg: DictConfig) -> str:
    if cfg.plan.device is not None:
        if cfg.plan.device not in ("cpu", "cuda"):
            raise ValueError(f"plan.device must be cpu or cuda, got {cfg.plan.device!r}")
        return cfg.plan.device
    return cfg.trainer.device if cfg.trainer.device in ("cpu", "cuda") else "cuda"


def device_bytes(cfg: DictConfig) -> float | None:
    if cfg.plan.device_memory_gb is not None:
        return cfg.plan.device_memory_gb * GB
    found = gpus.visible_gpus() if device_of(cfg) == "cuda" else []
    return float(found[0].memory_bytes) if found else None  # None: the numbers, and no verdict


def setup_of(cfg: DictConfig) -> Setup:
    # The config's planner inputs; raises ValueError (with the fix) for what the planner cannot plan.
    check_schema(cfg)
    nproc = resolve_nproc(str(cfg.launcher.nproc_per_node))
    dims = run_dims(cfg.strategy, nproc * cfg.launcher.nnodes, nproc)
    args = model_args(cfg)
    plan = parallel_plan(args) if strategies.get_strategy(cfg.strategy.name).needs_plan else None
    strategies.check_config(cfg.strategy, dims, *batch_layout(cfg.trainer, dims), args, plan)
    if cfg.trainer.seq_len > args.max_seq_len:
        raise ValueError(
            f"trainer.seq_len ({cfg.trainer.seq_len}) exceeds model.max_seq_len ({args.max_seq_len})"
        )
    return Setup(
        args=args,
        spec=spec_from_config(
            cfg.strategy, cfg.trainer, cfg.precision.name, cfg.optim, dims, device_of(cfg), cfg.finetune
        ),
        nproc=nproc,
        nnodes=cfg.launcher.nnodes,
        micro_batch_size=cfg.trainer.micro_batch_size,
        shard_size=cfg.strategy.get("shard_size", 0),
    )


def _row(text: str, value: float) -> str:
    return f"{text:72s}{value / GB:10.3f}"


def describe(cfg: DictConfig, plan: MemoryPlan) -> str:
    s, p = plan.spec, precision_bytes(plan.spec.precision)
    split = s.shard * s.dims.tp  # FSDP's shard group x the tensor-parallel degree
    shard = f", sharded 1/{split}" if split > 1 else ""
    where = s.layout.plan_layout(s)
    weights = {4: "fp32", 2: "bf16"}[p.weights]
    block, blocks = max(plan.layer_bytes), len(plan.layer_bytes)
    checkpointed = sum(b < block for b in plan.layer_bytes) if plan.stage is None else 0
    unit, largest = (
        ("blocks", "one block") if plan.stage is None else ("stage(s)", "the largest stage, in flight")
    )
    model = cfg.choices.get("model", cfg.model.name)
    params = "parameters"
    if plan.stage is not None:  # a pipeline: the worst rank's plan, every rank's peak
        params = f"parameters on pipeline rank {plan.stage}"
    lines = [
        f"shardlab plan: model={model} ({plan.n_params / 1e9:.3g} B {params}), precision={s.precision}, "
        f"optim={s.optim}, strategy={s.strategy} ({where}), attention={cfg.choices.get('attention', '?')} "
        f"({cfg.attention.impl})",
        f"  per rank: micro-batch {s.micro_batch} x {s.seq_len} tokens, {s.grad_accum} micro-batch(es) per "
        f"step, activation checkpointing {s.activation_checkpointing}, planned for {s.device}",
        *_pipeline_lines(plan),
        "",
        f"{'per rank':72s}{'GB':>10s}",
        _row(f"  {'parameters':18s}{weights} weights{shard}", plan.params),
        _row(f"  {'gradients':18s}{weights}{shard}", plan.grads),
        _row(f"  {'optimizer state':18s}{OPTIMIZERS[s.optim].split(':')[0]}{shard}", plan.optimizer),
        _row(f"  {'activations':18s}{blocks} {unit} + head, saved for backward", plan.activations),
        _row(
            f"    {largest}{f' ({checkpointed} checkpointed keep their input only)' if checkpointed else ''}",
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
    if cfg.strategy.compile:  # MemTracker cannot run under compile, so this is stated, not measured
        lines.append("  strategy.compile=true: planned as eager; compiled blocks fuse ops and keep fewer intermediates, "
                     "so the activations here are an upper bound")  # fmt: skip
    if plan.host:
        lines.append(_row(f"  {'host memory':18s}offloaded model state, not on the device", plan.host))
    at = plan.events[plan.peak_event]
    held = ", ".join(f"{k} {v / GB:.3g}" for k, v in at.items() if v)
    lines += [_row(f"  {'total (peak)':18s}at {plan.peak_event}", plan.peak), f"    = {held} (GB)"]
    return "\n".join(lines)


def _pipeline_lines(plan: MemoryPlan) -> list[str]:
    if plan.stage is None:
        return []
    s = plan.spec
    peaks = ", ".join(f"{r}: {p / GB:.3g}" for r, p in enumerate(plan.stage_peaks))
    return [
        f"  pipeline: {s.pp_schedule}, {s.dims.pp} stage ranks x {s.pp_stages_per_rank} stage(s); peak GB by "
        f"pipeline rank {peaks}; below, the worst (rank {plan.stage}), its activations for the micro-batches "
        "its schedule keeps in flight"
    ]


def verdict(setup: Setup, plan: MemoryPlan, limit: float | None) -> str:
    if limit is None:
        return "device memory unknown: set plan.device_memory_gb=<GB per device> for a verdict"
    used = plan.peak / limit
    # What was planned, in the verdict itself: a "fits" at 128 tokens says nothing of a run at 8192.
    at = f"at micro-batch {plan.spec.micro_batch} x seq_len {plan.spec.seq_len} (trainer.micro_batch_size, trainer.seq_len)"
    if plan.peak <= limit:
        return (
            f"fits: {plan.peak / GB:.2f} of {limit / GB:.4g} GB per device ({used:.0%}), "
            f"{(limit - plan.peak) / GB:.2f} GB free, {at}"
        )
    lines = [f"does not fit: {plan.peak / GB:.2f} GB per rank > {limit / GB:.4g} GB ({used:.0%}), {at}"]
    found = suggestions(setup, limit)
    if not found:
        return "\n".join(lines + ["  no change the planner knows makes it fit"])
    lines.append("  cheapest changes that fit, predicted peak per rank:")
    for label, trial, p in found:
        lines.append(f"    {label:38s}  {' '.join(trial.overrides):58s}  {p.peak / GB:8.2f} GB")
    return "\n".join(lines)


def local_devices(device: str) -> int:
    # How many ranks this machine can calibrate: its GPUs, or (a CPU) any number, as the workers share its cores.
    return len(gpus.visible_gpus()) if device == "cuda" else 1 << 10


def calibration_of(device: str, world: int, say=print) -> tuple[dict | None, str]:
    # This machine's calibration of the planned device at this world size: cached, or measured now (about a minute)
    # where this machine has the device; else None and why.
    if world > local_devices(device):
        have = (
            "no GPU"
            if device == "cuda" and not local_devices(device)
            else f"{local_devices(device)} {device} device(s)"
        )
        return None, (
            f"no calibration of {device} x {world} here ({have}): run `python -m commands.calibrate "
            f"launcher.nproc_per_node={world} trainer.device={device}` where the run will run"
        )
    record = calibration.load(device, world)  # only where the device is here: it names the device
    if record is not None and "collectives" in record:
        return record, "cached"
    say(
        f"shardlab: calibrating {device} x {world} for the time model (about a minute, then cached)...",
        flush=True,
    )
    return calibrate(device, world), "measured now"


def speed(cfg: DictConfig, setup: Setup, say=print) -> str:
    # The predicted step time and tokens/s beside the memory, each term of trainer/speed/model.py's.
    record, how = calibration_of(device_of(cfg), setup.nproc * setup.nnodes, say)
    if record is None:
        return f"predicted speed: {how}"
    try:
        t = predict_setup(setup, record)
    except ValueError as e:
        return f"predicted speed: n/a: {e}"
    k = record["key"]
    lines = [
        f"predicted speed: {t.total_s:.4g} s per step, {t.tokens_per_s:,.0f} tokens/s "
        f"({t.tokens_per_step:,} tokens per step), at the calibration of {k['device']} x {k['count']} ({how}, "
        f"{record['measured_at']})"
    ]
    lines += [f"  {name:32s}{seconds:10.4g} s" for name, seconds in t.terms().items() if seconds]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    overrides, debug = overrides_and_debug(
        argv,
        "python -m commands.plan",
        "per-rank memory of a training config, whether it fits the device, and if "
        "not, the cheapest changes that would make it fit",
    )
    with command_errors(debug):
        cfg = compose_config(overrides)
        setup = setup_of(cfg)
        plan = setup.plan()
        limit = device_bytes(cfg)
    print(describe(cfg, plan))
    with command_errors(debug):
        print(speed(cfg, setup), flush=True)
    print(verdict(setup, plan, limit), flush=True)


if __name__ == "__main__":
    main()
