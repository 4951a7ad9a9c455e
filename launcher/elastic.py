# Style 2 (`python train.py launcher.nproc_per_node=N`) and each job of style 3 (`-m`): the parent has
# composed and resolved the config once; it starts the workers with torch's elastic launch API (a module-level
# entrypoint, c10d rendezvous). The parent never touches CUDA.
# Workers are forks of a forkserver that has imported what they need: launcher/prefork.py says why.
import logging
import os
import sys
import uuid

from omegaconf import OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from launcher.errors import describe_failure, failure_traceback
from launcher.prefork import warm_workers
from launcher.slurm import agent_signals
from trainer.checks import check_device_capabilities
from trainer.dist import broadcast_object, cpu_threads, init_run
from trainer.summary import RunSummary

CPU_DEFAULT_NPROC = 2  # nproc_per_node=auto without GPUs: enough to exercise the collectives


class WorkerFailed(RuntimeError):
    pass


def resolve_nproc(value: str, device_pref: str = "auto") -> int:
    if value == "auto":
        if device_pref == "cpu":  # a CPU run on a GPU host: its GPU count says nothing about it
            return CPU_DEFAULT_NPROC
        import torch  # device_count() asks NVML/the driver; it creates no CUDA context here

        return torch.cuda.device_count() or CPU_DEFAULT_NPROC
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"launcher.nproc_per_node must be an integer or auto, got {value!r}") from None
    if n < 1:
        raise ValueError(f"launcher.nproc_per_node must be at least 1, got {n}")
    return n


def check_gpus(nproc: int, device_pref: str) -> None:
    import torch

    gpus = torch.cuda.device_count()
    if device_pref != "cpu" and gpus and nproc > gpus:
        raise ValueError(
            f"launcher.nproc_per_node={nproc} but only {gpus} GPU(s) are present: "
            f"use launcher.nproc_per_node={gpus} (or auto), or trainer.device=cpu"
        )
    if device_pref == "cuda" and not gpus and nproc > 1:  # one process: trainer.device's own check says it
        raise ValueError(
            f"launcher.nproc_per_node={nproc} with trainer.device=cuda, but no GPU is present (0 GPUs): "
            f"run on a machine with {nproc} GPUs, or use trainer.device=cpu for {nproc} CPU processes"
        )


def launch_config(launcher_cfg, nproc: int) -> LaunchConfig:
    multi_node = launcher_cfg.nnodes > 1
    if multi_node and not (launcher_cfg.rdzv_endpoint and launcher_cfg.rdzv_id):
        raise ValueError(
            "launcher.nnodes > 1 needs launcher.rdzv_endpoint=<first node's host:port> and a "
            "launcher.rdzv_id shared by every node"
        )
    return LaunchConfig(
        min_nodes=launcher_cfg.nnodes,
        max_nodes=launcher_cfg.nnodes,
        nproc_per_node=nproc,
        run_id=launcher_cfg.rdzv_id or uuid.uuid4().hex[:12],
        # Port 0: the OS picks a free port, so two jobs started at once never fight over one.
        rdzv_endpoint=launcher_cfg.rdzv_endpoint if multi_node else "localhost:0",
        rdzv_backend="c10d",
        rdzv_configs={"timeout": 300},
        max_restarts=launcher_cfg.max_restarts,  # explicit: the API's default is 3, torchrun's CLI 0
        monitor_interval=launcher_cfg.monitor_interval,
        start_method="forkserver",
        # The signals on which the agent stops its workers. Not those that mean preemption (a SLURM job's SIGTERM):
        # the workers save a checkpoint on them themselves, and the agent waits for them (launcher/slurm.py).
        signals_to_handle=agent_signals(),
    )


@record
def worker_entry(cfg_container: dict, nproc: int, args) -> RunSummary:
    # Module-level so it pickles by name; @record writes the exception to the error file the agent reads.
    # The trainer is imported here, in the workers: the parent that launches them never needs it.
    from launcher.worker import run_worker

    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(cpu_threads(nproc))
    cfg = OmegaConf.create(cfg_container)
    env = init_run(cfg)
    if cfg.launcher.nnodes > 1:
        check_same_config(cfg_container, env)
    # The parent validated the config (and computed the model's arguments, args); a worker asks only its own GPU
    # what the parent could not.
    check_device_capabilities(cfg, args, env.device)
    return run_worker(cfg, env, args)


# Keys that may differ between the nodes of one job: where each was told it stands, and its run dir as an
# absolute path (each node resolves outputs/multinode/<rdzv_id> against its own working directory).
NODE_LOCAL_KEYS = ("run_dir",)


def check_same_config(container: dict, env) -> None:
    # Multi-node: each node's launcher composed its own config, but the nodes must run one job. A mismatch
    # would otherwise fail obscurely inside DDP (another model) or silently train diverging replicas
    # (another learning rate). Every rank learns every difference, so every rank fails with the same message.
    import torch.distributed as dist

    differences = _differences(container, broadcast_object(container, env))
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, differences)
    where = "; ".join(f"rank {r} has {', '.join(d)}" for r, d in enumerate(everyone) if d)
    if where:
        raise ValueError(
            f"the nodes of this job were started with different configs: {where}. "
            "Start every node with the same overrides"
        )


def _differences(mine, rank0, prefix: str = "") -> list[str]:
    if isinstance(mine, dict) and isinstance(rank0, dict):
        out = []
        for key in sorted(mine.keys() | rank0.keys(), key=str):
            out += _differences(mine.get(key), rank0.get(key), f"{prefix}{key}.")
        return out
    key = prefix.rstrip(".")
    return [] if mine == rank0 or key in NODE_LOCAL_KEYS else [f"{key}={mine!r} (rank 0: {rank0!r})"]


# The elastic agent narrates a stop at WARNING ("Received 2 death signal, shutting down workers", "Closing process
# ... via signal SIGINT"): a Ctrl-C is one line of ours (launcher/main.py), and a failure names its rank and cause.
QUIET_LOGGERS = (
    "torch.distributed.elastic.agent.server.api",
    "torch.distributed.elastic.multiprocessing.api",
)


def launch(cfg, nproc: int, args) -> RunSummary | None:
    warm_workers()  # started already by train.py where it knew; else here
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        results = elastic_launch(launch_config(cfg.launcher, nproc), worker_entry)(container, nproc, args)
    except ChildFailedError as e:
        # A spawned worker's traceback reaches nobody but the agent's error file: show the failed rank's.
        if trace := failure_traceback(e):
            print(
                f"shardlab: rank {e.get_first_failure()[0]}:\n{trace.rstrip()}", file=sys.stderr, flush=True
            )
        raise WorkerFailed(describe_failure(e)) from None
    return results.get(0)  # rank 0's summary (None on the other nodes of a multi-node job)
