# One 2-process gloo group for many runs: torch's elastic launch (spawn, c10d rendezvous on localhost:0,
# as launcher/elastic.py starts workers) calls a module-level function of this file in each worker, which
# runs the given jobs one after another in the same process group. Starting a group costs seconds on this
# machine; a tiny run costs a fraction of one.
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.distributed.tensor import DTensor

from launcher.prefork import warm_workers
from trainer.dist import close_distributed, init_distributed
from trainer.summary import RunSummary


def launch(fn, *args, nproc: int = 2) -> dict:
    # -> {rank: what fn returned there}. A failing worker raises ChildFailedError naming its rank.
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:12],
        rdzv_endpoint="localhost:0",
        rdzv_backend="c10d",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="forkserver",
    )
    warm_workers(("tests.helpers.dist", "launcher.worker"))  # one server for every launch of the session
    return elastic_launch(config, fn)(*args)


def run_jobs(jobs: list[tuple[str, str, dict]], out: str, kinds: dict | None = None) -> dict[str, dict]:
    # jobs: (kind, name, resolved config), each run as kinds[kind](cfg, env, <out>/<name>). kinds: module-level
    # functions (the spawned workers import them by name); by default "train": trainer.loop.train, returning
    # its summary (rank 0 also writes metrics.jsonl and summary.json there), and "inspect": build the
    # parallel model the way train() does and describe its parameters.
    kinds = kinds or {"train": _train, "inspect": _inspect}
    torch.set_num_threads(1)  # 2 cores, 2 ranks: more threads only spin against each other
    env = init_distributed("cpu", need_group=True)
    results = {}
    for kind, name, container in jobs:
        cfg = OmegaConf.create(container)
        run_dir = Path(out) / name
        cfg.run_dir = str(run_dir)
        if env.is_rank0:
            run_dir.mkdir(parents=True)
        dist.barrier()
        results[name] = kinds[kind](cfg, env, run_dir)
    close_distributed(env)
    return results


def _train(cfg, env, run_dir: Path) -> RunSummary:
    from trainer.checks import model_args
    from trainer.loop import train

    return train(cfg, env, run_dir, model_args(cfg))


def _inspect(cfg, env, run_dir: Path) -> dict:
    from tests.helpers.run import build_for
    from trainer.checks import run_dims

    model, _ = build_for(cfg, env)
    mesh = run_dims(cfg.strategy, env.world_size, env.per_node, env.rank).mesh(env.device.type)
    params = {}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        params[name] = {
            "dtensor": isinstance(p, DTensor),
            "placements": [repr(pl) for pl in p.placements] if isinstance(p, DTensor) else [],
            "mesh_shape": list(p.device_mesh.shape) if isinstance(p, DTensor) else [],
            "global_numel": p.numel(),
            "local_numel": local.numel(),
            "local_device": str(local.device),
        }
    # FSDP2 keeps no public handle on the policy a module was sharded with; its parameter group does.
    state = model._get_fsdp_state() if hasattr(model, "_get_fsdp_state") else None
    group = getattr(state, "_fsdp_param_group", None)
    return {
        "params": params,
        "offload_policy": type(group.offload_policy).__name__ if group is not None else None,
        "mesh": dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True)) if mesh is not None else None,
    }


def raise_at_step(rank: int, step: int) -> None:
    # In the process that is `rank` (RANK, as the launchers set it), the training step raises at `step`, after
    # the earlier steps have trained and been logged: the others are inside that step's gradient all-reduce.
    import trainer.loop

    if int(os.environ.get("RANK", "0")) != rank:
        return
    real_step, calls = trainer.loop.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise RuntimeError(f"worker failure injected at step {step}")
        return real_step(*args, **kwargs)

    trainer.loop.train_step = train_step  # train() looks the name up at every step


def fail_mid_run(rank: int, step: int, container: dict, out: str) -> RunSummary:
    # The run launcher/elastic.worker_entry makes, with raise_at_step.
    from launcher.worker import run_worker
    from trainer.checks import model_args

    torch.set_num_threads(1)
    raise_at_step(rank, step)
    env = init_distributed("cpu", need_group=True)
    cfg = OmegaConf.create(container)
    cfg.run_dir = out
    return run_worker(cfg, env, model_args(cfg))
