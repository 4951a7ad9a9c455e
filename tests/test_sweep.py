# -m sweeps through the real CLI: every job a real 2-process run on CPU, one report (md, csv, png) per
# sweep checked against each job's summary.json, failures as rows, resume, wandb/TensorBoard per job.
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, assert_png, cli_env, csv_rows, md_rows
from wandb_reader import read_wandb_run

# The `make sweep` preset, cut to a few seconds a job: 2 processes, model=debug, 512 tokens a step.
SMALL = (
    "+sweep=cpu",
    "attention=sdpa",
    "trainer.max_steps=6",
    "metrics.warmup_steps=2",
    "trainer.log_every=3",
)


def sweep_env(tmp: Path) -> dict:
    env = cli_env()
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp / "wandb-home" / var.lower())
    env.pop("WANDB_API_KEY", None)
    env["WANDB_CONSOLE"] = "off"
    return env


def start_sweep(sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.Popen(
        args,
        cwd=REPO,
        env=sweep_env(sweep_dir.parent),
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


def summary_of(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def started(out: str) -> int:
    return out.count("shardlab: run directory ")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    # strategy x precision, 2 processes a job, logged to wandb (offline): the sweep the other tests reuse.
    sweep_dir = tmp_path_factory.mktemp("grid") / "sweep"
    code, out = run_sweep(sweep_dir, *SMALL, "strategy=ddp,fsdp", "precision=fp32,bf16-mixed", "logger=wandb")
    return sweep_dir, code, out


@pytest.mark.slow
def test_grid_report_rows_match_each_job_summary(grid):
    sweep_dir, code, out = grid
    assert code == 0, out
    assert started(out) == 4 and out.count("shardlab: ok: ") == 4
    rows = csv_rows(sweep_dir)
    assert len(rows) == 4
    assert {(r["strategy"], r["precision"]) for r in rows} == set(
        itertools.product(["ddp", "fsdp"], ["fp32", "bf16-mixed"])
    )
    for r in rows:
        s = summary_of(r["run_dir"])
        assert Path(r["run_dir"]).parent == sweep_dir
        assert r["status"] == "ok" and s["status"] == "ok"
        assert (r["strategy"], r["precision"]) == (s["choices"]["strategy"], s["choices"]["precision"])
        assert int(r["world_size"]) == s["world_size"] == 2
        for col, key in [
            ("tokens_per_s_median", "tokens_per_s_median"),
            ("tokens_per_s_p10", "tokens_per_s_p10"),
            ("tokens_per_s_p90", "tokens_per_s_p90"),
            ("tokens_per_s_per_device", "tokens_per_s_per_device"),
            ("tflops_per_device", "tflops_per_device"),
            ("peak_mem_gb", "peak_rss_gb_max"),
            ("final_loss", "final_loss"),
        ]:
            assert float(r[col]) == s[key], col
        assert r["mfu"] == "" and s["mfu"] is None  # CPU: no peak, so no MFU rather than a wrong one
        assert int(r["tokens_per_step"]) == s["tokens_per_step"] == 8 * 64
    medians = [float(r["tokens_per_s_median"]) for r in rows]
    assert medians == sorted(medians, reverse=True)  # best on top

    md = (sweep_dir / "report.md").read_text()
    table = md_rows(sweep_dir)
    assert len(table) == 4
    for line, r in zip(table, rows, strict=True):
        assert f"`{r['run_dir']}`" in line and f"| {r['strategy']} | {r['precision']} |" in line
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
        assert run["run"].run_group == str(sweep_dir)
        assert run["run"].display_name == f"strategy={r['strategy']},precision={r['precision']}"
        tags = set(run["run"].tags)
        assert {f"strategy={r['strategy']}", f"precision={r['precision']}", "model=debug"} <= tags
        assert (
            run["config"]["model"]["name"] == "debug"
            and run["config"]["strategy"]["name"] == s["choices"]["strategy"]
        )
        assert run["history"][6]["loss"] == s["final_loss"]
        assert run["summary"]["tokens_per_s_median"] == s["tokens_per_s_median"]
        assert run["summary"]["final_loss"] == s["final_loss"] and run["summary"]["status"] == "ok"


@pytest.mark.slow
def test_resume_reruns_nothing_that_succeeded(grid, tmp_path):
    grid_dir, code, _ = grid
    assert code == 0
    # One new cell (hsdp) beside two the grid ran; a different logger does not make a different job.
    grid_jobs = {r["strategy"]: r["run_dir"] for r in csv_rows(grid_dir) if r["precision"] == "fp32"}
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
            == summary_of(grid_jobs[strategy])["tokens_per_s_median"]
        )
    assert rows["hsdp"]["status"] == "ok" and Path(rows["hsdp"]["run_dir"]).parent == second
    assert sum("| ok (reused) |" in line for line in md_rows(second)) == 2

    # The same sweep again, searching the second sweep's dir: nothing runs, every row is reused and
    # points at the run that really did the work.
    third = tmp_path / "third"
    code, out = run_sweep(third, *again, f"sweep.resume_dir={second}")
    assert code == 0, out
    assert started(out) == 0 and out.count("shardlab: ok (reused): ") == 3
    rows = {r["strategy"]: r for r in csv_rows(third)}
    assert {s: r["status"] for s, r in rows.items()} == {"ddp": "reused", "fsdp": "reused", "hsdp": "reused"}
    assert rows["ddp"]["run_dir"] == grid_jobs["ddp"] and Path(rows["hsdp"]["run_dir"]).parent == second


def spawned_workers(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:  # exited meanwhile
            continue
    return out


def kill_a_worker_of(proc: subprocess.Popen, job_started: threading.Event) -> None:
    # SIGKILL one rank (the first spawned: rank 0) once both are up: what the kernel's OOM killer does.
    job_started.wait(120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = spawned_workers(proc.pid)
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
    assert summary_of(sweep_dir / "2")["status"] == "failed"
    table = md_rows(sweep_dir)
    assert len(table) == 4 and sum("| failed: " in line for line in table) == 3
    assert "model.n_heads (3)" in table[1] and "SIGKILL" in "".join(table)
    assert_png(sweep_dir / "report.png")

    # TensorBoard got the finished job's scalars, as wandb would have.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sweep_dir / "0" / "tensorboard"))
    acc.Reload()
    s = summary_of(sweep_dir / "0")
    assert acc.Scalars("loss")[-1].step == 6 and acc.Scalars("loss")[-1].value == pytest.approx(
        s["final_loss"]
    )
    assert acc.Scalars("summary/tokens_per_s_median")[0].value == pytest.approx(s["tokens_per_s_median"])
