# What `python train.py -m ...` adds to a single run. Each job returns its summary (or a failure) as a
# result, never an exception, so Hydra reaches on_multirun_end; there SweepCallback (hydra.callbacks in
# conf/config.yaml) writes the report and a failed job makes the sweep exit non-zero. Inside each job,
# launcher.main.main() calls fill_sweep_logger (name the wandb run after the sweep) and
# reuse_previous_success (sweep.resume=true: skip a job whose config already succeeded).
import hashlib
import json
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launcher.report import build_report
from trainer.summary import RunSummary

# Keys that say where and how a job runs or is logged, not what it computes: configs equal but for these
# are the same job. The world size (launcher.nproc_per_node x nnodes) is compared on its own, from the
# summary, since "auto" resolves per machine.
NOT_HASHED = ("run_dir", "choices", "launcher", "sweep", "logger", "hydra")
NOT_HASHED_TRAINER = ("progress_bar",)


def config_key(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in NOT_HASHED}
    kept["trainer"] = {k: v for k, v in (kept.get("trainer") or {}).items() if k not in NOT_HASHED_TRAINER}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


# summary.json -> (its mtime, (config key, world size, reused) of a success, else None). One process runs
# every job of a local sweep, so each earlier run's config is read once, not once per job.
_seen: dict[Path, tuple[int, tuple | None]] = {}


def _success(summary_path: Path) -> tuple | None:
    try:
        mtime = summary_path.stat().st_mtime_ns
    except OSError:
        return None
    if summary_path in _seen and _seen[summary_path][0] == mtime:
        return _seen[summary_path][1]
    entry = None
    try:
        summary = RunSummary.read(summary_path)
        config = summary_path.with_name("config.yaml")
        if summary is not None and summary.ok and config.is_file():
            key = config_key(OmegaConf.to_container(OmegaConf.load(config), resolve=True))
            entry = (key, summary.world_size, bool(summary.reused_from))
    except Exception:  # a half-written or foreign file is simply not a success to reuse
        entry = None
    _seen[summary_path] = (mtime, entry)
    return entry


def find_previous_success(cfg: DictConfig, world_size: int | None = None, roots=None) -> RunSummary | None:
    # The newest successful summary.json whose run had this job's config (and world size), searched
    # recursively under sweep.resume_dir and this sweep's own dir; its "run_dir" is where it was found.
    if roots is None:
        roots = [Path(cfg.sweep.resume_dir), Path(HydraConfig.get().sweep.dir)]
    want = config_key(OmegaConf.to_container(cfg, resolve=True))
    paths = {p.resolve() for root in roots if Path(root).is_dir() for p in Path(root).rglob("summary.json")}
    found = []
    for p in paths:
        entry = _success(p)
        if entry and entry[0] == want and (world_size is None or entry[1] == world_size):
            found.append((not entry[2], p.stat().st_mtime_ns, p))  # originals first, then the newest
    if not found:
        return None
    path = max(found)[2]
    summary = RunSummary.read(path)
    return summary.replace(run_dir=summary.reused_from or str(path.parent))


def reuse_previous_success(cfg: DictConfig, run_dir: Path, world_size: int) -> RunSummary | None:
    # sweep.resume=true in a -m sweep: a job whose config already succeeded is not run again. Its dir in
    # this sweep gets config.yaml and a summary.json that points at the earlier run (reused_from), so the
    # report rebuilt from disk covers every job.
    if HydraConfig.get().mode != RunMode.MULTIRUN or not cfg.sweep.resume:
        return None
    prev = find_previous_success(cfg, world_size)
    if prev is None:
        return None
    origin = prev.run_dir
    summary = prev.replace(reused_from=origin, choices=dict(cfg.get("choices") or {}))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if Path(origin).resolve() != run_dir.resolve():
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    summary.write(run_dir)
    loss = summary.final_loss
    detail = f"final loss {loss:.4f}" if isinstance(loss, float) else "done"
    print(f"shardlab: ok (reused): {run_dir}: same config already ran in {origin}, {detail}", flush=True)
    return summary


