# `python train.py -m hydra/launcher=ray ...`: Hydra's Ray launcher (hydra-ray-launcher), with shardlab's settings
# and three changes, registered under the plugin's own name by register() (train.py calls it after Hydra's plugin
# scan, as for hydra_plugins/shardlab_slurm).
# The plugin runs each job as one Ray task (its launch_job_on_ray: Hydra's run_job in a Ray worker process), so a
# job's training would be confined to that task's node and process. Here the task is only the job's driver: its
# launcher (launcher/main.py, environment RayJob) starts the job's workers as one Ray Train run
# (launcher/ray_train.py) of launcher.nnodes x launcher.nproc_per_node workers, which Ray may place on several nodes.
#   - the cluster must exist: hydra.launcher.address (auto: RAY_ADDRESS, or the head that `ray start --head` started
#     on this machine) is looked up and its port tried within hydra.launcher.connect_timeout_s, where the plugin's
#     ray.init() would start a private local Ray instead (address None) or wait on an unreachable one for minutes;
#   - before anything is submitted: every job's workers must fit the cluster (CPUs and GPUs per worker against its
#     largest node, all of them against the whole cluster), one line naming the fix;
#   - results are collected job by job (ray.wait): the plugin's `[ray.get(run) for run in runs]` raises at the first
#     job whose task died (its node lost, the task killed), Hydra's multirun then skips on_multirun_end, and the sweep
#     report is lost. Here such a job becomes a failed row with Ray's reason, and the others are still waited for.
# Jobs start as the cluster has room for them (at most as many at once as its CPUs and GPUs hold), so that one job's
# workers do not wait for placement behind another's; hydra.launcher.start_timeout_s bounds that wait otherwise (a
# cluster shared with others): the job fails with Ray's word for it.
import json
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from omegaconf import OmegaConf, open_dict

try:  # the `ray` extra (make install-ray); without it hydra/launcher=ray says how to get it, in one line
    from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher as PluginRayLauncher

    HAVE_RAY = True
except ImportError:
    from hydra.plugins.launcher import Launcher as PluginRayLauncher

    HAVE_RAY = False

from launcher.errors import fail, record_failure
from trainer.environments import RAY_JOB
from trainer.summary import FAILED, RunSummary

PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _task_options() -> dict[str, Any]:
    # The job's Ray task only waits on its Ray Train run: it holds no CPU the workers need. max_calls=1: each job gets
    # a fresh process, as a local sweep's jobs get their own workers (shardlab's modules keep a run's state).
    return {"num_cpus": 0, "max_calls": 1}


@dataclass
class ShardlabRayConf:
    _target_: str = "hydra_plugins.shardlab_ray.ray_launcher.RayLauncher"
    address: str = (
        "auto"  # the cluster's head (host:port); auto: RAY_ADDRESS, or the local `ray start --head`
    )
    connect_timeout_s: float = 10.0  # how long to try the head's port before saying there is no cluster
    cpus_per_worker: float = 1.0
    gpus_per_worker: int | None = (
        None  # None: one per worker unless trainer.device=cpu (auto: where the cluster has any)
    )
    placement_strategy: str = (
        "PACK"  # Ray's: PACK, SPREAD, STRICT_PACK (one node), STRICT_SPREAD (one worker a node)
    )
    max_failures: int = 0  # Ray Train's FailureConfig: restarts of the worker group after a worker dies
    start_timeout_s: float = 300.0  # how long a job's workers may wait to be placed before the job fails
    # The plugin's own: ray.init's arguments (address comes from hydra.launcher.address) and the job task's options.
    ray: dict[str, Any] = field(default_factory=lambda: {"init": {}, "remote": _task_options()})


def worker_gpus(device: str, cluster_gpus: float) -> int:
    # GPUs per worker, from trainer.device: none for cpu; one for cuda; for auto, one where the cluster has GPUs.
    return 0 if device == "cpu" or (device == "auto" and not cluster_gpus) else 1


def register() -> None:
    ConfigStore.instance().store(
        group="hydra/launcher", name="ray", node=ShardlabRayConf(), provider="shardlab"
    )


def head_address(address: str, timeout_s: float) -> str:
    # hydra.launcher.address -> host:port of a head that answers, or one line saying there is none and what to do.
    from ray._private.services import canonicalize_bootstrap_address_or_die  # Ray's own lookup of "auto"

    if str(address).startswith("ray://"):
        fail(
            f"hydra.launcher.address={address} is a Ray Client address: run the sweep on a node of the cluster "
            "with its head's host:port (or auto)"
        )
    drop = "or drop hydra/launcher=ray to run on this machine"
    try:
        found = canonicalize_bootstrap_address_or_die(None if address == "auto" else str(address))
    except (ConnectionError, ValueError) as e:
        fail(
            f"no Ray cluster at hydra.launcher.address={address} ({str(e).split('. ')[0].strip()}): start one "
            f"with `ray start --head`, or set hydra.launcher.address (or RAY_ADDRESS) to its head, {drop}"
        )
    host, _, port = found.rpartition(":")
    if not _answers(host, int(port), timeout_s):
        fail(
            f"no Ray cluster answers at {found} (hydra.launcher.address={address}) within {timeout_s:g} s: start "
            f"one with `ray start --head`, or set hydra.launcher.address (or RAY_ADDRESS) to a running head, {drop}"
        )
    return found


