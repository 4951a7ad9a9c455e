# -m sweeps through the real CLI (launch style 3): every job a real 2-process run on CPU in its own dir, one
# report (md, csv, png) per sweep checked against each job's summary.json, failures as rows, resume,
# wandb/TensorBoard per job. Each sweep runs from its own working directory, so a stray run dir would show.
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launcher.sweep import find_previous_success
from tests.helpers.cli import cli_env
from tests.helpers.cli import workers as helpers_workers
from tests.helpers.reports import assert_png, csv_rows, md_rows
from tests.helpers.run import REPO, compose_config
from tests.helpers.wandb import read_wandb_run
from trainer.summary import RunSummary

# The `make sweep` preset, cut to a few seconds a job: 2 processes, model=debug, 512 tokens a step.
SMALL = (
    "+sweep=cpu",
    "attention=sdpa",
    "trainer.max_steps=6",
    "metrics.warmup_steps=2",
    "trainer.log_every=3",
)


def start_sweep(sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(
        args,
        cwd=sweep_dir.parent,
        env=cli_env(wandb_home=sweep_dir.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_sweep(sweep_dir: Path, *overrides: str, timeout: float = 240) -> tuple[int, str]:
    proc = start_sweep(sweep_dir, *overrides)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"sweep ran past {timeout} s:\n{proc.communicate()[0]}")
    return proc.returncode, out


def summary_of(run_dir: str) -> RunSummary | None:
    return RunSummary.read(Path(run_dir))


def started(out: str) -> int:
    return out.count("shardlab: run directory ")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    # Two strategies, 2 processes a job, logged to wandb (offline): the sweep the other tests reuse.
    sweep_dir = tmp_path_factory.mktemp("grid") / "sweep"
    code, out = run_sweep(sweep_dir, *SMALL, "strategy=ddp,fsdp", "precision=fp32", "logger=wandb")
    return sweep_dir, code, out


@pytest.mark.slow
def test_grid_report_rows_match_each_job_summary(grid):
    sweep_dir, code, out = grid
    assert code == 0, out
    assert started(out) == 2 and out.count("shardlab: ok: ") == 2
    # One dir per job under the sweep dir, nothing in the working directory's outputs/.
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (sweep_dir.parent / "outputs").exists()
    rows = csv_rows(sweep_dir)
    assert len(rows) == 2
    assert {r["strategy"] for r in rows} == {"ddp", "fsdp"}
    for r in rows:
        s = summary_of(r["run_dir"])
        assert Path(r["run_dir"]).parent == sweep_dir
        assert r["status"] == "ok" and s.status == "ok"
        assert r["strategy"] == s.choices["strategy"] and (s.choices["precision"]) == "fp32"
        assert int(r["world_size"]) == s.world_size == 2
        for col, key in [
            ("tokens_per_s_median", "tokens_per_s_median"),
            ("tokens_per_s_p10", "tokens_per_s_p10"),
            ("tokens_per_s_p90", "tokens_per_s_p90"),
            ("tokens_per_s_per_device", "tokens_per_s_per_device"),
            ("tflops_per_device", "tflops_per_device"),
            ("peak_mem_gb", "peak_rss_gb_max"),
            ("final_loss", "final_loss"),
            ("val_loss", "val_loss"),  # synthetic data: its held-out seed stream, evaluated at the end
        ]:
            assert float(r[col]) == getattr(s, key), col
        assert r["mfu"] == "" and s.mfu is None  # CPU: no peak, so no MFU rather than a wrong one
        assert int(r["tokens_per_step"]) == s.tokens_per_step == 8 * 64
    medians = [float(r["tokens_per_s_median"]) for r in rows]
    assert medians == sorted(medians, reverse=True)  # best on top

    md = (sweep_dir / "report.md").read_text()
    table = md_rows(sweep_dir)
    assert len(table) == 2
    for line, r in zip(table, rows, strict=True):
        assert f"`{r['run_dir']}`" in line and f"| {r['strategy']} |" in line
    assert f"**{float(rows[0]['tokens_per_s_median']):,.0f}**" in table[0]
    assert "same 512 tokens per optimizer step (global batch 8 x sequence length 64)" in md
    assert "first 2 steps of every job" in md and "never enter the throughput figures" in md
    assert "![tokens/s against peak memory](report.png)" in md
    assert_png(sweep_dir / "report.png")
    assert "Sweep report" in out and "report in " in out  # the table is printed at the end as well


@pytest.mark.slow
def test_grid_logs_one_wandb_run_per_job(grid):
    sweep_dir, code, out = grid
    assert code == 0, out
    for r in csv_rows(sweep_dir):
        run_dir = Path(r["run_dir"])
        [run_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # rank 0 only: one run per job
        run = read_wandb_run(run_file)
        s = summary_of(run_dir)
        assert run["run"].run_group == sweep_dir.name  # relative to the working directory the sweep ran in
        assert run["run"].display_name == f"strategy={r['strategy']}"
        tags = set(run["run"].tags)
        assert {f"strategy={r['strategy']}", "precision=fp32", "model=debug"} <= tags
        assert (
            run["config"]["model"]["name"] == "debug"
            and run["config"]["strategy"]["name"] == s.choices["strategy"]
        )
        assert run["history"][6]["loss"] == s.final_loss
        assert run["history"][6]["val_loss"] == s.val_loss and run["summary"]["best_val_loss"] == s.val_loss
        assert run["summary"]["tokens_per_s_median"] == s.tokens_per_s_median
        assert run["summary"]["final_loss"] == s.final_loss and run["summary"]["status"] == "ok"


@pytest.mark.slow
def test_resume_reruns_nothing_that_succeeded(grid, tmp_path):
    grid_dir, code, _ = grid
    assert code == 0
    # One new cell (hsdp) beside two the grid ran; a different logger does not make a different job.
    grid_jobs = {r["strategy"]: r["run_dir"] for r in csv_rows(grid_dir)}
    again = (*SMALL, "strategy=ddp,fsdp,hsdp", "precision=fp32", "sweep.resume=true")
    second = tmp_path / "second"
    code, out = run_sweep(second, *again, f"sweep.resume_dir={grid_dir}")
    assert code == 0, out
    assert started(out) == 1 and out.count("shardlab: ok (reused): ") == 2
    assert len(list(second.glob("*/metrics.jsonl"))) == 1
    rows = {r["strategy"]: r for r in csv_rows(second)}
    assert set(rows) == {"ddp", "fsdp", "hsdp"}
    for strategy in ("ddp", "fsdp"):
        assert rows[strategy]["status"] == "reused" and rows[strategy]["run_dir"] == grid_jobs[strategy]
        assert (
            float(rows[strategy]["tokens_per_s_median"])
            == summary_of(grid_jobs[strategy]).tokens_per_s_median
        )
    assert rows["hsdp"]["status"] == "ok" and Path(rows["hsdp"]["run_dir"]).parent == second
    assert sum("| ok (reused) |" in line for line in md_rows(second)) == 2

    # The same sweep again, searching the second sweep's dir, as each of its jobs would (in this process):
    # every job is found done, pointing at the run that really did the work, not at a reused row.
    for strategy in ("ddp", "fsdp", "hsdp"):
        cfg = compose_config(
            *SMALL, "precision=fp32", "sweep.resume=true", f"strategy={strategy}", tiny=False
        )
        found = find_previous_success(cfg, 2, roots=[second])
        origin = grid_jobs.get(strategy) or rows["hsdp"]["run_dir"]
        assert found is not None and found.run_dir == origin, (strategy, found)


def kill_a_worker_of(proc: subprocess.Popen, job_started: threading.Event) -> None:
    # SIGKILL one rank (the first spawned: rank 0) once both are up: what the kernel's OOM killer does.
    job_started.wait(120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = helpers_workers(proc.pid)
        if len(workers) >= 2:
            time.sleep(1.0)
            min(workers, key=lambda p: p.pid).send_signal(signal.SIGKILL)
            return
        time.sleep(0.1)


@pytest.mark.slow
def test_failures_are_rows_and_the_sweep_exits_nonzero(tmp_path):
    # Jobs 0/1: 6 steps with 4 or 3 heads (3 does not divide dim 128: refused before any worker starts);
    # job 2: 400 steps, one of its workers killed mid-run; job 3: 3 heads again.
    sweep_dir = tmp_path / "sweep"
    overrides = (*SMALL, "strategy=ddp", "precision=fp32", "logger=tensorboard")
    proc = start_sweep(sweep_dir, *overrides, "trainer.max_steps=6,400", "model.n_heads=4,3")
    seen = threading.Event()
    killer = threading.Thread(target=kill_a_worker_of, args=(proc, seen), daemon=True)
    killer.start()
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("shardlab: run directory") and line.rstrip().endswith(f"{sweep_dir}/2"):
            seen.set()
    proc.wait(timeout=60)
    out = "".join(out)
    assert proc.returncode == 1, out
    for job in (1, 2, 3):
        assert f"shardlab: failed: {sweep_dir}/{job}: " in out
    assert f"shardlab: ok: {sweep_dir}/0: " in out
    assert "1 ok, 3 failed" in out

    rows = {Path(r["run_dir"]).name: r for r in csv_rows(sweep_dir)}
    assert list(rows) == ["0", "1", "2", "3"]  # the finished job on top, then failures in job order
    assert rows["0"]["status"] == "ok" and float(rows["0"]["tokens_per_s_median"]) > 0
    for job in ("1", "3"):
        assert rows[job]["status"] == "failed"
        assert "model.n_heads (3)" in rows[job]["reason"] and "\n" not in rows[job]["reason"]
        assert rows[job]["tokens_per_s_median"] == ""
    assert rows["2"]["status"] == "failed" and "SIGKILL" in rows["2"]["reason"], rows["2"]
    assert summary_of(sweep_dir / "2").status == "failed"
    table = md_rows(sweep_dir)
    assert len(table) == 4 and sum("| failed: " in line for line in table) == 3
    assert "model.n_heads (3)" in table[1] and "SIGKILL" in "".join(table)
    assert_png(sweep_dir / "report.png")

    # TensorBoard got the finished job's scalars, as wandb would have.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sweep_dir / "0" / "tensorboard"))
    acc.Reload()
    s = summary_of(sweep_dir / "0")
    assert acc.Scalars("loss")[-1].step == 6 and acc.Scalars("loss")[-1].value == pytest.approx(s.final_loss)
    assert acc.Scalars("summary/tokens_per_s_median")[0].value == pytest.approx(s.tokens_per_s_median)
    assert acc.Scalars("val_loss")[-1].step == 6 and acc.Scalars("val_loss")[-1].value == pytest.approx(
        s.val_loss
    )
