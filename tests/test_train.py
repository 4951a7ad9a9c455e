# Training for real: the CLI end to end, gradient accumulation, the LR schedule, clipping, a run no longer
# than its warm-up, and one run directory per run (two at once: tests/test_launch.py).
import copy
import math
import re
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import launcher.compose
from models import build_model, build_model_args
from strategies import get_strategy
from tests.helpers.cli import run_cli
from tests.helpers.run import compose_config, read_rows, read_summary, train_in_process
from trainer.config import SCHEMAS
from trainer.data import SyntheticTokens, micro_batches
from trainer.dist import init_distributed
from trainer.loop import train_step
from trainer.optim import lr_lambda
from trainer.precision import build_precision

ROW_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_rss_gb")


def text_run(text_corpus: Path, *overrides: str) -> tuple[str, ...]:
    return ("data=text", f"data.path={text_corpus}", "data.glob=*.py", *overrides)


def test_cli_run_end_to_end(tmp_path):
    code, out, err = run_cli(
        tmp_path,
        "data=text",
        "trainer.max_steps=60",
        "trainer.global_batch_size=8",
        "trainer.seq_len=64",
        "trainer.log_every=10",
        "metrics.warmup_steps=3",
        "optim.lr=3e-3",
    )
    assert code == 0, err
    run_dir = tmp_path / "run"
    assert list(tmp_path.iterdir()) == [run_dir]  # one run, one directory
    assert f"shardlab: run directory {run_dir}" in out
    assert {p.name for p in run_dir.iterdir()} >= {".hydra", "config.yaml", "metrics.jsonl", "summary.json"}

    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text
    cfg = OmegaConf.create(text)
    assert cfg.run_dir == str(run_dir) and cfg.trainer.max_steps == 60
    assert cfg.data.path == sysconfig.get_paths()["stdlib"]

    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    for row in rows:
        assert all(row[k] is not None and math.isfinite(row[k]) for k in ROW_KEYS), row
        assert row["tokens_per_s"] > 0 and row["peak_rss_gb"] > 0

    s = read_summary(run_dir)
    assert s.status == "ok" and s.steps == 60 and s.world_size == 1
    assert s.tokens_per_s_median > 0
    assert s.tokens_per_s_per_device == s.tokens_per_s_median
    assert s.memory_kind == "cpu_peak_rss" and s.peak_rss_gb_max > 0
    assert s.final_loss == rows[-1]["loss"]
    assert set(s.choices) == set(SCHEMAS)
    assert s.choices["model"] == "debug" and s.choices["data"] == "text"
    assert s.mfu is None  # CPU: no peak to divide by, so no number rather than a wrong one
    # Bytes of Python source are far from uniform: the loss must fall well below ln(256) = 5.55.
    assert s.first_loss > 5.0
    assert s.final_loss < s.first_loss - 1.5

    for label in ("tokens/s (global, median)", "tokens/s per device", "peak RSS", "final loss"):
        assert label in out
    assert re.search(rf"shardlab: ok: {re.escape(str(run_dir))}: final loss \d", out)
    assert "Traceback" not in err


