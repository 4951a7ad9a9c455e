# `python train.py -m hydra/launcher=submitit_slurm ...`: Hydra's submitit launcher (hydra-submitit-launcher,
# submitit), with shardlab's settings and two changes, registered under the plugin's own name by register().
# Hydra instantiates launchers only from the hydra_plugins package, hence this module's place; and its plugin
# scan runs every plugin's module again, which stores the plugin's own entry again: train.py calls
# register() after that scan.
#   - before anything is submitted: sbatch must be on PATH, the partition must exist and the request fit a node
#     (one line each, naming the fix);
#   - results are collected job by job: the plugin's `[j.results()[0] for j in jobs]` raises at the first job
#     that died without a result (scancel, the OOM killer taking the whole job, a node failure), Hydra's
#     multirun then skips on_multirun_end, and the sweep report is lost. Here such a job becomes a failed row
#     with SLURM's state as its reason, and the others are still waited for.
# Inside each job launcher/slurm.py takes the rendezvous from the allocation and turns preemption into a
# checkpoint and a requeue (hydra.launcher.max_num_timeout: how many timeouts may requeue it).
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as PluginSlurmLauncher
from omegaconf import OmegaConf, open_dict

from launcher.errors import fail, record_failure
from launcher.slurm import per_node, slurm_gpus
from trainer.summary import FAILED, RunSummary


