# -m sweeps through the real CLI: every job a real 2-process run on CPU, one report (md, csv, png) per
# sweep checked against each job's summary.json, failures as rows, resume, wandb/TensorBoard per job.
import csv
import itertools
import json
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import REPO, cli_env, compose_config
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf
from wandb_reader import read_wandb_run

from launcher import report
from launcher.compose import config_dir, setup_hydra
from launcher.elastic import resolve_nproc
from launcher.sweep import config_key, fill_sweep_logger, swept_keys
from trainer.checks import validate

# The `make sweep` preset, cut to a few seconds a job: 2 processes, model=debug, 512 tokens a step.
SMALL = (
    "+sweep=cpu",
    "attention=sdpa",
    "trainer.max_steps=6",
    "metrics.warmup_steps=2",
    "trainer.log_every=3",
)
PRESETS = sorted(p.stem for p in (Path(config_dir()) / "sweep").glob("*.yaml"))


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


def csv_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def md_rows(sweep_dir: Path) -> list[str]:
    lines = (sweep_dir / "report.md").read_text().splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith("| #")]


def summary_of(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (height, width)


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


# ---------------------------------------------------------------- presets, composed (no training)
def compose_with_hydra(*overrides: str):
    setup_hydra()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_cell_validates(preset):
    # +sweep=<preset> together with sweep.resume=true; then every cell of its grid passes the checks
    # launcher.main runs before starting workers, at the world size the preset asks for.
    cfg = compose_with_hydra(f"+sweep={preset}", "sweep.resume=true")
    assert cfg.sweep.resume is True and cfg.sweep.resume_dir == "multirun"
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params and all(len(v) > 1 for v in params.values())
    assert set(params.get("precision", [])) <= {"fp32", "bf16-mixed"}
    for cell in itertools.product(*params.values()):
        cell_cfg = compose_config(
            f"+sweep={preset}", *(f"{k}={v}" for k, v in zip(params, cell, strict=True)), tiny=False
        )
        world = resolve_nproc(cell_cfg.launcher.nproc_per_node) * cell_cfg.launcher.nnodes
        if cell_cfg.strategy.name != "single":
            assert world > 1, f"{preset}: {cell} runs a multi-rank strategy on one process"
        validate(cell_cfg, world, "cpu")


def test_cpu_preset_is_sized_for_make_sweep():
    cfg = compose_config("+sweep=cpu", tiny=False)
    params = compose_with_hydra("+sweep=cpu").hydra.sweeper.params
    jobs = 1
    for v in params.values():
        jobs *= len(str(v).split(","))
    assert 8 <= jobs <= 12 and cfg.model.name == "debug" and cfg.data.name == "synthetic"
    assert cfg.launcher.nproc_per_node == "2" and cfg.trainer.max_steps <= 30 and cfg.trainer.seq_len <= 64


# ---------------------------------------------------------------- the pieces, in-process
def test_config_key_ignores_where_and_how_a_job_runs():
    base = OmegaConf.to_container(compose_config("strategy=ddp"), resolve=True)
    moved = json.loads(json.dumps(base))
    moved.update(run_dir="/elsewhere", choices={}, sweep={"resume": True, "resume_dir": "x"})
    moved["launcher"]["nproc_per_node"] = "4"
    moved["logger"]["name"] = "wandb"
    moved["trainer"]["progress_bar"] = not moved["trainer"]["progress_bar"]
    assert config_key(moved) == config_key(base)
    moved["optim"]["lr"] = 1e-3
    assert config_key(moved) != config_key(base)


def test_fill_sweep_logger_keeps_what_the_user_set(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    multirun = {
        "hydra": {
            "sweeper": {"params": {"strategy": "ddp,fsdp"}},
            "overrides": {"task": ["+sweep=cpu", "precision=fp32,bf16-mixed", "strategy=ddp"]},
        }
    }
    (sweep_dir / "multirun.yaml").write_text(json.dumps(multirun))  # JSON is YAML
    assert swept_keys(sweep_dir) == {
        "precision"
    }  # the command line's strategy=ddp replaced the preset's axis
    hc = SimpleNamespace(
        mode=RunMode.MULTIRUN,
        sweep=SimpleNamespace(dir=str(sweep_dir)),
        overrides=SimpleNamespace(task=["strategy=ddp", "precision=bf16-mixed", "+sweep=cpu"]),
        job=SimpleNamespace(override_dirname="unused", num=1),
    )
    cfg = compose_config("logger=wandb", "strategy=ddp", "precision=bf16-mixed")
    fill_sweep_logger(cfg, hc)
    assert cfg.logger.group == str(sweep_dir) and cfg.logger.run_name == "precision=bf16-mixed"
    assert "strategy=ddp" in cfg.logger.tags and "precision=bf16-mixed" in cfg.logger.tags

    cfg = compose_config("logger=wandb", "logger.group=mine", "logger.run_name=me", "logger.tags=[a]")
    fill_sweep_logger(cfg, hc)
    assert (cfg.logger.group, cfg.logger.run_name, list(cfg.logger.tags)) == ("mine", "me", ["a"])
    hc.mode = RunMode.RUN
    cfg = compose_config("logger=wandb")
    fill_sweep_logger(cfg, hc)  # a single run is left alone
    assert cfg.logger.group is None and cfg.logger.run_name is None


def fake_job(job_dir: Path, summary: dict | None, overrides: list[str], batch=8, seq_len=64, steps=None):
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    config = {
        "trainer": {"global_batch_size": batch, "seq_len": seq_len, "max_steps": 20},
        "metrics": {"warmup_steps": 3},
    }
    (job_dir / "config.yaml").write_text(json.dumps(config))
    if steps:
        (job_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))
    if summary is not None:
        (job_dir / "summary.json").write_text(json.dumps({"run_dir": str(job_dir), **summary}))


def ok_summary(tps: float, mem: float, loss: float, tokens_per_step: int = 512) -> dict:
    return {
        "status": "ok", "steps": 20, "warmup_steps": 3, "world_size": 2, "tokens_per_step": tokens_per_step,
        "tokens_per_s_median": tps, "tokens_per_s_p10": tps * 0.9, "tokens_per_s_p90": tps * 1.1,
        "tokens_per_s_per_device": tps / 2, "tflops_per_device": tps * 1e-6, "mfu": None,
        "memory_kind": "cpu_peak_rss", "peak_rss_gb_max": mem, "final_loss": loss,
    }  # fmt: skip


def test_report_from_disk_flags_unequal_work_and_names_failures(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_job(sweep / "0", ok_summary(1000.0, 0.5, 5.0), ["trainer.seq_len=64"])
    fake_job(sweep / "1", ok_summary(3000.0, 0.9, 4.9, 1024), ["trainer.seq_len=128"], seq_len=128)
    oom = {
        "status": "failed",
        "error": "rank 1 failed (exit code 1): torch.OutOfMemoryError: CUDA out of memory.",
    }
    fake_job(sweep / "2", oom, ["trainer.seq_len=4096"], seq_len=4096, steps=[10, 12])
    fake_job(sweep / "10", None, ["trainer.seq_len=256"], seq_len=256)  # killed before any summary

    assert report.main([str(sweep)]) == 0
    assert "report of 4 jobs (2 failed)" in capsys.readouterr().out
    rows = csv_rows(sweep)
    assert [r["trainer.seq_len"] for r in rows] == ["128", "64", "4096", "256"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert rows[2]["reason"] == "out of memory after step 12"
    assert rows[3]["reason"].startswith("no summary.json")
    md = (sweep / "report.md").read_text()
    assert "**Unequal work:**" in md.split("| #")[0]  # above the table, not in a footnote
    assert "(512, 1,024, 2,048, 32,768)" in md and "| tokens/step |" in md
    table = md_rows(sweep)
    assert "**3,000**" in table[0] and "**4.9000**" in table[0] and "**0.500**" in table[1]  # best per column
    assert "failed: out of memory after step 12" in table[2]
    assert_png(sweep / "report.png")
    assert report.main([str(tmp_path / "nothing")]) == 2
