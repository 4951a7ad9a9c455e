# SLURM through Hydra's submitit launcher, against the real single-node scheduler .ci/local_slurm.sh starts
# (slurmctld, slurmd, slurmdbd): sweeps, jobs killed hard, preemption with requeue and exact resume, two tasks
# standing in for two nodes, a printed sbatch script, and bad input refused before anything is submitted.
# Without `sinfo` these tests skip; with SHARDLAB_REQUIRE_SLURM=1 (CI) they fail instead.
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import psutil
import pytest

from tests.helpers.cli import cli_env, finish, start, workers
from tests.helpers.run import REPO, TINY
from trainer.summary import RunSummary

HAVE_SLURM = shutil.which("sinfo") is not None and (
    subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
)
if not HAVE_SLURM and os.environ.get("SHARDLAB_REQUIRE_SLURM") == "1":
    raise RuntimeError(
        "SHARDLAB_REQUIRE_SLURM=1 but no SLURM answers sinfo: run `bash .ci/local_slurm.sh` first"
    )
needs_slurm = pytest.mark.skipif(
    not HAVE_SLURM, reason="no SLURM here (sinfo): bash .ci/local_slurm.sh starts one"
)

# Each job: one CPU per task, so two tasks (or two one-task jobs) run at once on the two-core node.
SUBMITIT = (
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=10",
)


def sweep(tmp_path: Path, *overrides: str, env: dict | None = None):
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "train.py", "-m", *TINY, *SUBMITIT, f"hydra.sweep.dir={sweep_dir}", *overrides]
    return start(args, env=env), sweep_dir


def rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "report.csv") as f:
        return list(csv.DictReader(f))


def summary(run_dir: Path) -> RunSummary | None:
    return RunSummary.read(run_dir)


def wait_for(what, timeout: float = 120, every: float = 0.2, explain=lambda: ""):
    # explain: what to add to the failure (e.g. the job's state and log), read when it fails.
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if found := what():
            return found
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {getattr(what, '__name__', what)}\n{explain()}")


def job_report(sweep_dir: Path, job: str | None) -> str:
    # For a failure: the job's queue state and reason, and the end of its submitit logs.
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T %r %S"], capture_output=True, text=True).stdout
    logs = "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.*")))
    return f"job {job}; squeue: {queue.strip()!r}\n{logs[-3000:]}"


def steps_logged(run_dir: Path) -> int:
    # The last step metrics.jsonl has a row for (0 before the first).
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(line).get("step", 0) for line in lines if line.endswith("}")), default=0)


def job_state(job: str, fields: str = "%T") -> list[str]:
    # squeue's fields (e.g. "%T|%r|%S": state, reason, begin time) of a job still queued; [] once it is gone.
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", fields], capture_output=True, text=True).stdout
    return out.strip().split("|") if out.strip() else []


def release(job: str) -> None:
    # A requeued job is held ~2 min (its BeginTime) so that its next launch carries a credential newer than the
    # revoked one of the run that just ended; started sooner (within that second) slurmd refuses the launch and
    # the job FAILS. So: wait for SLURM's own hold, which it sets once the old run has fully ended, then let a
    # second pass and start the job now.
    def held() -> bool:
        fields = job_state(job, "%T|%r|%S")  # state, reason, begin time
        later = f"{datetime.now() + timedelta(seconds=30):%FT%T}"
        return fields[:2] == ["PENDING", "BeginTime"] and fields[2] > later

    wait_for(held, timeout=60, every=0.1)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)


def job_of(run_dir: Path) -> str:
    # The SLURM job running a sweep job: submitit's folder holds one log per job id.
    def find():
        logs = (run_dir.parent / ".submitit").glob("*/*_0_log.out")
        return next(
            (log.parent.name for log in logs if f"run directory {run_dir}\n" in log.read_text()), None
        )

    return wait_for(find, timeout=60)


def task_pid(job: str) -> int:
    # The submitit task process of a running SLURM job (its workers are forks of its forkserver).
    for p in psutil.process_iter(["cmdline"]):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        task = env.get("SLURM_ARRAY_TASK_ID")
        name = f"{env.get('SLURM_ARRAY_JOB_ID')}_{task}" if task else env.get("SLURM_JOB_ID")
        cmd = p.info["cmdline"] or [""]
        if (
            name == job and "submitit.core._submit" in cmd and Path(cmd[0]).name.startswith("python")
        ):  # not srun
            return p.pid
    pytest.fail(f"no submitit task process for SLURM job {job}")


