# The fastest configuration that fits, found and then trained:
#   python -m commands.tune model=llama_160m launcher.nproc_per_node=8 plan.device_memory_gb=80 [tune.strategies=[ddp,fsdp]]
# Stage 1, no trial spent: every candidate (strategy x precision x attention x activation checkpointing x
# compile) is checked by the same pre-launch checks as a run (a candidate the device cannot run is pruned
# with the check's message) and planned by the memory planner at each micro-batch (a candidate whose every
# micro-batch's predicted peak exceeds the memory, less tune.headroom, is pruned with that peak).
# Stage 2, short real trials through the launcher sweeps use (launcher.elastic.launch: each trial its own
# worker processes, so a trial that runs out of memory or crashes is a row, never the end of the tune):
# per candidate a first trial at the largest micro-batch the planner lets fit (halved after an out-of-memory
# or another failure, until one runs); then successive halving: the better half goes on to a trial of twice
# the steps, for tune.rounds rounds. Growing the micro-batch from small would spend a trial per doubling on
# what the planner already bounds: the planner is the judge of what fits, and the trials of what is fast.
# The result, in the tune directory: report.md / report.csv / report.png (every candidate with its status),
# winner.yaml (`python train.py --config-dir <dir> --config-name winner`) and the winner's command line;
# tune.then_train=true trains it at once. A rerun of the same tune reuses the trials it finished.
#
# Why not Hydra's Optuna sweeper: the space is small and discrete and mostly decided before any trial (the
# planner prunes whole regions, and a candidate's micro-batches are bounded by it), a trial's figure exists
# only when its processes end (an Optuna pruner judges values a trial reports while it runs, in-process),
# and the budget is spent in steps per round, which successive halving over a fixed list does directly.
import hashlib
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from commands.cli import overrides_and_debug
from commands.plan import calibration_of, device_bytes, setup_of
from commands.tune_report import write_report
from launcher.compose import compose_config
from launcher.elastic import WorkerFailed, launch, resolve_nproc
from launcher.errors import command_errors, describe_error, short_reason
from models import parallel_plan
from strategies import STRATEGIES
from strategies.pp import SCHEDULES
from strategies.tp import indivisible
from trainer import gpus
from trainer.checks import model_args, run_dims, validate
from trainer.config import check_schema
from trainer.dist import device_type
from trainer.memory import GB
from trainer.memory.suggest import suggestions
from trainer.paths import unwritable_reason
from trainer.speed.model import predict_setup
from trainer.summary import FAILED, RunSummary

REPO = Path(__file__).resolve().parent.parent
# axis -> (the config key a value sets, the group whose options are the valid values, or None)
AXES = {
    "strategies": ("strategy", "strategy"),
    "precisions": ("precision", "precision"),
    "attentions": ("attention", "attention"),
    "activation_checkpointing": ("strategy.activation_checkpointing", None),
    "compile": ("strategy.compile", None),
    "finetunes": ("finetune", "finetune"),
}


@dataclass
class Candidate:
    overrides: tuple[str, ...]  # the axes' values, as command-line overrides
    status: str = "pending"  # pruned | failed | measured | pending (not reached within the budget)
    reason: str = ""
    micro_batches: list[int] = field(default_factory=list)  # those the planner lets fit, ascending
    predicted_gb: dict[int, float] = field(default_factory=dict)  # micro-batch -> predicted peak per rank
    trials: list[dict] = field(default_factory=list)  # {"micro", "steps", "summary": a RunSummary, ...}
    mesh: dict[str, int] = field(
        default_factory=dict
    )  # the layout's named dimensions (none: data parallel only)
    predicted_tps: dict[int, float] = field(default_factory=dict)  # micro-batch -> the time model's tokens/s
    setups: dict = field(default_factory=dict)  # micro-batch -> its planner Setup (none where it cannot plan)

    @property
    def best(self) -> dict | None:
        ok = [t for t in self.trials if t["summary"].ok and t["summary"].tokens_per_s_median]
        return max(ok, key=lambda t: (t["steps"], t["summary"].tokens_per_s_median)) if ok else None


