# The workers of a job under `-m hydra/launcher=ray` (hydra_plugins/shardlab_ray): one Ray Train run (TorchTrainer)
# of launcher.nnodes x launcher.nproc_per_node workers, placed by Ray on whichever nodes of the cluster hold them,
# started from the job's Ray task where a local job would start an elastic launch (launcher/elastic.py). Ray Train
# makes the process group (TorchConfig: gloo on CPUs, nccl on GPUs) and restarts the whole worker group after a
# worker dies (FailureConfig(max_failures), hydra.launcher.max_failures); shardlab's own checkpoints are what a
# restarted group resumes from, as under torchrun's --max-restarts, so Ray's checkpoint API is not used.
# The run directory, like a SLURM job's, must be on a filesystem that every node of the cluster sees at the same path.
import json
import os
import socket
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from trainer.environments import RAY_ATTEMPT, RAY_RUN_ID, redetect
from trainer.summary import RunSummary

RECORD = "ray_run.json"  # in the run dir: the Ray Train run's id and, for each attempt, where each worker ran


def worker_device(params) -> str:
    # The device the workers train on, which is not this task's: the job's Ray task holds no GPU.
    return "cuda" if params.gpus_per_worker else "cpu"


def launch(cfg, nproc: int, args) -> RunSummary | None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError

    from launcher.elastic import WorkerFailed
    from trainer.dist import backend_for, device_type

    params = HydraConfig.get().launcher
    run_dir = Path(cfg.run_dir).absolute()
    gpus = params.gpus_per_worker
    resources = {"CPU": params.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    device = device_type(cfg.trainer.device, worker_device(params))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "args": args},
        scaling_config=ScalingConfig(
            num_workers=nproc * cfg.launcher.nnodes,
            use_gpu=bool(gpus),
            resources_per_worker=resources,
            placement_strategy=params.placement_strategy,
        ),
        torch_config=TorchConfig(
            backend=backend_for(device, cfg.strategy.get("cpu_offload", False)),
            timeout_s=int(cfg.launcher.get("timeout_s") or 1800),
        ),
        run_config=RunConfig(
            name=run_name(run_dir),
            storage_path=str(run_dir / "ray"),  # Ray Train's own files: this run's, beside its own
            # controller_failure_limit=0: a worker group that cannot be placed within hydra.launcher.start_timeout_s
            # fails the run, where Ray Train's default would try again for ever.
            failure_config=FailureConfig(max_failures=params.max_failures, controller_failure_limit=0),
        ),
    )
    try:
        return trainer.fit().return_value  # rank 0's summary
    except TrainingFailedError as e:
        # The run's id for the failed row: rank 0 recorded it, or (no worker started) Ray's record has it by name.
        run_id = read_record(run_dir).get("run_id") or next(iter(find_runs([run_name(run_dir)])), None)
        if run_id:
            os.environ[RAY_RUN_ID] = run_id  # environments.RayJob.job_id(): record_failure writes it
        raise WorkerFailed(describe(e, run_id, read_record(run_dir))) from None


def run_name(run_dir: Path) -> str:
    # The Ray Train run's name (Ray's dashboard and record): the sweep's directory and the job's.
    run_dir = Path(run_dir).absolute()
    return f"shardlab-{run_dir.parent.name}-{run_dir.name}"


def find_runs(names: list[str]) -> dict[str, dict]:
    # Ray Train's record of the newest run of each name, as its dashboard shows it (RAY_TRAIN_ENABLE_STATE_TRACKING,
    # which hydra_plugins/shardlab_ray sets for every job): {run id: its name, final state, and each attempt's state
    # and workers (rank, pid, node)}. Ray keeps it in a state actor whose API is internal.
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    runs, attempts = ray.get(
        [actor.get_train_runs.remote(), actor.get_train_run_attempts.remote()], timeout=30
    )
    newest = {}
    for run_id, run in runs.items():
        if run.name in names and (
            run.name not in newest or run.start_time_ns > newest[run.name][1].start_time_ns
        ):
            newest[run.name] = (run_id, run)
    out = {}
    for run_id, run in newest.values():
        tried = (attempts.get(run_id) or {}).values()
        out[run_id] = {
            "name": run.name,
            "status": run.status.name,
            "status_detail": run.status_detail,
            "attempts": [
                {
                    "status": a.status.name,
                    "status_detail": a.status_detail,
                    "workers": [
                        {"rank": w.world_rank, "pid": w.pid, "node_id": w.node_id} for w in a.workers
                    ],
                }
                for a in sorted(tried, key=lambda a: a.start_time_ns)
            ],
        }
    return out