@needs_slurm
def test_sweep_of_two_jobs_each_a_world_of_two_tasks(tmp_path):
    # Two tasks on the one node stand in for two nodes: each job derives nnodes, the endpoint and the id from
    # SLURM's variables and forms one world of 2 x 1; both rows ok, the report written, the job ids recorded.
    proc, sweep_dir = sweep(
        tmp_path, "strategy=ddp,fsdp", "launcher.nnodes=2", "launcher.nproc_per_node=1",
        "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2",
    )  # fmt: skip
    rc, out, err = finish(proc, timeout=240)
    assert rc == 0, out[-3000:] + err[-3000:]
    table = rows(sweep_dir)
    assert [r["status"] for r in table] == ["ok", "ok"]
    assert {r["world_size"] for r in table} == {"2"}
    ids = [r["slurm_job_id"] for r in table]
    assert all("_" in i for i in ids) and len(set(ids)) == 2, ids  # one array, one task per job
    for num, job in ((0, ids[0]), (1, ids[1])):  # the wait is not silent: each job's state as it changes
        # (polled: a job shorter than the poll may go from PENDING to COMPLETED between two looks)
        seen = re.findall(rf"shardlab: #{num}: SLURM job {re.escape(job)} (\w+)", out)
        assert seen[-1:] == ["COMPLETED"] and {"PENDING", "RUNNING"} & set(seen[:-1]), out
    assert "SLURM job" in (sweep_dir / "report.md").read_text()
    for job in ("0", "1"):
        s = summary(sweep_dir / job)
        assert s.world_size == 2 and s.status == "ok"
        assert s.slurm_job_id in ids

    def sacct() -> str:  # accounting lags the controller by a moment: retried (sacct states, one per job)
        return subprocess.run(
            ["sacct", "-X", "-P", "-n", "-j", ",".join(ids), "-o", "JobID,State"],
            capture_output=True,
            text=True,
        ).stdout

    wait_for(lambda: sacct().count("COMPLETED") == 2, timeout=30, every=0.5)


@needs_slurm
def test_jobs_killed_hard_are_failed_rows_and_the_report_is_written(tmp_path):
    # Job 1 is cancelled (scancel) and job 2 loses its worker to SIGKILL (as from the OOM killer) while job 0
    # finishes: the sweep waits for all three, writes its report and exits 1.
    proc, sweep_dir = sweep(tmp_path, "trainer.max_steps=3,1000000,1000001", "launcher.nproc_per_node=1")
    wait_for(lambda: steps_logged(sweep_dir / "1") > 2 and steps_logged(sweep_dir / "2") > 2, timeout=180)
    cancelled, killed = job_of(sweep_dir / "1"), job_of(sweep_dir / "2")
    subprocess.run(["scancel", cancelled], check=True)
    [worker] = wait_for(lambda: workers(task_pid(killed)))
    worker.kill()
    rc, out, err = finish(proc, timeout=180)
    assert rc == 1, out[-3000:] + err[-3000:]
    table = {r["trainer.max_steps"]: r for r in rows(sweep_dir)}
    assert table["3"]["status"] == "ok"
    assert table["1000000"]["status"] == "failed"
    assert f"SLURM job {cancelled} ended CANCELLED" in table["1000000"]["reason"]
    assert table["1000000"]["slurm_job_id"] == cancelled
    assert table["1000001"]["status"] == "failed" and "SIGKILL" in table["1000001"]["reason"]
    assert table["1000001"]["slurm_job_id"] == killed