def swept_keys(sweep_dir: Path) -> set[str] | None:
    # The override keys this sweep varies: hydra.sweeper.params (presets) and the command line's
    # comma lists, as Hydra's BasicSweeper combines them (a later value for a key replaces an earlier).
    try:
        hydra = yaml.safe_load((Path(sweep_dir) / "multirun.yaml").read_text())["hydra"]
        params = (hydra.get("sweeper") or {}).get("params") or {}
        overrides = [f"{k}={v}" for k, v in params.items()] + list(hydra["overrides"]["task"])
        parsed = OverridesParser.create().parse_overrides(overrides)
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError, HydraException):
        return None  # another sweeper's layout: the job is named by all its overrides instead
    last = {o.get_key_element(): o.is_sweep_override() for o in parsed}
    return {k for k, swept in last.items() if swept}


def job_name(hc) -> str:
    # "strategy=ddp,precision=fp32": this job's values of what the sweep varies.
    swept = swept_keys(Path(hc.sweep.dir))
    try:
        overrides = OverridesParser.create().parse_overrides(list(hc.overrides.task))
    except HydraException:
        overrides = []
    mine = [
        f"{o.get_key_element()}={o.get_value_element_as_str()}"
        for o in overrides
        if swept and o.get_key_element() in swept
    ]
    return ",".join(mine) or hc.job.override_dirname or f"job-{hc.job.num}"


def sweep_group(sweep_dir: str) -> str:
    path = Path(sweep_dir).absolute()
    try:
        name = str(path.relative_to(Path.cwd()))
    except ValueError:
        name = str(path)
    return name[-128:]  # wandb's limit on a group name


def fill_sweep_logger(cfg: DictConfig, hc=None) -> None:
    # One wandb run per job, grouped by sweep, named by its overrides, tagged with its choices. A value
    # the user set (logger.group, logger.run_name, logger.tags) is kept as it is.
    hc = hc or HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    logger = cfg.logger
    if logger.get("group") is None:
        logger.group = sweep_group(hc.sweep.dir)
    if logger.get("run_name") is None:
        logger.run_name = job_name(hc)
    if not logger.get("tags"):
        logger.tags = [f"{group}={option}" for group, option in (cfg.get("choices") or {}).items()]


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.failed = 0

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        # launcher.main has printed the job's one line. A task that raised (main.py turns every failure
        # into a result, so only a bug or an interrupt gets here) ends the sweep in Hydra: report first.
        if config.hydra.mode != RunMode.MULTIRUN:
            return  # Hydra calls this after a single run too
        if job_return is None or job_return.status != JobStatus.COMPLETED:
            self.failed += 1
            error = getattr(job_return, "_return_value", None)
            print(f"shardlab: failed: {config.hydra.runtime.output_dir}: {error!r}", flush=True)
            self._report(Path(config.hydra.sweep.dir))
        elif not isinstance(job_return.return_value, RunSummary) or not job_return.return_value.ok:
            self.failed += 1

    def _report(self, sweep_dir: Path) -> list[dict] | None:
        try:
            return build_report(sweep_dir)
        except Exception as e:  # Hydra would turn this into a warning and exit 0
            print(f"shardlab: error: no report for {sweep_dir}: {type(e).__name__}: {e}", flush=True)
            return None

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = self._report(sweep_dir)
        if rows is None:
            raise SystemExit(1)
        text = (sweep_dir / "report.md").read_text()
        print("\n" + text.split("\n## ")[0].rstrip() + "\n", flush=True)
        failed = sum(r["status"] == "failed" for r in rows)
        reused = sum(r["status"] == "reused" for r in rows)
        print(
            f"shardlab: sweep {sweep_dir}: {len(rows) - failed} ok"
            + (f" ({reused} reused)" if reused else "")
            + f", {failed} failed; report in {sweep_dir / 'report.md'} (.csv, .png)",
            flush=True,
        )
        if failed or self.failed:
            raise SystemExit(1)
