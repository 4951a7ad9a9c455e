# Launch styles 1 (torchrun) and 2 (launcher.nproc_per_node; style 3, -m sweeps: tests/test_sweep.py), end to
# end through the real CLI in subprocesses (2 CPU ranks, gloo), each from its own working directory under
# tmp_path so the run-dir resolver is what is tested; plus two runs at once, two nodes on one machine, and
# workers that die or raise.
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import cli_env, finish, start, workers
from tests.helpers.run import REPO, compose_config, read_rows, train_in_process
from trainer.summary import RunSummary

pytestmark = pytest.mark.slow

TRAIN = str(REPO / "train.py")
TINY = (
    "model=debug",
    "data=synthetic",
    "trainer.device=cpu",
    "trainer.max_steps=3",
    "trainer.seq_len=32",
    "trainer.global_batch_size=4",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "metrics.warmup_steps=1",
)
LONG = ("trainer.max_steps=2000",)  # for the runs a test kills: far longer than the test waits


def train_py(cwd: Path, *overrides: str, multirun: bool = False) -> subprocess.Popen:
    return start([sys.executable, TRAIN, *(["-m"] if multirun else []), *TINY, *overrides], cwd)


def torchrun(cwd: Path, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.Popen:
    run = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *flags)
    return start([*run, TRAIN, *TINY, *overrides], cwd)


def summaries(root: Path) -> list[Path]:
    return sorted(root.rglob("summary.json"))


def load(path: Path) -> RunSummary | None:
    return RunSummary.read(path)


def assert_ok(run_dir: Path, world_size: int = 2, strategy: str | None = None) -> RunSummary:
    summary = load(run_dir / "summary.json")
    assert summary.status == "ok", summary
    assert summary.world_size == world_size
    assert summary.steps == 3
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, by rank 0 only
    if strategy is not None:
        assert summary.strategy_applied["name"] == strategy
    return summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_pods_an_operator_starts_form_one_world_with_singles_losses(tmp_path, one_thread):
    # Two "pods" with exactly the variables Kubeflow's PyTorchJob sets without nprocPerNode (MASTER_ADDR,
    # MASTER_PORT, WORLD_SIZE = the pods, RANK = the pod), each `python train.py strategy=ddp
    # launcher.nproc_per_node=2`: one world of 4 in one run dir named after the master, one summary, one "ok",
    # and the loss trajectory of one process training the same global batch. Two launchers, one per node, on a
    # shared endpoint and id: the multi-node launch itself (launcher.nnodes, rdzv_endpoint and rdzv_id given
    # by hand take the same path, tests below).
    port = free_port()
    pod = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "PYTHONUNBUFFERED": "0"}
    args = [sys.executable, TRAIN, *TINY, "strategy=ddp", "launcher.nproc_per_node=2"]
    procs = [start(args, tmp_path, env={**cli_env(), **pod, "RANK": str(r)}) for r in (0, 1)]
    results = [finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    run_dir = tmp_path / "outputs" / "multinode" / f"pods-127.0.0.1-{port}"
    assert summaries(tmp_path / "outputs") == [run_dir / "summary.json"]
    assert_ok(run_dir, world_size=4, strategy="ddp")
    assert sum("shardlab: ok:" in out for _, out, _ in results) == 1
    single = tmp_path / "single"
    train_in_process(compose_config(*TINY), single)
    expected = [r["loss"] for r in read_rows(single)]
    assert [r["loss"] for r in read_rows(run_dir)] == pytest.approx(expected, abs=1e-5)


def multinode_args(rdzv_id: str) -> tuple[str, ...]:
    return (
        "launcher.nnodes=2",
        "launcher.nproc_per_node=1",
        f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}",
        f"launcher.rdzv_id={rdzv_id}",
    )