def default_axes(device: str, world: int, nnodes: int, tp_degrees: list[int], finetune: str = "full") -> dict:
    # Each strategy names the conf/strategy options worth trying at this size (single alone on one device); those
    # that split tensors only where some tensor-parallel degree can split the model.
    return {
        "strategies": [
            p
            for s in STRATEGIES.values()
            if tp_degrees or not s.splits_tensors
            for p in s.tune_presets(world, nnodes)
        ],
        "precisions": ["bf16-mixed", "fp8"] if device == "cuda" else ["fp32", "bf16-mixed"],
        "attentions": ["sdpa", "flash"],
        "activation_checkpointing": ["none", "selective", "full"],
        "compile": [False],
        "finetunes": [
            finetune
        ],  # what the run trains: the config's (tune.finetunes=[full,lora] compares them)
    }


def tp_degrees(cfg, nproc: int) -> list[int]:
    # tune.tp, or the divisors above 1 of a node's ranks that split the model (strategies/tp.py's checks).
    if cfg.tune.tp is not None:
        if not cfg.tune.tp or any(d < 1 for d in cfg.tune.tp):
            raise ValueError(
                f"tune.tp must list tensor-parallel degrees of at least 1, got {list(cfg.tune.tp)}"
            )
        return list(cfg.tune.tp)
    args = model_args(cfg)
    plan = parallel_plan(args)
    return [d for d in range(2, nproc + 1) if nproc % d == 0 and indivisible(args, plan, d) is None]


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv")  # tune's default: one of each kind


def pp_layouts(cfg, world: int) -> list[tuple[str, ...]]:
    # The pipeline's part of a candidate's overrides: tune.pp degrees x tune.pp_schedules (those taking more than
    # one stage per rank with 2), or by default the degrees that divide the world and leave each stage a block.
    if cfg.tune.pp is not None and (not cfg.tune.pp or any(d < 2 for d in cfg.tune.pp)):
        raise ValueError(f"tune.pp must list pipeline degrees of at least 2, got {list(cfg.tune.pp)}")
    schedules = list(cfg.tune.pp_schedules) if cfg.tune.pp_schedules is not None else list(PP_SCHEDULES)
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown or not schedules:
        raise ValueError(
            f"tune.pp_schedules holds {repr(unknown[0]) if unknown else 'nothing'}: choose from {', '.join(SCHEDULES)}"
        )
    layers = model_args(cfg).n_layers
    degrees = list(cfg.tune.pp) if cfg.tune.pp is not None else [
        d for d in range(2, world + 1) if world % d == 0 and d <= layers]  # fmt: skip
    return [
        (
            f"strategy.pp={d}",
            f"strategy.pp_schedule={s}",
            f"strategy.pp_stages_per_rank={SCHEDULES[s][1] or 2}",
        )
        for d in degrees
        for s in schedules
    ]


def axes_of(cfg, device: str, world: int, tp: list[int]) -> dict:
    # The space as the user restricted it: an empty axis or an unknown value is refused, naming the axis.
    axes = default_axes(device, world, cfg.launcher.nnodes, tp, cfg.finetune.name)
    for axis, (key, group) in AXES.items():
        given = cfg.tune.get(axis)
        if given is None:
            continue
        values = list(given)
        if not values:
            raise ValueError(
                f"tune.{axis} is empty, which leaves no candidate: give it at least one value, or leave it unset"
            )
        valid = (
            options(group)
            if group
            else (["none", "selective", "full"] if axis == "activation_checkpointing" else [True, False])
        )
        unknown = [v for v in values if v not in valid]
        if unknown:
            raise ValueError(
                f"tune.{axis} holds {unknown[0]!r}, which is not an option of {key}: choose from {', '.join(map(str, valid))}"
            )
        axes[axis] = values
    return axes


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def micro_options(cfg, dp_size: int) -> list[int]:
    # The micro-batches a candidate of this data-parallel size is planned (and tried) at.
    per_rank = cfg.trainer.global_batch_size // dp_size
    given = cfg.tune.micro_batch_sizes
    found = sorted(given) if given is not None else [m for m in (2**i for i in range(12)) if m <= per_rank]
    bad = [m for m in found if m < 1 or per_rank % m]
    if bad or not found:
        raise ValueError(
            f"tune.micro_batch_sizes must divide the per-rank batch (trainer.global_batch_size {cfg.trainer.global_batch_size} "
            f"/ data-parallel size {dp_size} = {per_rank}), got {bad or found}"
        )
    return found