def _answers(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout_s):
            return True
    except OSError:
        return False


def cluster() -> dict:
    # The cluster as it is now: its total CPUs and GPUs, and its largest node's.
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return {
        "nodes": len(nodes),
        "cpus": total.get("CPU", 0.0),
        "gpus": total.get("GPU", 0.0),
        "node_cpus": max((n.get("CPU", 0.0) for n in nodes), default=0.0),
        "node_gpus": max((n.get("GPU", 0.0) for n in nodes), default=0.0),
    }


def workers_of(job_cfg) -> int:
    nproc = str(job_cfg.launcher.nproc_per_node)
    if not nproc.isdigit() or int(nproc) < 1:
        fail(
            f"launcher.nproc_per_node={nproc}: under hydra/launcher=ray give the workers per node as a number "
            "(auto counts the GPUs of the machine it runs on, and Ray places the workers)"
        )
    return int(nproc) * int(job_cfg.launcher.nnodes)


def check_fits(job_cfg, params, have: dict) -> None:
    # One job's request against the cluster, before anything is submitted; one line naming the fix.
    workers, cpus, gpus = workers_of(job_cfg), params.cpus_per_worker, params.gpus_per_worker or 0
    if params.placement_strategy not in PLACEMENT:
        fail(
            f"hydra.launcher.placement_strategy={params.placement_strategy}: use one of {', '.join(PLACEMENT)}"
        )
    if params.max_failures > 0 and job_cfg.checkpoint.every_n_steps < 1:
        fail(
            f"hydra.launcher.max_failures={params.max_failures} restarts the workers from the newest checkpoint, "
            "but checkpoint.every_n_steps=0 saves none, so a restart would start over: add checkpoint=periodic "
            "(or checkpoint.every_n_steps=N), or set hydra.launcher.max_failures=0"
        )
    what = f"{workers} worker(s) (launcher.nnodes x launcher.nproc_per_node)"
    if cpus > have["node_cpus"]:
        fail(
            f"hydra.launcher.cpus_per_worker={cpus:g}, but the Ray cluster's largest node has {have['node_cpus']:g} "
            "CPUs: ask for fewer CPUs per worker"
        )
    if gpus > have["node_gpus"]:
        fail(
            f"{gpus} GPU(s) per worker (hydra.launcher.gpus_per_worker; trainer.device=cpu asks for none), but the "
            f"Ray cluster's largest node has {have['node_gpus']:g}: use trainer.device=cpu, or a cluster with GPUs"
        )
    if workers * cpus > have["cpus"]:
        fail(
            f"{what} x {cpus:g} CPU(s) each need {workers * cpus:g} CPUs, but the Ray cluster has {have['cpus']:g} "
            f"in all: use fewer workers or hydra.launcher.cpus_per_worker, or add nodes"
        )
    if workers * gpus > have["gpus"]:
        fail(
            f"{what} x {gpus} GPU(s) each need {workers * gpus} GPUs, but the Ray cluster has {have['gpus']:g} in "
            "all: use fewer workers, or add nodes"
        )
    if params.placement_strategy == "STRICT_SPREAD" and workers > have["nodes"]:
        fail(
            f"hydra.launcher.placement_strategy=STRICT_SPREAD puts each of the {workers} worker(s) on a node of its "
            f"own, but the Ray cluster has {have['nodes']} node(s): use SPREAD or PACK, or fewer workers"
        )