def test_style1_two_nodes_with_a_static_rendezvous_leave_one_run_dir(tmp_path):
    # torchrun --nnodes=2 --node-rank=N --master-port=P: the static rendezvous has no shared run id, so each
    # node names a run dir of its own before any rank can talk; rank 0's is the run's, the other goes.
    port = free_port()
    node = (sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1")
    node += ("--master-addr=127.0.0.1", f"--master-port={port}")
    procs = [start([*node, f"--node-rank={n}", TRAIN, *TINY, "strategy=ddp"], tmp_path) for n in (0, 1)]
    for proc in procs:
        code, _, err = finish(proc)
        assert code == 0, err[-3000:]
    run_dirs = list((tmp_path / "outputs" / "torchrun").iterdir())
    assert len(run_dirs) == 1, run_dirs
    assert_ok(run_dirs[0], strategy="ddp")


def test_nodes_started_with_different_configs_fail_naming_the_difference(tmp_path):
    # A Python exception raised inside the workers, for a real reason no launcher can see alone: each node
    # validated its own config, but they differ. Without the check DDP fails obscurely on the parameter
    # count; with another lr the replicas would silently diverge. Each launcher names its failed rank.
    common = multinode_args("job-mismatch")
    procs = [
        train_py(tmp_path, "strategy=ddp", *common),
        train_py(tmp_path, "strategy=ddp", *common, "model.n_layers=4"),
    ]
    results = [finish(p) for p in procs]
    named = set()
    for code, _, err in results:
        assert code == 1, err[-3000:]
        found = re.search(
            r"shardlab: error: rank (\d) failed \(exit code -?\d+\): ValueError: the nodes .*", err
        )
        assert found, err[-3000:]
        assert "model.n_layers=4 (rank 0: None)" in found.group(0)
        named.add(found.group(1))
    assert named == {"0", "1"}
    summary = load(tmp_path / "outputs" / "multinode" / "job-mismatch" / "summary.json")
    assert summary.status == "failed" and "model.n_layers" in summary.error


def test_style1_rank_that_raises_mid_run_is_named_with_its_cause(tmp_path):
    # A real torchrun job whose rank 1 raises at step 4 (tests/failing_train.py): rank 1 says so in one line,
    # torchrun's report names rank 1 with the exception (not only an exit code), and summary.json, which only
    # rank 0 writes, records rank 1's failure rather than rank 0's own knock-on error or SIGTERM.
    run_dir = tmp_path / "run"
    failing = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2")
    failing += (str(REPO / "tests" / "failing_train.py"), "1", "4")
    env = {**cli_env(), "PYTHONPATH": str(REPO)}
    proc = start([*failing, *TINY, "strategy=ddp", *LONG, f"hydra.run.dir={run_dir}"], tmp_path, env)
    code, out, err = finish(proc)
    cause = "rank 1 failed: RuntimeError: worker failure injected at step 4"
    assert code != 0
    assert f"shardlab: error: {cause}" in err.splitlines(), err[-3000:]
    assert err.count("shardlab: error:") == 1, err[-3000:]
    root_cause = err[err.index("Root Cause") :]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause), root_cause
    assert "RuntimeError: worker failure injected at step 4" in root_cause, root_cause
    assert [r["step"] for r in read_rows(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text()) == {  # the whole file
        "status": "failed",
        "error": cause,
        "run_dir": str(run_dir),
    }


def test_style1_ranks_share_one_run_dir_and_max_restarts_resumes(tmp_path):
    # torchrun --max-restarts=1, no hydra.run.dir: every rank runs Hydra and resolves the run dir itself (c10d
    # under a fresh id; the static rendezvous, whose id is "none": two nodes, above). All land in one, only
    # rank 0 writes .hydra/, config.yaml and the metrics. Rank 0 is killed mid-run: the agent starts both ranks
    # again in the same dir, with fresh keys in its store, and they resume from its newest checkpoint.
    save = ("trainer.max_steps=12", "checkpoint=periodic", "checkpoint.every_n_steps=2")
    proc = torchrun(tmp_path, "strategy=ddp", *save, flags=("--max-restarts=1",))
    deadline = time.monotonic() + 90
    while not list((tmp_path / "outputs").glob("torchrun/*/checkpoints/step_00000002")):
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc, timeout=5)
        time.sleep(0.005)
    workers(proc.pid, "train.py")[0].kill()  # rank 0, SIGKILL, mid-run
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    outputs = tmp_path / "outputs"
    assert [p.name for p in outputs.iterdir()] == ["torchrun"]
    [run_dir] = list((outputs / "torchrun").iterdir())
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    config = (run_dir / "config.yaml").read_text()
    assert f"run_dir: {run_dir}" in config and "strategy: ddp" in config
    summary = load(run_dir / "summary.json")
    assert summary.status == "ok" and summary.world_size == 2 and summary.run_dir == str(run_dir)
    assert summary.resumed_from is not None  # the second attempt resumed, not started over
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))  # the killed attempt's extra rows were dropped
    assert summary.final_loss == rows[-1]["loss"]


