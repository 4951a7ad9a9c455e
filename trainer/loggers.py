"""Where metric rows go: metrics.jsonl and summary.json always, plus wandb or TensorBoard if asked.

Only rank 0 writes; on other ranks every method does nothing, so the loop never checks the rank.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.config import one_of
from trainer.paths import as_shared


def _jsonable(value):
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "item"):  # one-element tensors, numpy scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass  # more than one element: falls through to str()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _scalars(row: Mapping) -> dict[str, float]:
    # Backends that only take numbers get the numeric entries; None, strings, etc. are skipped.
    out = {}
    for k, v in row.items():
        v = _jsonable(v)
        if isinstance(v, numbers.Real):
            out[k] = float(v)
    return out


def write_json_atomic(path: Path, obj) -> None:
    # Serialise first, then write a temp file beside the target and rename over it: a reader (or a
    # crash) sees the old file or the new one, never half of one.
    text = json.dumps(_jsonable(obj), indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        as_shared(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Wandb:
    def __init__(self, cfg: Mapping, run_dir: Path, run_config: dict):
        import wandb  # imported only when chosen

        # A WANDB_MODE the user exported beats the config (wandb itself lets the init argument win).
        mode = os.environ.get("WANDB_MODE") or cfg.get("mode") or "offline"
        self.run = wandb.init(
            dir=str(run_dir),
            project=cfg.get("project") or "shardlab",
            group=cfg.get("group"),
            name=cfg.get("run_name"),
            tags=list(cfg.get("tags") or []),
            config=run_config,
            mode=mode,
        )

    def log(self, row: dict, step: int) -> None:
        self.run.log(_jsonable(row), step=step)

    def summary(self, summary: dict) -> None:
        self.run.summary.update(_jsonable(summary))

    def samples(self, rows: list[dict], step: int) -> None:
        import wandb

        table = wandb.Table(columns=["step", "prompt", "continuation"])
        for r in rows:
            table.add_data(step, r["prompt"], r["continuation"])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoard:
    def __init__(self, cfg: Mapping, run_dir: Path, run_config: dict):
        from torch.utils.tensorboard import SummaryWriter  # imported only when chosen

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(_jsonable(run_config), indent=2) + "\n```")

    def log(self, row: dict, step: int) -> None:
        for k, v in _scalars(row).items():
            if k != "step":
                self.writer.add_scalar(k, v, global_step=step)

    def samples(self, rows: list[dict], step: int) -> None:
        text = "\n\n".join(f"**{r['prompt']}**{r['continuation']}" for r in rows)
        self.writer.add_text("samples", text, global_step=step)

    def summary(self, summary: dict) -> None:
        step = summary.get("steps") or 0
        for k, v in _scalars(summary).items():
            self.writer.add_scalar(f"summary/{k}", v, global_step=step)
        table = "\n".join(f"| {k} | {_jsonable(v)} |" for k, v in summary.items())
        self.writer.add_text("summary", "| key | value |\n|---|---|\n" + table, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


BACKENDS = {"none": None, "wandb": _Wandb, "tensorboard": _TensorBoard}


def keep_rows_up_to(path: Path, step: int) -> None:
    # A run that resumes at `step` in its own directory (an elastic restart, resume=auto) drops the rows
    # logged after that step by the attempt that died, so each step appears once; a fresh start keeps none.
    if not path.exists():
        return
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if r.strip() and _row_step(r) <= step]
    if len(kept) == len(rows):
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(kept)
    as_shared(tmp)
    os.replace(tmp, path)


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:  # a line cut short when the previous attempt was killed
        return math.inf


class Loggers:
    def __init__(self, run_dir: Path, backend=None, enabled: bool = True, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._backend = backend
        if enabled:
            keep_rows_up_to(self.run_dir / "metrics.jsonl", start_step)
        # Line-buffered append: each row reaches the file as it is logged, and a resumed run adds to it.
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1) if enabled else None

    def log(self, row: dict, step: int) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(_jsonable(row)) + "\n")
        if self._backend is not None:
            self._backend.log(row, step)

    def samples(self, rows: list[dict], step: int) -> None:
        # eval.samples' texts: samples.jsonl (a row each, with its step) and the backend.
        if not self.enabled:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, **r}) + "\n" for r in rows)
        if self._backend is not None:
            self._backend.samples(rows, step)

    def summary(self, summary) -> None:
        # summary: the run's RunSummary (trainer/summary.py), written as summary.json and given to the backend.
        if not self.enabled:
            return
        summary.write(self.run_dir)
        if self._backend is not None:
            self._backend.summary(summary.to_json())

    def close(self) -> None:
        if not self.enabled or self._jsonl is None:
            return
        self._jsonl.close()
        self._jsonl = None
        if self._backend is not None:
            self._backend.close()


def build_loggers(logger_cfg, run_dir: Path, run_config: dict, rank: int, start_step: int = 0) -> Loggers:
    cfg = (
        OmegaConf.to_container(logger_cfg, resolve=True) if isinstance(logger_cfg, DictConfig) else logger_cfg
    )
    cfg = dict(cfg or {})
    name = cfg.get("name") or "none"
    one_of("logger", name, BACKENDS)
    run_dir = Path(run_dir)
    if rank != 0:
        return Loggers(run_dir, enabled=False)
    if isinstance(run_config, DictConfig):
        run_config = OmegaConf.to_container(run_config, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    backend_cls = BACKENDS[name]
    backend = backend_cls(cfg, run_dir, run_config) if backend_cls is not None else None
    return Loggers(run_dir, backend, start_step=start_step)
