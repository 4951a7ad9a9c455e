# hydra/launcher=ray (hydra_plugins/shardlab_ray, launcher/ray_train.py) against a real Ray cluster of two nodes on
# this host (ray.cluster_utils.Cluster: a head and one more raylet, 2 CPUs each), started by a fixture for this file
# and stopped after it: a 2-job sweep with one job's worker killed (no retries: a failed row naming the worker, the
# other job's row, the report); a job across both nodes whose killed worker is restarted by Ray Train and resumes to
# the uninterrupted job's loss; a job the cluster cannot place in time; bad input refused before submission.
# Without ray these tests skip; with SHARDLAB_REQUIRE_RAY=1 (CI) they fail instead.
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.cli import cli_env, finish, start
from tests.helpers.run import TINY
from trainer.summary import RunSummary

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:
    if os.environ.get("SHARDLAB_REQUIRE_RAY") == "1":
        raise RuntimeError(
            "SHARDLAB_REQUIRE_RAY=1 but ray is not installed: run `make install-ray`"
        ) from None
    pytest.skip("ray is not installed (make install-ray)", allow_module_level=True)

# Each job: 2 workers of 1 CPU; 12 steps with a checkpoint every 2, as the restart tests of tests/test_checkpoint.py.
JOB = (
    *TINY,
    "strategy=ddp",
    "launcher.nproc_per_node=2",
    "trainer.max_steps=12",
    "trainer.global_batch_size=4",
)
JOB += ("checkpoint=periodic", "checkpoint.every_n_steps=2", "hydra/launcher=ray")


