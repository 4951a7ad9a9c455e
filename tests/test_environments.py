# Where a job runs (trainer/environments.py): each environment detected from exactly the variables its place
# sets, in one order of precedence, and what each answers. Pure functions of a variable mapping: nothing here
# starts a process (two real pods forming one world: tests/test_launch.py).
import signal

import pytest
from omegaconf import OmegaConf

from trainer.environments import (
    RAY_ATTEMPT,
    RAY_JOB,
    RAY_RUN_ID,
    Local,
    Pods,
    RayJob,
    RayWorker,
    Slurm,
    Torchrun,
    detect,
)

# A PyTorchJob of one master and one worker replica as the training operator sets them, without nprocPerNode
# (WORLD_SIZE and RANK count the pods) and with nprocPerNode=2 (WORLD_SIZE counts processes; PET_* added).
PYTORCHJOB = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"}
PYTORCHJOB_NPROC = {
    **PYTORCHJOB,
    "WORLD_SIZE": "4",
    "PET_NPROC_PER_NODE": "2",
    "PET_NODE_RANK": "1",
    "PET_NNODES": "2",
}
# A Kubeflow Trainer TrainJob: only torchrun's PET_ variables.
TRAINJOB = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "job-node-0-0.job",
            "PET_MASTER_PORT": "29400"}  # fmt: skip
TORCHRUN = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "0"}  # fmt: skip


def launcher(nproc="1", nnodes=1, endpoint="", rdzv_id=""):
    return OmegaConf.create(
        {"nproc_per_node": nproc, "nnodes": nnodes, "rdzv_endpoint": endpoint, "rdzv_id": rdzv_id}
    )


