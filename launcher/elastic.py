# Style 2 (`python train.py launcher.nproc_per_node=N`) and each job of style 3 (`-m`): the parent has
# composed and resolved the config once; it starts the workers with torch's elastic launch API (spawn, a
# module-level entrypoint, c10d rendezvous). The parent never touches CUDA.
import os
import uuid

from omegaconf import OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from trainer.dist import init_distributed

CPU_DEFAULT_NPROC = 2  # nproc_per_node=auto without GPUs: enough to exercise the collectives


class WorkerFailed(RuntimeError):
    pass


def resolve_nproc(value: str) -> int:
    if value == "auto":
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
        start_method="spawn",
    )


@record
def worker_entry(cfg_container: dict, nproc: int) -> dict:
    # Module-level so spawn can pickle it; @record writes the exception to the error file the agent reads.
    from launcher.main import run_worker

    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    cfg = OmegaConf.create(cfg_container)
    env = init_distributed(cfg.trainer.device, cfg.strategy.name != "single")
    return run_worker(cfg, env)


def launch(cfg, nproc: int) -> dict | None:
    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        results = elastic_launch(launch_config(cfg.launcher, nproc), worker_entry)(container, nproc)
    except ChildFailedError as e:
        raise WorkerFailed(describe_failure(e)) from None
    return results.get(0)  # rank 0's summary (None on the other nodes of a multi-node job)


def describe_failure(e: ChildFailedError) -> str:
    rank, failure = min(e.failures.items())  # the first rank that failed
    cause = _last_error_line(failure.message) if isinstance(failure.message, str) else ""
    if failure.signal_name() and failure.exitcode < 0:
        cause = f"killed by {failure.signal_name()}"
    return f"rank {rank} failed (exit code {failure.exitcode}): {cause or 'see its output above'}"


def _last_error_line(message: str) -> str:
    # The recorded message ends with the traceback; its last non-empty line is "ExcType: what".
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