def describe(e, run_id: str | None, record: dict) -> str:
    # A failed Ray Train run in one line: the failure a worker recorded (its exception), or Ray's word for a worker
    # that died without a word (killed, out of memory, its node gone), or for a group that could not be placed.
    run = f"Ray Train run {run_id}" if run_id else "Ray Train run"
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, error = min(failures.items())
        return f"{run}: rank {rank} failed: {_ray_reason(error, rank, record)}"
    cause = getattr(e, "controller_failure", e)
    why = f"{run} failed: {type(cause).__name__}: {_first_sentence(str(cause))}"
    if type(cause).__name__ == "WorkerGroupStartupTimeoutError":  # placement: the cluster's, not the job's
        why += " The cluster had no room for them: free some, or raise hydra.launcher.start_timeout_s"
    return why


def _ray_reason(error: BaseException, rank: int, record: dict) -> str:
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError):  # the worker's own exception, raised in its function
        return f"{type(error.cause).__name__}: {_first_sentence(str(error.cause))}"
    # Ray Train's health check found the worker gone: Ray's reason is in the check's own failure.
    error = getattr(error, "health_check_failure", None) or error
    where = next((w for w in _last_workers(record) if w["rank"] == rank), None)
    who = (
        f"its worker (pid {where['pid']} on {where['host']}, Ray node {where['node_id'][:12]})"
        if where
        else "its worker"
    )
    text = " ".join(str(error).split())
    if "Worker exit type:" in text:  # Ray's ActorDiedError: how the process ended, as the raylet saw it
        kind = text.partition("Worker exit type:")[2].split()[0]
        detail = text.partition("Worker exit detail:")[2].partition(" Some common causes")[0].strip()
        return f"{who} died ({kind}): {detail or _first_sentence(text)}"
    return f"{who}: {type(error).__name__}: {_first_sentence(text)}"


def _first_sentence(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    text = text[: end + 1] if 0 < end < limit else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_record(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _last_workers(record: dict) -> list[dict]:
    attempts = record.get("attempts") or [{}]
    return attempts[-1].get("workers", [])


def _worker(config: dict):
    # One worker of the Ray Train run, in Ray's worker process (in a thread of it). Ray Train made the process
    # group; rank 0 counts the attempts in the run dir's record (a restarted group resumes from its checkpoint).
    import ray
    import torch.distributed as dist
    from ray.train.v2._internal.execution.context import get_train_context

    from launcher.worker import run_worker
    from trainer.checks import check_device_capabilities
    from trainer.dist import broadcast_object, init_run

    cfg, args = OmegaConf.create(config["cfg"]), config["args"]
    run_dir = Path(cfg.run_dir)
    # The run's id, as Ray's dashboard and state API name it: Ray Train keeps it in its internal context only.
    run_id = get_train_context().train_run_context.run_id
    os.environ.update({RAY_ATTEMPT: "0", RAY_RUN_ID: run_id})
    env = init_run(cfg)
    me = {"rank": env.rank, "pid": os.getpid(), "host": socket.gethostname()}
    me["node_id"] = ray.get_runtime_context().get_node_id()
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, me)
    attempt = None
    if env.rank == 0:
        record = read_record(run_dir)
        if record.get("run_id") != run_id:
            record = {"run_id": run_id, "attempts": []}
        record["attempts"].append({"started": time.time(), "workers": everyone})
        tmp = run_dir / f".{RECORD}.tmp"
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(run_dir / RECORD)
        attempt = len(record["attempts"]) - 1
    os.environ[RAY_ATTEMPT] = str(broadcast_object(attempt, env))
    redetect()
    check_device_capabilities(cfg, args, env.device)
    summary = run_worker(cfg, env, args)
    return summary if env.rank == 0 else None