def test_style2_two_runs_at_once_and_a_killed_worker(tmp_path):
    # Two launchers from the same directory at the same moment: each composes its config, makes its run dir
    # exclusively and rendezvouses on its own port (localhost:0). One asks for nproc_per_node=auto, which on a
    # machine without GPUs means the CPU default of 2, and finishes; the other's rank 1 is SIGKILLed mid-run,
    # which fails that job, naming the rank, and only that one.
    long = train_py(tmp_path, "strategy=fsdp", "launcher.nproc_per_node=2", *LONG)
    short = train_py(tmp_path, "strategy=ddp", "launcher.nproc_per_node=auto")
    deadline = time.monotonic() + 90
    while len(list((tmp_path / "outputs").glob("*/*/metrics.jsonl"))) < 2 or len(workers(long.pid)) < 2:
        assert long.poll() is None and time.monotonic() < deadline, finish(long, timeout=5)
        time.sleep(0.05)
    workers(long.pid)[1].kill()  # local rank 1 = rank 1 on one node; SIGKILL, mid-run
    (code, out, err), (short_code, short_out, short_err) = finish(long, timeout=60), finish(short)
    assert code == 1
    assert "shardlab: error: rank 1 failed (exit code -9): killed by SIGKILL" in err, err[-3000:]
    assert short_code == 0, short_err[-3000:]
    found = summaries(tmp_path / "outputs")
    assert len(found) == 2 and found[0].parent != found[1].parent, found
    by_status = {load(p).status: p.parent for p in found}
    assert_ok(by_status["ok"], strategy="ddp")
    assert f"shardlab: run directory {by_status['ok']}" in short_out
    assert f"shardlab: run directory {by_status['failed']}" in out
    assert load(by_status["failed"] / "summary.json").error.startswith("rank 1 failed")


def test_ctrl_c_is_one_line_exit_130_and_no_worker_left(tmp_path):
    # Started as `nohup` or a script's `cmd &` starts it, with SIGINT ignored, then Ctrl-C: SIGINT to the whole
    # process group, as a terminal sends it. Every process stops at once: rank 0 records the step it reached and
    # the newest checkpoint (a rank that had inherited the ignore would train on until the agent killed it, and
    # record nothing), and the launcher says so in one line, with the shell's status for SIGINT.
    run_dir = tmp_path / "run"
    proc = start(
        [sys.executable, TRAIN, *TINY, "strategy=ddp", "launcher.nproc_per_node=2", "checkpoint=periodic",
         "checkpoint.every_n_steps=2", f"hydra.run.dir={run_dir}", *LONG],
        tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while not (run_dir / "checkpoints" / "step_00000004").is_dir() or len(workers(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc, timeout=5)
        time.sleep(0.05)
    ranks = workers(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc, timeout=60)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    match = re.fullmatch(
        rf"shardlab: interrupted at step (\d+); checkpoint {run_dir}/checkpoints/step_(\d+)", lines[0]
    )
    assert match and int(match[1]) >= int(match[2]) >= 4, lines[0]
    assert load(run_dir / "summary.json").error == lines[0].removeprefix("shardlab: ")
    assert not any(p.is_running() and p.status() != "zombie" for p in ranks)