@dataclass
class ShardlabSlurmConf(SlurmQueueConf):
    # The settings users always set, each overridable (hydra.launcher.partition=gpu ...): the node count and GPUs
    # per node follow launcher.nnodes and launcher.nproc_per_node (no GPUs for trainer.device=cpu), one task per
    # node, a core per worker unless told otherwise, and requeues on timeout, since runs resume from checkpoints.
    _target_: str = "hydra_plugins.shardlab_slurm.submitit_slurm.SlurmLauncher"
    partition: str | None = None  # None: the cluster's default partition
    timeout_min: int = 60
    nodes: int = "${launcher.nnodes}"  # type: ignore[assignment]
    tasks_per_node: int = 1
    gpus_per_node: int | None = "${shardlab_slurm_gpus:${launcher.nproc_per_node},${trainer.device}}"  # type: ignore[assignment]
    cpus_per_task: int | None = "${shardlab_slurm_cpus:${launcher.nproc_per_node}}"  # type: ignore[assignment]
    mem_gb: int | None = None  # None: the partition's default
    max_num_timeout: int = 3


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="submitit_slurm", node=ShardlabSlurmConf(), provider="shardlab")
    for name, fn in (("shardlab_slurm_gpus", slurm_gpus), ("shardlab_slurm_cpus", per_node)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def partitions() -> dict[str, dict]:
    # sinfo, one row per partition and node configuration -> {partition: the largest node's cpus, memory MB,
    # GPUs, and node count; "default": whether it is the default}.
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%D"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        fail(f"sinfo failed ({out.stderr.strip() or out.returncode}): check that the SLURM controller is up")
    parts: dict[str, dict] = {}
    for line in out.stdout.splitlines():
        name, cpus, mem, gres, nodes = line.split("|")
        default = name.endswith("*")
        p = parts.setdefault(
            name.rstrip("*"), {"cpus": 0, "mem_mb": 0, "gpus": 0, "nodes": 0, "default": default}
        )
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        p["cpus"], p["gpus"] = max(p["cpus"], int(cpus.rstrip("+"))), max(p["gpus"], gpus)
        p["mem_mb"], p["nodes"] = max(p["mem_mb"], int(mem.rstrip("+"))), p["nodes"] + int(nodes)
    return parts


def preflight(params: dict) -> None:
    # What the cluster can tell before a job is submitted; one line each.
    if shutil.which("sbatch") is None:
        fail(
            "hydra/launcher=submitit_slurm needs SLURM's sbatch on PATH, and it is not: run this on a login node "
            "of the cluster, or drop hydra/launcher=submitit_slurm to run on this machine"
        )
    parts = partitions()
    name = params.get("partition") or next((n for n, p in parts.items() if p["default"]), None)
    if name not in parts:
        asked = (
            f"hydra.launcher.partition={name}" if name else "no hydra.launcher.partition and no default one"
        )
        fail(
            f"{asked}: this cluster's partitions are {', '.join(parts) or 'none'}: set hydra.launcher.partition"
        )
    p, nodes = parts[name], params.get("nodes") or 1
    cpus = (params.get("cpus_per_task") or 1) * (params.get("tasks_per_node") or 1)
    mem_mb = (params.get("mem_gb") or 0) * 1024
    gpus = params.get("gpus_per_node") or 0
    too_big = [
        f"{what} {want} per node (hydra.launcher.{key}), but its largest node has {have}"
        for what, key, want, have in (
            ("CPUs", "cpus_per_task", cpus, p["cpus"]),
            ("memory MB", "mem_gb", mem_mb, p["mem_mb"]),
            ("GPUs", "gpus_per_node, one per worker; trainer.device=cpu asks for none", gpus, p["gpus"]),
            ("nodes", "nodes", nodes, p["nodes"]),
        )
        if want > have
    ]
    if too_big:
        fail(f"the request is larger than any node of partition {name}: {'; '.join(too_big)}: ask for less")


class SlurmLauncher(PluginSlurmLauncher):
    def launch(self, job_overrides, initial_job_idx: int):
        import submitit  # as the plugin does: only when a sweep is launched

        preflight(self.params)
        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=self.params["submitit_folder"],
            slurm_max_num_timeout=self.params["max_num_timeout"],
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())  # the rest are sbatch's: slurm_<name>
        executor.update_parameters(
            **{k if k in base else f"slurm_{k}": v for k, v in self.params.items() if k not in init_keys}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        args = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            print(f"shardlab: #{idx}: {' '.join(filter_overrides(overrides))}", flush=True)
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", _singletons()))
        jobs = executor.map_array(self, *zip(*args, strict=True))
        print(
            f"shardlab: submitted SLURM job(s) {', '.join(j.job_id for j in jobs)}; sweep dir {sweep_dir}",
            flush=True,
        )
        watch(jobs, [a[2] for a in args])
        return [self._result(job, a[0], a[2]) for job, a in zip(jobs, args, strict=True)]

    def _result(self, job, overrides: list[str], num: int) -> JobReturn:
        try:
            return job.results()[0]
        except Exception:  # the job ended without a result (or with submitit's error): SLURM's state says how
            state = job.state
            reason = f"SLURM job {job.job_id} ended {state} without a result ({_kind(state)})"
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num  # as the job itself would have had it
            run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            # What the job recorded itself follows SLURM's word (e.g. "stopped by SIGUSR2 at step 40 ..." when
            # submitit would not requeue it again); a summary of a run that finished is left as it is.
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
            own = _read_summary(run_dir)
            if own.ok:  # the run finished; only submitit's record of it was lost
                ret.return_value = own
                return ret
            if own.error:  # e.g. scancel's SIGTERM made the workers checkpoint first
                reason = f"{reason}; the job had recorded: {own.error}"
            record_failure(run_dir, reason, slurm_job_id=job.job_id)
            print(f"shardlab: failed: {run_dir}: {reason}", flush=True)
            ret.return_value = RunSummary(status=FAILED, error=reason)
            return ret


WATCH_S = 2.0  # how often a sweep asks SLURM for its jobs' states (submitit caches squeue/sacct between asks)
SETTLE_S = 30.0  # how long a finished sweep waits for SLURM's accounting to give each job's final state
UNSETTLED = {
    "UNKNOWN",
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "COMPLETING",
    "CONFIGURING",
    "SUSPENDED",
    "RESIZING",
}


def watch(jobs, nums: list[int]) -> None:
    # A sweep says each job's state as it changes (PENDING, RUNNING, COMPLETED ...), so that the wait after the
    # submission is not silent; it returns once every job has ended (their time limits bound how long that is).
    seen: dict[str, str] = {}

    def say(mode: str) -> None:
        for num, job in zip(nums, jobs, strict=True):
            state = job.watcher.get_state(job.job_id, mode=mode)
            if state != "UNKNOWN" and seen.get(job.job_id) != state:  # UNKNOWN: not yet in squeue's answer
                seen[job.job_id] = state
                print(f"shardlab: #{num}: SLURM job {job.job_id} {state}", flush=True)

    while not all(job.done() for job in jobs):
        say("standard")
        time.sleep(WATCH_S)
    # done() sees a job's result file before SLURM's accounting (sacct) has its end: each job's final state, waited
    # for a bounded while.
    until = time.monotonic() + SETTLE_S
    while True:
        say("force")
        if all(seen.get(job.job_id, "UNKNOWN") not in UNSETTLED for job in jobs) or time.monotonic() > until:
            return
        time.sleep(WATCH_S)


def _read_summary(run_dir: Path) -> RunSummary:
    # What the job recorded, or a failure with nothing to say where it recorded nothing readable.
    try:
        return RunSummary.read(run_dir) or RunSummary(status=FAILED)
    except (OSError, ValueError):
        return RunSummary(status=FAILED)


def _singletons():
    from hydra.core.singleton import Singleton

    return Singleton.get_state()


KINDS = {
    "CANCELLED": "scancel, or an administrator",
    "OUT_OF_MEMORY": "the job went over its memory: raise hydra.launcher.mem_gb or lower the micro-batch",
    "TIMEOUT": "its time limit: raise hydra.launcher.timeout_min",
    "NODE_FAIL": "a node failed",
    "PREEMPTED": "preempted and not requeued",
}


def _kind(state: str) -> str:
    return next(
        (text for key, text in KINDS.items() if state.startswith(key)), "killed before it could report"
    )
