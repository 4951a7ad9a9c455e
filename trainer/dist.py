# The process group around a run: which rank this is, which device it drives, and collectives the loop
# needs (mean loss, rank 0's config). One process without torchrun is world size 1 and needs none of it.
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from strategies import get_strategy
from trainer.config import one_of
from trainer.environments import current


@dataclass(frozen=True)
class DistEnv:
    # The processes: this one's world rank, its rank and the rank count on its node, the device it drives. How a
    # run lays its work over them (data, tensor, pipeline parallel) is the strategy's ParallelDims.
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int | None = None  # None: every rank on one node

    @property
    def per_node(self) -> int:
        return self.local_world_size or self.world_size

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


DEVICES = ("auto", "cpu", "cuda")


def cpu_threads(processes: int) -> int:
    # Threads per process on a CPU: OMP_NUM_THREADS, else the machine's cores over the processes sharing them (as the
    # launcher's workers set it, and as a calibration measures them).
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // processes)


def available_device() -> str:
    # What this machine offers; is_available() creates no CUDA context.
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_type(pref: str, available: str | None = None) -> str:
    # trainer.device -> the device type the run will use; available: what the machine has ("cuda" or "cpu";
    # None: this machine). The one check of trainer.device: validation asks it before any worker starts.
    one_of("trainer.device", pref, DEVICES)
    available = available or available_device()
    if pref == "cuda" and available != "cuda":
        raise ValueError("trainer.device=cuda but no CUDA GPU is visible: use trainer.device=cpu")
    return "cpu" if pref == "cpu" else available


def pick_device(pref: str, local_rank: int) -> torch.device:
    if device_type(pref) == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device_type: str, cpu_offload: bool = False) -> str:
    # A backend for each device the run's collectives touch: nccl for CUDA tensors; under FSDP's CPU offload
    # the sharded gradients are CPU tensors, whose norm (and ShardedGradScaler's inf check) all-reduce there,
    # so gloo too, as torchtitan does for offload.
    if device_type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


def init_run(cfg) -> DistEnv:
    # The process group a run's config asks for.
    return init_distributed(
        cfg.trainer.device,
        get_strategy(cfg.strategy.name).needs_group,
        cpu_offload=cfg.strategy.get("cpu_offload", False),
        timeout_s=cfg.launcher.get("timeout_s"),
    )


def init_distributed(
    device_pref: str, need_group: bool = False, cpu_offload: bool = False, timeout_s: float | None = None
) -> DistEnv:
    # need_group: a strategy that needs a process group (DDP, FSDP) even on a world of one. timeout_s: how
    # long a collective waits for a rank that never comes (None: torch's default, nccl 10 min, gloo 30 min).
    # This process's ranks as whatever started it says (trainer/environments.py): torchrun or the elastic agent of
    # launcher/elastic.py, a pod operator, or nobody (one process).
    rank, local_rank, world_size, local_world_size = current().ranks()
    device = pick_device(device_pref, local_rank)
    if (world_size > 1 or need_group) and not dist.is_initialized():
        backend = backend_for(device.type, cpu_offload)
        kwargs = {"device_id": device if device.type == "cuda" else None}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            store = _attempt_store(world_size)
            if store is not None:
                kwargs.update(store=store, rank=rank, world_size=world_size)
            dist.init_process_group(backend, **kwargs)
        else:  # one process, not started by a launcher: an in-process store needs no port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistEnv(rank, local_rank, world_size, device, local_world_size)


def _attempt_store(world_size: int):
    # An elastic agent (torchrun, or launcher.nproc_per_node > 1) hosts one TCPStore that outlives a restart
    # (launcher.max_restarts, torchrun --max-restarts): restarted ranks would find the dead ranks' gloo/nccl
    # addresses under the same keys and fail ("connectFullMesh failed ... Connection refused") or hang. Each
    # attempt gets its own key prefix in that store. None: the first attempt, or a store the ranks host.
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    return dist.PrefixStore(f"shardlab/attempt_{attempt}", agent_store)


def first_failure(env: DistEnv, reason: str) -> str:
    # -> the run's first failure, whichever rank hit it, claimed in the process group's store (the first rank to
    # set the key wins). Rank 0 writes summary.json, and its own error is often only a knock-on one: a peer
    # gone mid-collective, or the SIGTERM a launcher sends the others once one rank has failed.
    if not env.distributed:
        return reason
    key = f"shardlab/first_failure/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        return dist.distributed_c10d._get_default_store().compare_set(key, "", reason).decode()
    except Exception:  # the store went down with its host: this rank's own reason is all there is
        return reason


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed and env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.AVG if t.device.type == "cuda" else dist.ReduceOp.SUM)
        if t.device.type != "cuda":  # gloo has no AVG
            t /= env.world_size
    return t


def close_distributed(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()  # without it gloo teardown aborts now and then
        dist.destroy_process_group()