def at_once(jobs: list[tuple[int, int]], have: dict) -> int:
    # How many jobs may run at once: as many of the largest as the cluster's CPUs and GPUs hold (at least one).
    cpus = max(c for c, _ in jobs)
    gpus = max(g for _, g in jobs)
    limits = [have["cpus"] // cpus if cpus else math.inf, have["gpus"] // gpus if gpus else math.inf]
    n = min(limits)
    return max(1, int(n) if n != math.inf else len(jobs))


class InDir:
    # The task function, run in the directory the sweep was started from: relative paths in the config (data,
    # checkpoints, outputs/) mean there what they mean here. A module-level class: it pickles by name.
    def __init__(self, cwd: str, task_function) -> None:
        self.cwd, self.task_function = cwd, task_function

    def __call__(self, cfg):
        os.chdir(self.cwd)
        return self.task_function(cfg)


class RayLauncher(PluginRayLauncher):
    def __init__(self, ray, **params) -> None:
        if not HAVE_RAY:
            fail(
                "hydra/launcher=ray needs Ray Train and Hydra's Ray launcher, and they are not installed: run "
                "`make install-ray` (pip install -e '.[ray]'), or drop hydra/launcher=ray"
            )
        super().__init__(OmegaConf.create(ray))
        self.params = params

    def launch(self, job_overrides, initial_job_idx: int):
        import ray
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray  # imports ray
        from ray.exceptions import RayError

        setup_globals()
        address = head_address(self.params["address"], self.params["connect_timeout_s"])
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        init = OmegaConf.to_container(self.ray_cfg.init, resolve=True) or {}
        # Each job's task and its workers import shardlab from this checkout (the same path on every node) and write
        # under this working directory; Ray's usage report stays off (nothing leaves the cluster).
        env_vars = {
            "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
        }
        env_vars |= {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
        init.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env_vars)
        init.setdefault("log_to_driver", True)
        ray.init(address=address, **init)
        have = cluster()
        jobs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            params = cfg.hydra.launcher
            with open_dict(cfg):
                cfg.hydra.job.id = f"job_id_for_{idx}"
                cfg.hydra.job.num = idx
                cfg.hydra.sweep.dir = str(sweep_dir)
                if params.gpus_per_worker is None:
                    params.gpus_per_worker = worker_gpus(cfg.trainer.device, have["gpus"])
            check_fits(cfg, params, have)
            jobs.append((idx, list(overrides), cfg))
        print(f"shardlab: Ray cluster at {address}: {have['nodes']} node(s), {have['cpus']:g} CPUs, "
              f"{have['gpus']:g} GPUs; sweep dir {sweep_dir}", flush=True)  # fmt: skip
        need = [(workers_of(c) * c.hydra.launcher.cpus_per_worker, workers_of(c) * c.hydra.launcher.gpus_per_worker)
                for _, _, c in jobs]  # fmt: skip
        limit = at_once(need, have)
        remote = OmegaConf.to_container(self.ray_cfg.remote, resolve=True) or {}
        results: dict[int, JobReturn] = {}
        running: dict[Any, tuple[int, list[str], Any]] = {}
        waiting = list(jobs)
        while waiting or running:
            while waiting and len(running) < limit:
                idx, overrides, cfg = waiting.pop(0)
                print(f"shardlab: #{idx}: {' '.join(filter_overrides(overrides))}", flush=True)
                timeout = str(cfg.hydra.launcher.start_timeout_s)
                options = {**remote, "runtime_env": {"env_vars": {RAY_JOB: address,
                           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": timeout}}}  # fmt: skip
                task = InDir(os.getcwd(), self.task_function)
                ref = launch_job_on_ray(
                    self.hydra_context, OmegaConf.create(options), cfg, task, Singleton.get_state()
                )
                running[ref] = (idx, overrides, cfg)
            done, _ = ray.wait(list(running), num_returns=1)
            idx, overrides, cfg = running.pop(done[0])
            try:
                results[idx] = ray.get(done[0])
            except RayError as e:  # the job's task died, or raised past launcher/main.py
                results[idx] = self._failed(cfg, overrides, e)
        write_record(sweep_dir, jobs)
        ray.shutdown()  # flushes what the workers printed, before the sweep's report
        return [results[idx] for idx, _, _ in jobs]

    def _failed(self, cfg, overrides: list[str], e) -> JobReturn:
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        reason = f"the job's Ray task failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        record_failure(run_dir, reason)
        print(f"shardlab: failed: {run_dir}: {reason}", file=sys.stderr, flush=True)
        ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
        ret.return_value = RunSummary(status=FAILED, error=reason)
        return ret


RECORD = "ray_runs.json"  # in the sweep dir: Ray's own record of each job's Ray Train run


def write_record(sweep_dir: Path, jobs) -> None:
    # Ray Train's record of each job's run, like sacct's of a SLURM sweep: its id, final state and attempts, said
    # in one line a job and kept in the sweep dir.
    from launcher.ray_train import find_runs, run_name

    names = {
        idx: run_name(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)) for idx, _, cfg in jobs
    }
    try:
        record = {
            run["name"]: {"run_id": run_id, **run} for run_id, run in find_runs(list(names.values())).items()
        }
    except Exception as e:  # an internal API of Ray's: its absence costs the record, not the sweep
        print(f"shardlab: Ray's record of the runs could not be read ({type(e).__name__}: {e})", flush=True)
        return
    rows = []
    for idx, name in names.items():
        run = record.get(name, {"name": name, "status": "NOT STARTED", "attempts": []})
        rows.append({"job": idx, **run})
        attempts = run["attempts"]
        nodes = {w["node_id"][:8] for a in attempts for w in a["workers"]}
        print(
            f"shardlab: #{idx}: Ray Train run {run.get('run_id', name)} {run['status']}, {len(attempts)} attempt(s)"
            + (
                f" ({', '.join(a['status'] for a in attempts)}) on node(s) {', '.join(sorted(nodes))}"
                if nodes
                else ""
            ),
            flush=True,
        )
    (sweep_dir / RECORD).write_text(json.dumps(rows, indent=1))