def plan_candidates(base: list[str], cfg, nproc: int, device: str, limit: float | None) -> list[Candidate]:
    # Stage 1: the checks, then the planner, for every candidate. No trial.
    world = nproc * cfg.launcher.nnodes
    degrees = tp_degrees(cfg, nproc)
    axes = axes_of(cfg, device, world, degrees)
    pipelines = pp_layouts(cfg, world) if any(pipelined(p) for p in axes["strategies"]) else []
    dev = device_type(cfg.trainer.device)
    capability = gpus.capability()
    out = []
    for values in itertools.product(*(axes[a] for a in AXES)):
        over = tuple(
            f"{key}={str(v).lower() if isinstance(v, bool) else v}"
            for (key, _), v in zip(AXES.values(), values, strict=True)
        )
        layouts = [(f"strategy.tp={tp}",) for tp in degrees] if splits_tensors(values[0]) else [()]
        for layout in pipelines if pipelined(values[0]) else layouts:
            cand = Candidate(over + layout)
            out.append(cand)
            plan_candidate(cand, base, cfg, world, nproc, dev, capability, limit)
    prune_dominated(out)
    return out


def strategy_of(preset: str):
    return STRATEGIES[OmegaConf.load(REPO / "conf" / "strategy" / f"{preset}.yaml").get("name", preset)]


def splits_tensors(preset: str) -> bool:
    # Whether a conf/strategy option's strategy is a tensor-parallel one (it then takes strategy.tp).
    return strategy_of(preset).splits_tensors


def pipelined(preset: str) -> bool:
    # Whether a conf/strategy option's strategy is a pipeline (it then takes tune's pipeline layouts).
    return strategy_of(preset).pipelined


def plan_candidate(cand: Candidate, base, cfg, world: int, nproc: int, dev: str, capability, limit) -> None:
    # One candidate through the pre-launch checks and the planner: pruned with the reason, or the micro-batches
    # that fit.
    over = cand.overrides
    try:
        c = compose_config([*base, *over])
        validate(c, world, dev, capability, per_node=nproc)
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        cand.status, cand.reason = "pruned", describe_error(e)
        return
    dims = run_dims(c.strategy, world, nproc)
    cand.mesh = dims.describe()
    micros = micro_options(cfg, dims.dp_size)
    refused = None
    for m in micros:
        at = compose_config([*base, *over, f"trainer.micro_batch_size={m}"])
        if dims.pp > 1:  # a pipeline schedule's rules on its micro-batch count
            try:
                validate(at, world, dev, capability, per_node=nproc)
            except ValueError as e:
                refused = refused or describe_error(e)
                continue
        try:
            setup = setup_of(at)
            peak = setup.plan().peak
            cand.setups[m] = setup  # for the time model (predict_candidates)
        except ValueError:  # a model the planner does not cover (model=hf): the trials decide
            peak = None
        if peak is not None:
            cand.predicted_gb[m] = peak / GB
        if peak is None or limit is None or peak <= limit:
            cand.micro_batches.append(m)
    if not cand.micro_batches and not cand.predicted_gb:
        cand.status, cand.reason = "pruned", refused or "no micro-batch to plan"
        return
    if not cand.micro_batches:
        least = min(cand.predicted_gb.values())
        cand.status = "pruned"
        cand.reason = f"predicted peak {least:.2f} GB per rank at micro-batch {micros[0]} > {limit / GB:.2f} GB (memory less headroom)"


AC_ORDER = ("none", "selective", "full")  # each recomputes more than the one before, to save memory


def prune_dominated(cands: list[Candidate]) -> None:
    # Activation checkpointing only trades speed for memory: a candidate whose lighter-checkpointing twin fits
    # the same largest micro-batch would only be slower. No trial is spent on it.
    key = AXES["activation_checkpointing"][0]
    by_rest = {}
    for c in cands:
        ac = dict(o.split("=", 1) for o in c.overrides)[key]
        by_rest.setdefault(tuple(o for o in c.overrides if not o.startswith(f"{key}=")), {})[ac] = c
    for twins in by_rest.values():
        for ac, c in twins.items():
            lighter = [twins[a] for a in AC_ORDER[: AC_ORDER.index(ac)] if a in twins]
            fits = [
                t
                for t in lighter
                if t.status == "pending" and max(t.micro_batches) >= max(c.micro_batches, default=0)
            ]
            if c.status == "pending" and fits:
                ac_of = dict(o.split("=", 1) for o in fits[0].overrides)[key]
                c.status = "pruned"
                c.reason = (
                    f"dominated: fits as well with activation checkpointing {ac_of}, which recomputes less"
                )