def test_gradient_accumulation_matches_one_big_batch(tmp_path, one_thread, text_corpus):
    common = text_run(
        text_corpus,
        "trainer.global_batch_size=8",
        "trainer.max_steps=5",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
    )
    accum = train_in_process(compose_config(*common, "trainer.micro_batch_size=2"), tmp_path / "accum")
    whole = train_in_process(compose_config(*common, "trainer.micro_batch_size=8"), tmp_path / "whole")
    assert (accum.micro_batch_size, accum.grad_accum_steps) == (2, 4)
    assert (whole.micro_batch_size, whole.grad_accum_steps) == (8, 1)
    a, w = read_rows(tmp_path / "accum"), read_rows(tmp_path / "whole")
    assert len(a) == len(w) == 5
    for ra, rw in zip(a, w, strict=True):
        assert ra["loss"] == pytest.approx(rw["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rw["grad_norm"], rel=1e-5)
    assert a[-1]["loss"] < a[0]["loss"]  # and the trajectory is one that learns


def test_warmup_then_cosine_schedule(tmp_path, one_thread):
    lr, warmup, steps, floor = 1e-3, 3, 10, 0.1
    cfg = compose_config(
        f"trainer.max_steps={steps}",
        f"optim.lr={lr}",
        f"optim.warmup_steps={warmup}",
        f"optim.min_lr_ratio={floor}",
    )
    train_in_process(cfg, tmp_path / "run")
    got = [r["lr"] for r in read_rows(tmp_path / "run")]  # the lr each optimizer step used
    assert got[0] == pytest.approx(lr / warmup)  # first update: 1/warmup of the peak, not 0
    assert got[warmup - 1] == pytest.approx(lr)  # end of warm-up: the peak
    assert got[warmup] == pytest.approx(lr)  # cosine starts from the peak
    # The last update is 1/7 of the way from the end of the cosine; it reaches the floor at max_steps.
    assert got[-1] == pytest.approx(lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 6 / 7))))
    assert lr_lambda(steps, warmup, steps, floor) == pytest.approx(floor)
    assert lr_lambda(10 * steps, warmup, steps, floor) == pytest.approx(floor)  # and stays there
    assert got[:warmup] == sorted(got[:warmup]) and got[warmup:] == sorted(got[warmup:], reverse=True)
    assert all(lr * floor < x <= lr for x in got[warmup:])


def test_warmup_zero_starts_at_the_peak():
    assert lr_lambda(0, 0, 10, 0.1) == pytest.approx(1.0)
    assert lr_lambda(5, 0, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_clipping_reports_the_pre_clip_norm_and_clips(one_thread, clip):
    torch.manual_seed(0)
    model = build_model(build_model_args("debug"))
    model.init_weights(0)
    ref = copy.deepcopy(model)
    x, y = next(micro_batches(SyntheticTokens(256, 32, 0), 1, 0, 1, 4, 1))
    F.cross_entropy(ref(x).flatten(0, 1), y.flatten()).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    assert norm > 0.05  # the clip below does bite

    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)  # so the update is exactly the (clipped) gradient
    env = init_distributed("cpu")
    fp32 = build_precision("fp32", env.device)
    _, reported = train_step(model, sgd, [(x, y)], fp32, env, get_strategy("single"), 1, clip)
    assert float(reported) == pytest.approx(float(norm), rel=1e-5)  # the norm before clipping
    after = [p.detach() for p in model.parameters()]
    step = torch.linalg.vector_norm(torch.stack([(b - a).norm() for b, a in zip(before, after, strict=True)]))
    assert float(step) == pytest.approx(clip if clip else float(norm), rel=1e-4)


def test_run_dir_resolver_never_reuses_a_directory(tmp_path, monkeypatch):
    # Two runs in one second: the second gets a suffix instead of the first's directory.
    made = []
    for _ in range(3):
        monkeypatch.setattr(launcher.compose, "_run_dir", None)  # a fresh process
        made.append(launcher.compose._new_run_dir(str(tmp_path)))
    assert len(set(made)) == 3 and all(Path(d).is_dir() for d in made)


def test_a_run_no_longer_than_its_warm_up_runs_and_says_so(tmp_path, one_thread):
    # `python train.py trainer.max_steps=3` with the default 3 warm-up steps: it trains, and the summary says
    # why it has no throughput instead of the run being refused.
    summary = train_in_process(compose_config("trainer.max_steps=2", "metrics.warmup_steps=3"), tmp_path)
    assert summary.status == "ok" and summary.steps == 2 and summary.warmup_steps == 2
    assert summary.tokens_per_s_median is None and summary.mfu is None
    assert (
        "no step was measured: all 2 steps were warm-up (metrics.warmup_steps=3)" in summary.throughput_note
    )
    assert [r["step"] for r in read_rows(tmp_path)] == [1, 2]