@needs_slurm
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(tmp_path):
    # submitit's pre-timeout signal (SIGUSR2), then a requeue (SIGTERM to every process): each time the workers
    # save at a step boundary, the job is requeued and resumes; the final loss is bit-exact with a run that
    # was never interrupted.
    run = ("strategy=ddp", "launcher.nproc_per_node=2", "trainer.max_steps=400", "trainer.log_every=10")
    proc, sweep_dir = sweep(tmp_path, *run)
    run_dir = sweep_dir / "0"
    job = None
    try:
        for signal_it, at in (
            (lambda j: ["scancel", "--signal=USR2", j], 40),  # submitit's pre-timeout signal
            (lambda j: ["scontrol", "requeue", j], 150),  # a requeue: SIGTERM, then SIGKILL after KillWait
        ):
            wait_for(
                lambda at=at: steps_logged(run_dir) >= at,
                timeout=180,
                explain=lambda job=job: job_report(sweep_dir, job),
            )
            job = job or job_of(run_dir)
            subprocess.run(signal_it(job), check=True)
            release(job)
    except BaseException:  # leave no job behind to hold the node's cores for the tests after this one
        os.killpg(proc.pid, signal.SIGKILL)
        if job:
            subprocess.run(["scancel", job], capture_output=True)
        raise
    rc, out, err = finish(proc, timeout=240)
    assert rc == 0, out[-3000:] + err[-3000:]
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_0_log.out"))
    assert "stopped by SIGUSR2" in logs and "stopped by SIGTERM" in logs, logs[-3000:]
    assert logs.count("shardlab: resumed from") == 2
    interrupted = summary(run_dir)
    reference = tmp_path / "reference"
    rc, out, err = finish(start([sys.executable, "train.py", *TINY, *run, f"hydra.run.dir={reference}"]))
    assert rc == 0, err[-3000:]
    assert interrupted.status == "ok" and interrupted.slurm_job_id == job
    assert interrupted.final_loss == summary(reference).final_loss


@needs_slurm
def test_printed_sbatch_script_runs_as_printed(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "commands.sbatch", *TINY, "launcher.nproc_per_node=2", "strategy=ddp",
         "--run-root", str(tmp_path / "runs"), "--cpus-per-task", "2", "--time", "10"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "#SBATCH --nodes=1" in out and "#SBATCH --ntasks-per-node=1" in out and "srun" in out
    (tmp_path / "job.sbatch").write_text(out)
    job = subprocess.run(
        ["sbatch", "--parsable", str(tmp_path / "job.sbatch")], capture_output=True, text=True, check=True
    ).stdout.strip()
    wait_for(lambda: not job_state(job), timeout=180, every=0.5)
    s = summary(tmp_path / "runs" / job)
    assert s.status == "ok" and s.world_size == 2 and s.slurm_job_id == job


def refused(tmp_path, *overrides: str, env: dict | None = None) -> str:
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout if HAVE_SLURM else ""
    proc, sweep_dir = sweep(tmp_path, *overrides, env=env)
    rc, out, err = finish(proc, timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("shardlab: error: "), err
    assert not (sweep_dir / ".submitit").exists()  # nothing was submitted
    if HAVE_SLURM:
        assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
    return lines[0]


def test_submitit_slurm_without_sbatch_is_one_line(tmp_path):
    env = cli_env()
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists()
    )
    assert "needs SLURM's sbatch on PATH" in refused(tmp_path, env=env)


@needs_slurm
@pytest.mark.parametrize(
    "override, says",
    [
        (
            "hydra.launcher.partition=nope",
            "hydra.launcher.partition=nope: this cluster's partitions are debug",
        ),
        ("hydra.launcher.mem_gb=100000", "larger than any node of partition debug: memory MB 102400000"),
    ],
)
def test_bad_slurm_requests_are_refused_before_submission(tmp_path, override, says):
    assert says in refused(tmp_path, override)


def test_sbatch_script_requests_what_the_config_needs(capsys):
    # A GPU config (printing needs no GPU and no SLURM): nodes from launcher.nnodes, a GPU and a CPU per worker,
    # one task per node, requeue on preemption, the run directory named after the job.
    from commands.sbatch import main

    main(["model=debug", "strategy=fsdp", "launcher.nproc_per_node=8", "launcher.nnodes=2", "--partition", "gpu",
          "--time", "240", "--mem-gb", "512", "--run-root", "/tmp/shardlab-sbatch-test"])  # fmt: skip
    out = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=512G", "#SBATCH --time=240",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue"):  # fmt: skip
        assert line in out.splitlines(), out
    assert 'launcher.nnodes=2 \\\n    "hydra.run.dir=/tmp/shardlab-sbatch-test/${SLURM_JOB_ID}"' in out
    main(
        [
            "model=debug",
            "strategy=ddp",
            "trainer.device=cpu",
            "launcher.nproc_per_node=2",
            "--run-root",
            "/tmp/shardlab-sbatch-test",
        ]
    )
    assert "--gpus-per-node" not in capsys.readouterr().out  # a CPU run asks for no GPU
