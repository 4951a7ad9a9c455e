import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers.wandb import read_wandb_run
from trainer import loggers as loggers_mod
from trainer.loggers import build_loggers
from trainer.summary import RunSummary

ROWS = [
    {"step": 1, "loss": 4.0, "tokens_per_s": None, "mfu": None, "lr": 1e-3, "note": "warm-up"},
    {"step": 2, "loss": 3.5, "tokens_per_s": 1234.5, "mfu": None, "lr": torch.tensor(2e-3), "note": None},
]
SUMMARY = RunSummary(steps=2, tokens_per_s_median=1234.5, mfu=None, device_name="cpu", final_loss=3.5)


# wandb must never reach the network or write outside tmp_path: conftest's fixture, for every test here.
pytestmark = pytest.mark.usefixtures("wandb_offline")


def log_all(lg) -> None:
    for row in ROWS:
        lg.log(row, step=row["step"])
    lg.summary(SUMMARY)
    lg.close()


def test_jsonl_rows_and_atomic_summary(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    lg = build_loggers(OmegaConf.create({"name": "none"}), run_dir, {}, rank=0)
    log_all(lg)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [4.0, 3.5]
    assert rows[0]["tokens_per_s"] is None and rows[0]["note"] == "warm-up"
    assert rows[1]["lr"] == pytest.approx(2e-3)  # a 0-d tensor became a number
    assert json.loads((run_dir / "summary.json").read_text()) == SUMMARY.to_json()  # the whole file
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "summary.json"]

    # A failure while replacing leaves the previous summary whole and no temp file behind.
    lg = build_loggers({"name": "none"}, run_dir, {}, rank=0)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(loggers_mod.os, "replace", fail)
    with pytest.raises(OSError):
        lg.summary(SUMMARY.replace(steps=99))
    lg.close()
    assert json.loads((run_dir / "summary.json").read_text()) == SUMMARY.to_json()  # the whole file
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "summary.json"]


def test_unknown_logger_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="none, wandb, tensorboard"):
        build_loggers({"name": "mlflow"}, tmp_path, {}, rank=0)


def test_rank_one_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    for name in ("none", "wandb", "tensorboard"):
        log_all(build_loggers({"name": name}, run_dir, {"a": 1}, rank=1))
    assert not run_dir.exists()


def test_wandb_offline_run_holds_rows_and_summary(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = {"name": "wandb", "project": "shardlab-test", "mode": "online", "group": "g1", "run_name": "r1"}
    cfg["tags"] = ["cpu", "test"]
    # mode: online in the config, WANDB_MODE=offline in the environment: the environment wins.
    lg = build_loggers(cfg, run_dir, {"model": {"dim": 64}, "precision": "fp32"}, rank=0)
    log_all(lg)

    [run_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # wandb's own service process writes the file; on a loaded machine its last writes can land a moment after
    # finish() has returned (seen once in several suites: no run record yet), so read until it is whole.
    deadline = time.monotonic() + 10
    while True:
        found = read_wandb_run(run_file)
        run, history, summary = found["run"], found["history"], found["summary"]
        if (run is not None and "tokens_per_s_median" in summary) or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    assert run is not None, f"no run record in {run_file}"
    assert run.project == "shardlab-test" and run.run_group == "g1" and run.display_name == "r1"
    assert list(run.tags) == ["cpu", "test"]
    config = found["config"]
    assert config["model"] == {"dim": 64}
    assert history[1]["loss"] == 4.0 and history[1]["note"] == "warm-up"
    assert history[2]["loss"] == 3.5 and history[2]["tokens_per_s"] == 1234.5
    assert history[2]["lr"] == pytest.approx(2e-3)
    assert summary["tokens_per_s_median"] == 1234.5 and summary["device_name"] == "cpu"
    assert summary["mfu"] is None
    assert json.loads((run_dir / "summary.json").read_text()) == SUMMARY.to_json()  # the whole file


def test_tensorboard_event_files_hold_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    log_all(build_loggers({"name": "tensorboard"}, run_dir, {"model": {"dim": 64}}, rank=0))

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 4.0), (2, 3.5)]
    assert [e.step for e in acc.Scalars("tokens_per_s")] == [2]  # None was skipped, not logged
    assert "note" not in scalars and "mfu" not in scalars
    assert acc.Scalars("summary/tokens_per_s_median")[0].value == pytest.approx(1234.5)
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "summary.json").exists()