def test_precedence_torchrun_then_slurm_then_pods_then_local():
    assert type(detect({})) is Local and detect({}).creates_processes
    assert type(detect(PYTORCHJOB)) is Pods
    slurm = {**PYTORCHJOB, "SLURM_JOB_ID": "7"}  # some clusters export MASTER_ADDR inside an allocation
    assert type(detect(slurm)) is Slurm
    inside = detect({**TORCHRUN, "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"})
    assert type(inside) is Torchrun and not inside.creates_processes
    # torchrun inside a SLURM job: the workers exist, and SLURM still says what preemption and a requeue are.
    assert inside.preemption_signals == (signal.SIGUSR2, signal.SIGTERM)
    assert inside.job_id() == "7" and inside.restarted()
    assert inside.ranks() == (3, 1, 4, 2) and inside.rank() == 3 and inside.run_path() == "torchrun/abc"
    plain = detect(TORCHRUN)
    assert plain.preemption_signals == () and plain.job_id() is None and not plain.restarted()
    assert detect({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2"}).restarted()


def test_a_pod_is_a_node_whose_launcher_starts_its_workers():
    # Old operators: WORLD_SIZE / RANK are the pods; launcher.nproc_per_node=2 makes a world of 2 x 2.
    pod = detect(PYTORCHJOB)
    assert pod.creates_processes and pod.rank() == 1 and pod.multi_node()
    cfg = launcher(nproc="2")
    pod.fill_launcher(cfg)
    assert (cfg.nnodes, cfg.nproc_per_node) == (2, "2")
    assert cfg.rdzv_endpoint == "job-master-0:23456" and cfg.rdzv_id == "pods-job-master-0-23456"
    assert pod.run_path() == "multinode/pods-job-master-0-23456"  # the run dir both pods agree on
    # Newer operators count processes in WORLD_SIZE and say the processes per pod themselves.
    cfg = launcher()
    detect(PYTORCHJOB_NPROC).fill_launcher(cfg)
    assert (cfg.nnodes, cfg.nproc_per_node) == (2, "2")
    cfg = launcher(rdzv_id="mine")  # a run id the user set is kept
    detect(TRAINJOB).fill_launcher(cfg)
    assert (cfg.nnodes, cfg.nproc_per_node, cfg.rdzv_endpoint) == (2, "2", "job-node-0-0.job:29400")
    assert cfg.rdzv_id == "mine" and detect(TRAINJOB).rank() == 0
    single = launcher()
    detect({**PYTORCHJOB, "WORLD_SIZE": "1", "RANK": "0"}).fill_launcher(single)
    assert (single.nnodes, single.rdzv_endpoint) == (1, "")  # one pod: a local run


def test_pod_processes_that_are_workers_already():
    # LOCAL_RANK set: each process is a worker (RANK and WORLD_SIZE count processes), as in style 1.
    worker = detect(
        {**PYTORCHJOB, "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    )
    assert type(worker) is Pods and not worker.creates_processes
    assert worker.ranks() == (3, 1, 4, 2) and worker.rank() == 3


@pytest.mark.parametrize(
    ("variables", "config", "says"),
    [
        ({"PET_NPROC_PER_NODE": "2"}, {"nproc": "4"}, "launcher.nproc_per_node=4, but the pod's PET_NPROC_PER_NODE=2"),
        ({}, {"nnodes": 3}, "launcher.nnodes=3, but the job has 2 pod(s)"),
        ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "WORLD_SIZE": "3"}, {}, "WORLD_SIZE=3 is neither"),
        ({"PET_NODE_RANK": "0"}, {}, "PET_NODE_RANK=0 and RANK=1 disagree"),
        ({"RANK": "5"}, {}, "this pod's rank 5 is outside the 2 pod(s)"),
        ({"WORLD_SIZE": "two"}, {}, "WORLD_SIZE='two' is not a whole number"),
        ({}, {"endpoint": "other:1"}, "launcher.rdzv_endpoint=other:1, but the pod's master is job-master-0:23456"),
    ],
)  # fmt: skip
def test_variables_that_contradict_the_config_are_refused_in_one_line(variables, config, says):
    cfg = launcher(**config)
    before = OmegaConf.to_container(cfg)
    with pytest.raises(ValueError) as info:
        detect({**PYTORCHJOB, **variables}).fill_launcher(cfg)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert OmegaConf.to_container(cfg) == before  # nothing half-filled


def test_slurm_nnodes_must_match_the_tasks_of_the_step():
    # Inside an srun step of two tasks (one per node) launcher.nnodes=1 would start two separate runs.
    job = detect({"SLURM_JOB_ID": "123", "SLURM_STEP_NUM_TASKS": "2"})
    cfg = launcher()
    with pytest.raises(ValueError, match=r"launcher.nnodes=1, but this SLURM job step runs 2 task\(s\), one per node: set launcher.nnodes=2"):  # fmt: skip
        job.fill_launcher(cfg)
    # one task, one node: the local rendezvous as usual
    detect({"SLURM_JOB_ID": "123", "SLURM_STEP_NUM_TASKS": "1"}).fill_launcher(cfg)
    assert cfg.rdzv_endpoint == "" and cfg.rdzv_id == ""
    array = detect({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "1"})
    assert array.job_id() == "8_1" and not array.restarted() and array.rank() == 0


def test_ray_job_and_its_workers():
    # hydra/launcher=ray: the job's Ray task starts its workers through Ray Train; each worker has the ranks Ray Train
    # set (its MASTER_ADDR and WORLD_SIZE are not a pod's), catches no signal, and counts Ray's restarts.
    job = detect({RAY_JOB: "10.0.0.1:6379"})
    assert isinstance(job, RayJob) and job.creates_processes and job.workers_by == "ray"
    assert job.job_field == "ray_run_id" and job.preemption_signals == ()
    with pytest.raises(
        ValueError, match="launcher.nproc_per_node=auto counts the GPUs of the machine it runs on"
    ):
        job.fill_launcher(launcher(nproc="auto"))
    ray_vars = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.2",
                "MASTER_PORT": "4321", RAY_JOB: "10.0.0.1:6379", RAY_RUN_ID: "abc"}  # fmt: skip
    first = detect({**ray_vars, RAY_ATTEMPT: "0"})
    assert isinstance(first, RayWorker) and not first.creates_processes and first.preemption_signals == ()
    assert (
        first.ranks() == (3, 1, 4, 2)
        and first.rank() == 3
        and first.job_id() == "abc"
        and not first.restarted()
    )
    assert detect({**ray_vars, RAY_ATTEMPT: "1"}).restarted()
    # without the worker's own variable, those are a pod's (the Ray task itself is the job)
    assert isinstance(detect({k: v for k, v in ray_vars.items() if k != RAY_JOB}), Pods)