class Trials:
    # Short real runs, one directory each under <tune dir>/trials, reused when a rerun asks for the same one.
    def __init__(self, root: Path, base: list[str], cfg, nproc: int, deadline: float | None, names: dict):
        self.root, self.base, self.nproc, self.deadline = root, base, nproc, deadline
        self.warmup = cfg.tune.warmup_steps
        self.ran = self.reused = 0
        self.names = names  # a candidate's overrides -> "candidate k of n", as the console calls it
        self.began, self.count = time.monotonic(), 0

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self, cand: Candidate, micro: int, steps: int) -> RunSummary:
        over = [*self.base, *cand.overrides, f"trainer.micro_batch_size={micro}", f"trainer.max_steps={self.warmup + steps}",
                f"metrics.warmup_steps={self.warmup}", "eval.at_end=false", "checkpoint=none", "trainer.progress_bar=false",
                "trainer.print_summary=false"]  # fmt: skip
        key = hashlib.sha256(json.dumps(over).encode()).hexdigest()[:12]
        run_dir = self.root / "trials" / key
        done = RunSummary.read(run_dir) if run_dir.is_dir() else None
        self.count += 1
        trial = f"shardlab: trial {self.count}, {self.names[cand.overrides]}"
        what = f"{' '.join(cand.overrides)}, micro-batch {micro}, {steps} steps"
        if done is not None and done.ok:
            summary = done
            self.reused += 1
            print(f"{trial}: {what}: {_result(summary)} (reused from {run_dir})", flush=True)
        else:
            print(f"{trial}: {what} ({time.monotonic() - self.began:.0f} s into the tune)", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            summary = self._launch(over, run_dir)
            self.ran += 1
            print(f"{trial}: {_result(summary)}", flush=True)
        trial = {
            "micro": micro,
            "steps": steps,
            "summary": summary,
            "run_dir": str(run_dir),
            "overrides": over,
        }
        cand.trials.append(trial)
        return summary

    def _launch(self, over: list[str], run_dir: Path) -> RunSummary:
        cfg = compose_config(over)
        cfg.run_dir = str(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "overrides.json").write_text(json.dumps(over))
        try:
            summary = launch(cfg, self.nproc, model_args(cfg)) or RunSummary(
                status=FAILED, error="no summary"
            )
        except WorkerFailed as e:  # out of memory, a crash: the trial's row
            summary = RunSummary(status=FAILED, error=str(e))
        if not summary.ok:
            summary = RunSummary(status=FAILED, error=short_reason(summary.error or "no summary", None))
            summary.write(run_dir)
        return summary


def _result(summary: RunSummary) -> str:
    if not summary.ok:
        return f"failed: {summary.error}"
    return (
        f"{summary.tokens_per_s_median:,.0f} tokens/s" if summary.tokens_per_s_median else "no step measured"
    )


def tokens_per_s(trial: dict | None) -> float:
    return (trial["summary"].tokens_per_s_median if trial else None) or 0.0


def predict_candidates(cands: list[Candidate], cal: dict) -> None:
    # The time model's tokens/s for every candidate that fits, at each micro-batch it fits at, from the Setup the
    # planner made of it. A model the planner or the meta device cannot take (model=hf): the trials decide.
    for c in cands:
        if c.status != "pending":
            continue
        for m in c.micro_batches:
            if m not in c.setups:
                break
            try:
                c.predicted_tps[m] = predict_setup(c.setups[m], cal).tokens_per_s
            except ValueError:
                break


def predicted(c: Candidate) -> float:
    return max(c.predicted_tps.values(), default=0.0)


def within(cands: list[Candidate], margin: float) -> list[Candidate]:
    # The candidates predicted within `margin` of the best prediction (all where nothing is predicted).
    pending = [c for c in cands if c.status == "pending"]
    best = max((predicted(c) for c in pending), default=0.0)
    if not best:
        return pending
    return [c for c in pending if predicted(c) >= (1 - margin) * best]


def model_error(cands: list[Candidate]) -> float:
    # How far the time model ranks wrongly, from the trials so far: a bias common to every candidate changes no
    # ranking, so the error is how far a candidate's measured/predicted ratio lies from their median, the median of
    # those (one noisy trial does not widen the margin to everything).
    ratios = [
        tokens_per_s(c.best) / c.predicted_tps[c.best["micro"]]
        for c in cands
        if c.best and c.predicted_tps.get(c.best["micro"])
    ]
    if len(ratios) < 2:
        return 0.0
    mid = statistics.median(ratios)
    return statistics.median(abs(r / mid - 1) for r in ratios)


def first_trial(cand: Candidate, trials: Trials, steps: int) -> None:
    # The largest micro-batch the planner lets fit; after an out-of-memory (or another failure), the next
    # smaller one, until a trial runs.
    for micro in reversed(cand.micro_batches):
        if trials.out_of_time() or trials.run(cand, micro, steps).ok:
            return


def search(cands: list[Candidate], trials: Trials, cfg) -> list[Candidate]:
    # Stage 2. -> the candidates still in the running after the last round, best first. First trials go to the
    # candidates the time model predicts within tune.margin of the best; then, the margin widened by the model's
    # error on those trials, to any more it now covers; the rest are not tried, with their prediction as reason.
    steps = cfg.tune.trial_steps
    tried: list[Candidate] = []
    margin = cfg.tune.margin
    while True:
        batch = [c for c in within(cands, margin) if c not in tried]
        if not batch:
            break
        for c in batch:
            first_trial(c, trials, steps)
            c.status = "measured" if c.best else ("failed" if c.trials else "pending")
            if c.status == "failed":
                c.reason = c.trials[-1]["summary"].error or ""
        tried += batch
        widened = min(1.0, cfg.tune.margin + model_error(tried))
        if widened <= margin:
            break
        margin = widened
    best = max((predicted(c) for c in tried), default=0.0)
    for c in cands:
        if c.status == "pending" and c not in tried and predicted(c):
            c.status = "predicted"
            c.reason = (
                f"not tried: predicted {predicted(c):,.0f} tokens/s, {1 - predicted(c) / best:.0%} below the best "
                f"prediction (beyond tune.margin {cfg.tune.margin:.0%}, widened to {margin:.0%} by the model's error)"
            )
    alive = sorted((c for c in tried if c.status == "measured"), key=lambda c: -tokens_per_s(c.best))
    for _ in range(1, cfg.tune.rounds):
        if len(alive) <= 1 or trials.out_of_time():
            break
        alive, steps = alive[: max(2, (len(alive) + 1) // 2)], steps * 2
        for c in alive:
            if not trials.out_of_time():
                trials.run(c, c.best["micro"], steps)
        alive = sorted(
            alive,
            key=lambda c: (
                -max(t["steps"] for t in c.trials if t["summary"].ok),
                -tokens_per_s(c.best),
            ),
        )
    return alive


def winner_files(root: Path, base: list[str], winner: Candidate) -> tuple[str, Path]:
    # -> the winner's command line, and tuned/winner.yaml: an experiment preset of the winner's choices (the
    # lightning-hydra-template form: `override /group: option`, then values), for
    # `python train.py --config-dir <tune dir> +tuned=winner`.
    over = [
        o for o in (*base, *winner.overrides, f"trainer.micro_batch_size={winner.best['micro']}") if "=" in o
    ]
    command = "python train.py " + " ".join(over)
    pairs = [o.lstrip("+").split("=", 1) for o in over]
    groups = {k: v for k, v in pairs if k in options_groups()}
    values = [f"{k}={v}" for k, v in pairs if k not in groups]
    doc = OmegaConf.create({"defaults": [*({f"override /{g}": v} for g, v in groups.items()), "_self_"]})
    path = root / "tuned" / "winner.yaml"
    path.parent.mkdir(exist_ok=True)
    yaml = OmegaConf.to_yaml(OmegaConf.merge(doc, OmegaConf.from_dotlist(values)))
    path.write_text(
        f"# @package _global_\n# {command}\n# python train.py --config-dir {root} +tuned=winner\n{yaml}"
    )
    return command, path


def options_groups() -> set[str]:
    return {p.name for p in (REPO / "conf").iterdir() if p.is_dir()}


def tune_dir(cfg, base: list[str], world: int, device: str) -> Path:
    if cfg.tune.dir:
        return Path(cfg.tune.dir)
    keep = sorted(
        o for o in base if not o.startswith(("tune.then_train", "tune.budget_minutes", "trainer.max_steps"))
    )
    return REPO / "tune" / hashlib.sha256(json.dumps([keep, world, device]).encode()).hexdigest()[:10]


def main(argv: list[str] | None = None) -> int:
    base, debug = overrides_and_debug(
        argv,
        "python -m commands.tune",
        "the fastest configuration that fits: candidates pruned by the checks "
        "and the memory planner, then short real trials; a report and the winner's command",
    )
    with command_errors(debug):
        cfg = compose_config(base)
        check_schema(cfg)  # the rest of the config is each candidate's, checked with it
        nproc = resolve_nproc(str(cfg.launcher.nproc_per_node), cfg.trainer.device)
        world = nproc * cfg.launcher.nnodes
        # What this machine runs (trainer.device=auto here: its GPU if any), unless plan.device says otherwise.
        device, limit = cfg.plan.device or device_type(cfg.trainer.device), device_bytes(cfg)
        root = tune_dir(cfg, base, world, device)
        # every file tune writes lies under it: checked before the planner runs
        if why := unwritable_reason(root):
            raise ValueError(
                f"tune.dir={root} cannot be created ({why}): set tune.dir to a writable directory"
            )
        limit = None if limit is None else limit * (1 - cfg.tune.headroom)
        cands = plan_candidates(base, cfg, nproc, device, limit)
        if all(c.status == "pruned" for c in cands):
            raise ValueError(no_fit(cands, base, limit))
    root.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    deadline = began + 60 * cfg.tune.budget_minutes if cfg.tune.budget_minutes else None
    pending = [c for c in cands if c.status == "pending"]
    names = {c.overrides: f"candidate {k} of {len(pending)}" for k, c in enumerate(pending, 1)}
    trials = Trials(root, [o for o in base if not o.startswith("tune.")], cfg, nproc, deadline, names)
    print(
        f"shardlab: tune {root}: {sum(c.status == 'pending' for c in cands)} of {len(cands)} candidates to try",
        flush=True,
    )
    with command_errors(debug):
        cal, how = calibration_of(device, world)
    if cal is not None:
        predict_candidates(cands, cal)
    else:
        print(f"shardlab: no time model ({how}): every candidate that fits gets a trial", flush=True)
    alive = search(cands, trials, cfg)
    winner = alive[0] if alive else None
    command, config_file = winner_files(root, trials.base, winner) if winner else ("", None)
    text = write_report(root, cands, alive, command, config_file, time.monotonic() - began, trials, cfg)
    print(text.split("\n## ")[0], flush=True)
    if winner is None:
        print("shardlab: error: no candidate finished a trial: see the report's reasons", file=sys.stderr)
        return 1
    if cfg.tune.then_train:
        # The winner's preset and the user's trainer.max_steps, in <tune dir>/train.
        args = [
            sys.executable,
            str(REPO / "train.py"),
            "--config-dir",
            str(root),
            "+tuned=winner",
            f"hydra.run.dir={root / 'train'}",
        ]
        print(f"shardlab: training the winner: {' '.join(args[1:])}", flush=True)
        return subprocess.run([*args, *(o for o in base if o.startswith("trainer.max_steps"))]).returncode
    return 0


def no_fit(cands: list[Candidate], base: list[str], limit: float | None) -> str:
    # Every candidate pruned: the memory's, or each for its own reason. For memory, the planner's cheapest
    # change that makes the leanest candidate fit.
    by_memory = [c for c in cands if c.predicted_gb]
    if not by_memory or limit is None:
        return f"no candidate can run here: {cands[0].reason} (and {len(cands) - 1} more)"
    lean = min(by_memory, key=lambda c: min(c.predicted_gb.values()))
    setup = setup_of(
        compose_config([*base, *lean.overrides, f"trainer.micro_batch_size={min(lean.predicted_gb)}"])
    )
    found = suggestions(setup, limit)
    fix = (
        f"; the planner's cheapest change that fits: {found[0][0]} ({' '.join(found[0][1].overrides)})"
        if found
        else ""
    )
    return f"no candidate fits {limit / GB:.2f} GB per device (memory less tune.headroom): the leanest, {' '.join(lean.overrides)}, needs {min(lean.predicted_gb.values()):.2f} GB{fix}"


if __name__ == "__main__":
    raise SystemExit(main())