@pytest.fixture(scope="module")
def cluster():
    # Two Ray nodes on this host; this process is a driver of it too (to hold resources, and to read its nodes).
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 80 * 2**20},
    )
    c.add_node(num_cpus=2, object_store_memory=80 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def sweep(cluster, sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    # hydra.launcher.address=auto (the default) finds the cluster through RAY_ADDRESS, as on a cluster's node.
    cmd = [sys.executable, "train.py", "-m", *JOB, f"hydra.sweep.dir={sweep_dir}", *overrides]
    return start(cmd, env={**cli_env(), "RAY_ADDRESS": cluster.address})


def rows(sweep_dir: Path) -> dict[str, dict]:
    with open(sweep_dir / "report.csv") as f:
        return {r["run_dir"]: r for r in csv.DictReader(f)}


def wait_for(what, proc: subprocess.Popen, timeout: float = 120):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if (found := what()) is not None:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended first:\n{proc.stdout.read()[-3000:]}\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"not seen within {timeout} s")


def worker(run_dir: Path, rank: int, attempt: int = 0):
    # The worker process of this rank, as the run recorded it (launcher/ray_train.py's ray_run.json), once it has.
    try:
        record = json.loads((run_dir / "ray_run.json").read_text())
        return psutil.Process(record["attempts"][attempt]["workers"][rank]["pid"])
    except (OSError, ValueError, KeyError, IndexError, psutil.Error):
        return None


@pytest.fixture(scope="module")
def killed_sweep(cluster, tmp_path_factory):
    # strategy=ddp,fsdp, two jobs at once (2 workers each on 4 CPUs); fsdp's rank 1 is SIGKILLed once it has started.
    sweep_dir = tmp_path_factory.mktemp("ray") / "sweep"
    started = time.monotonic()
    proc = sweep(cluster, sweep_dir, "strategy=ddp,fsdp")
    wait_for(lambda: worker(sweep_dir / "1", rank=1), proc).kill()
    code, out, err = finish(proc, timeout=240)
    print(f"2-job Ray sweep, one worker killed: {time.monotonic() - started:.1f} s")
    return sweep_dir, code, out, err


def test_a_sweep_on_ray_whose_killed_worker_fails_its_row_only(killed_sweep):
    sweep_dir, code, out, err = killed_sweep
    assert code == 1, err[-3000:]  # a failed job fails the sweep, after its report
    table = rows(sweep_dir)
    ok, failed = table[str(sweep_dir / "0")], table[str(sweep_dir / "1")]
    assert ok["status"] == "ok" and ok["world_size"] == "2" and failed["status"] == "failed", table
    # The failed row names the worker that died and how, as Ray saw it.
    pid = json.loads((sweep_dir / "1" / "ray_run.json").read_text())["attempts"][0]["workers"][1]["pid"]
    assert f"rank 1 failed: its worker (pid {pid} on " in failed["reason"], failed["reason"]
    assert "died (SYSTEM_ERROR)" in failed["reason"], failed["reason"]
    for run in ("0", "1"):
        summary = RunSummary.read(sweep_dir / run)
        assert summary.ray_run_id and table[str(sweep_dir / run)]["ray_run_id"] == summary.ray_run_id
    assert "| Ray run |" in (sweep_dir / "report.md").read_text()
    # Ray Train's own record of both runs (its state actor), as the sweep printed and kept it.
    record = {r["job"]: r for r in json.loads((sweep_dir / "ray_runs.json").read_text())}
    assert record[0]["status"] == "FINISHED" and record[1]["status"] == "ERRORED", record
    assert record[0]["run_id"] == ok["ray_run_id"] and record[1]["run_id"] == failed["ray_run_id"]
    assert [len(a["workers"]) for a in record[0]["attempts"]] == [2]
    print(
        "Ray's record:",
        [(r["job"], r["run_id"], r["status"], [a["status"] for a in r["attempts"]]) for r in record.values()],
    )
    assert f"#1: Ray Train run {failed['ray_run_id']} ERRORED, 1 attempt(s) (ERRORED)" in out


def test_a_killed_worker_across_two_nodes_restarts_and_resumes_to_the_same_loss(
    cluster, killed_sweep, tmp_path
):
    # One world of 2, one worker on each Ray node (STRICT_SPREAD); rank 1 SIGKILLed after the step-2 checkpoint.
    # Ray Train restarts the worker group (hydra.launcher.max_failures=1), the new group resumes from shardlab's own
    # newest checkpoint, and the loss ends where the uninterrupted ddp job of the sweep above ended, bit for bit.
    sweep_dir = tmp_path / "sweep"
    run_dir = sweep_dir / "0"
    started = time.monotonic()
    proc = sweep(
        cluster, sweep_dir, "hydra.launcher.max_failures=1", "hydra.launcher.placement_strategy=STRICT_SPREAD"
    )

    def after_a_checkpoint():
        return worker(run_dir, rank=1) if (run_dir / "checkpoints" / "step_00000002").is_dir() else None

    wait_for(after_a_checkpoint, proc).kill()
    code, out, err = finish(proc, timeout=240)
    assert code == 0, err[-3000:]
    summary = RunSummary.read(run_dir)
    reference = RunSummary.read(killed_sweep[0] / "0")
    print(f"killed and restarted on Ray: final loss {summary.final_loss!r}, uninterrupted {reference.final_loss!r}; "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    assert summary.status == "ok" and summary.resumed_from is not None
    assert summary.final_loss == reference.final_loss
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == list(
        range(1, 13)
    )  # the restarted attempt dropped the killed one's later rows
    attempts = json.loads((run_dir / "ray_run.json").read_text())["attempts"]
    assert len(attempts) == 2
    for attempt in attempts:  # one world of 2, one worker on each node
        assert len({w["node_id"] for w in attempt["workers"]}) == 2, attempt
    record = json.loads((sweep_dir / "ray_runs.json").read_text())[0]
    assert record["status"] == "FINISHED" and [a["status"] for a in record["attempts"]] == [
        "ERRORED",
        "FINISHED",
    ]


def test_a_job_the_cluster_cannot_place_in_time_is_a_failed_row(cluster, tmp_path):
    # Others hold 3 of the cluster's 4 CPUs (a placement group of this driver): the job's 2 workers cannot be placed
    # within hydra.launcher.start_timeout_s, and its row says so in Ray's words.
    from ray.util.placement_group import placement_group, remove_placement_group

    held = placement_group([{"CPU": 2}, {"CPU": 1}], strategy="SPREAD")
    ray.get(held.ready(), timeout=60)
    try:
        sweep_dir = tmp_path / "sweep"
        code, out, err = finish(
            sweep(cluster, sweep_dir, "trainer.max_steps=1", "hydra.launcher.start_timeout_s=3")
        )
    finally:
        remove_placement_group(held)
    assert code == 1, err[-3000:]
    row = rows(sweep_dir)[str(sweep_dir / "0")]
    assert row["status"] == "failed" and row["ray_run_id"], row
    assert (
        "WorkerGroupStartupTimeoutError: The worker group startup timed out after 3.0 seconds"
        in row["reason"]
    )


@pytest.mark.parametrize(
    "overrides, says",
    [
        (
            ["launcher.nproc_per_node=8"],
            "8 worker(s) (launcher.nnodes x launcher.nproc_per_node) x 1 CPU(s) each need "
            "8 CPUs, but the Ray cluster has 4 in all",
        ),  # fmt: skip
        (
            ["hydra.launcher.cpus_per_worker=3"],
            "hydra.launcher.cpus_per_worker=3, but the Ray cluster's largest node has 2 CPUs",
        ),  # fmt: skip
        (
            ["launcher.nproc_per_node=3", "hydra.launcher.placement_strategy=STRICT_SPREAD"],
            "STRICT_SPREAD puts each "
            "of the 3 worker(s) on a node of its own, but the Ray cluster has 2 node(s)",
        ),  # fmt: skip
        (
            ["hydra.launcher.max_failures=1", "checkpoint.every_n_steps=0"],
            "hydra.launcher.max_failures=1 restarts the workers "
            "from the newest checkpoint, but checkpoint.every_n_steps=0 saves none",
        ),  # fmt: skip
        (
            ["launcher.nproc_per_node=auto"],
            "launcher.nproc_per_node=auto: under hydra/launcher=ray give the workers per node as a number",
        ),  # fmt: skip
        (
            ["trainer.device=cuda"],
            "1 GPU(s) per worker (hydra.launcher.gpus_per_worker; trainer.device=cpu asks for "
            "none), but the Ray cluster's largest node has 0",
        ),  # fmt: skip
    ],
)
def test_requests_beyond_the_cluster_are_refused_before_submission(cluster, capsys, overrides, says):
    # In-process: the cluster as it is (this driver's view) against each job's composed config.
    from hydra_plugins.shardlab_ray import ray_launcher

    have = ray_launcher.cluster()
    assert (have["nodes"], have["cpus"], have["node_cpus"]) == (2, 4.0, 2.0)
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from launcher.compose import config_dir, setup_hydra

    setup_hydra()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        ray_launcher.register()
        cfg = compose("config", overrides=[*JOB, *overrides], return_hydra_config=True)
    params = cfg.hydra.launcher
    with open_dict(cfg):
        params.gpus_per_worker = ray_launcher.worker_gpus(cfg.trainer.device, have["gpus"])
    with pytest.raises(SystemExit) as e:
        ray_launcher.check_fits(cfg, params, have)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("shardlab: error: ") and says in err and err.count("\n") == 1, err


def test_no_cluster_at_the_address_is_one_line_before_anything_starts(tmp_path):
    # An address where nothing answers (a head that is gone: its address file stays behind): one line within
    # hydra.launcher.connect_timeout_s, naming how to start one or how to drop the launcher.
    started = time.monotonic()
    cmd = [sys.executable, "train.py", "-m", *JOB, f"hydra.sweep.dir={tmp_path / 'sweep'}",
           "hydra.launcher.address=127.0.0.1:1", "hydra.launcher.connect_timeout_s=5"]  # fmt: skip
    code, out, err = finish(start(cmd))
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("shardlab: error: no Ray cluster answers at ") and "within 5 s" in line, err
    assert "start one with `ray start --head`" in line and "drop hydra/launcher=ray" in line
    assert not (tmp_path / "sweep" / "0").exists() and time.monotonic() - started < 30
