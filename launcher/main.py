# What train.py calls once Hydra has composed the config: validate at the boundary, then run in this
# process (world size 1), under the torchrun that started us (style 1), or start the workers (styles 2, 3).
import contextlib
import shutil
import signal
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import record

from launcher import slurm
from launcher.compose import made_dirs
from launcher.elastic import WorkerFailed, check_gpus, launch, resolve_nproc
from launcher.errors import describe_error, fail, first_line, record_failure
from launcher.sweep import fill_sweep_logger, reuse_previous_success
from trainer import gpus
from trainer.checks import capability, check_device_capabilities, validate
from trainer.config import SCHEMAS
from trainer.dist import available_device, broadcast_object, close_distributed, init_run
from trainer.environments import current
from trainer.preempt import Interrupted
from trainer.summary import FAILED, PREEMPTED, RunSummary


def stamp_run(cfg: DictConfig) -> Path:
    hc = HydraConfig.get()
    cfg.run_dir = hc.runtime.output_dir
    cfg.choices = {g: str(hc.runtime.choices[g]) for g in SCHEMAS if g in hc.runtime.choices}
    return Path(cfg.run_dir)


@record  # the exception goes to torchrun's error file, so its report names this rank's cause, not only its exit
def main_torchrun(cfg: DictConfig) -> RunSummary:
    # Style 1: torchrun (or a pod operator, one process a worker) started every rank and each composed its own
    # config; rank 0's resolved one is the run's.
    # Each rank validates once, its own typed config (the same overrides everywhere) on its own device.
    env = init_run(cfg)
    try:
        args = validate(cfg, env.world_size, env.device.type, capability(env.device), per_node=env.per_node)
    except (ValueError, OmegaConfBaseException) as e:
        close_distributed(env)
        if env.is_rank0:
            fail(describe_error(e))
        raise SystemExit(2) from None
    own_dir = Path(cfg.run_dir)
    container, args = broadcast_object((OmegaConf.to_container(cfg, resolve=True), args), env)
    cfg = OmegaConf.create(container)
    if own_dir != Path(cfg.run_dir):
        # Another node of a static-rendezvous job (no shared run id) named its own dir before any rank could
        # talk, and Hydra made it; the run's dir is rank 0's, so this empty one goes (non-empty ones stay).
        with contextlib.suppress(OSError):
            own_dir.rmdir()
    # No launcher of ours sums up a torchrun job: the rank whose failure came first says it, in one line.
    from launcher.worker import run_worker

    try:
        return run_worker(cfg, env, args, say_first_failure=True)
    except (Interrupted, KeyboardInterrupt) as e:
        # a world of one (larger worlds' ranks leave with exit code 130 themselves)
        print(f"shardlab: {str(e) or 'interrupted before the first step'}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def main(cfg: DictConfig) -> RunSummary | None:
    run_dir = stamp_run(cfg)
    where = current()  # trainer/environments.py: where this job runs, detected once
    if not where.creates_processes:  # torchrun (or an operator) started every rank
        return main_torchrun(cfg)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    by_ray = where.workers_by == "ray"  # a job of hydra/launcher=ray: its workers are a Ray Train run
    if by_ray:
        from launcher import ray_train  # ray: only where it runs the job
    try:
        where.fill_launcher(cfg.launcher)  # several nodes of a SLURM job or of pods: from their variables
        nproc = resolve_nproc(cfg.launcher.nproc_per_node, cfg.trainer.device)
        if by_ray:
            # The workers' device is the cluster's, not this task's (hydra_plugins/shardlab_ray checked it).
            available, capability = ray_train.worker_device(HydraConfig.get().launcher), None
        else:
            check_gpus(nproc, cfg.trainer.device)
            # The device the workers will use, not merely whether a GPU is present: trainer.device=cpu on a
            # GPU machine must be checked as a CPU run. The GPUs' compute capability comes from NVML: the
            # parent never creates a CUDA context.
            available, capability = available_device(), gpus.capability()
        args = validate(cfg, nproc * cfg.launcher.nnodes, available, capability, per_node=nproc)
    except (ValueError, OmegaConfBaseException) as e:
        reason = describe_error(e)
        if not multirun:
            discard_if_unused(run_dir)
            fail(reason)
        record_failure(run_dir, reason)
        return job_outcome(run_dir, RunSummary(status=FAILED, error=reason))
    # -m sweeps: name the job's wandb run after the sweep; with sweep.resume=true reuse an earlier success
    fill_sweep_logger(cfg)
    if (reused := reuse_previous_success(cfg, run_dir, nproc * cfg.launcher.nnodes)) is not None:
        return reused
    print(f"shardlab: run directory {run_dir}", flush=True)
    in_process = nproc * cfg.launcher.nnodes == 1 and not multirun and not by_ray
    try:
        if in_process:  # this process is the worker: it asks its own GPU what validate() could not
            from launcher.worker import run_worker  # the trainer: only where it trains

            env = init_run(cfg)
            check_device_capabilities(cfg, args, env.device)
            summary = run_worker(cfg, env, args)
            if summary.status == PREEMPTED:
                stopped(run_dir, summary, [])
        else:  # a sweep job always runs in its own processes, so one job's crash cannot take the sweep down
            with slurm.held_signals() as got:
                summary = (ray_train.launch if by_ray else launch)(cfg, nproc, args)
            if got or (summary is not None and summary.status == PREEMPTED):
                stopped(run_dir, summary, got)
    except (KeyboardInterrupt, Interrupted, SignalException) as e:
        stopped_by_signal(run_dir, e)  # exits
    except Exception as e:
        # Not a WorkerFailed from a launch: the launcher itself failed (rendezvous, a signal), not rank 0.
        who = "rank 0" if in_process else "launcher"
        reason = str(e) if isinstance(e, WorkerFailed) else f"{who} failed: {first_line(e)}"
        from trainer.loop import NonFiniteLoss  # loaded already where the run trained in this process

        if not isinstance(e, (WorkerFailed, NonFiniteLoss)):  # a NaN loss is the run's outcome, not a bug
            traceback.print_exc()
        record_failure(run_dir, reason)
        if not multirun:
            fail(reason, code=1)
        summary = RunSummary(status=FAILED, error=reason)
    return job_outcome(run_dir, summary)


def discard_if_unused(run_dir: Path) -> None:
    # A run refused before it started leaves no directory behind: Hydra made it, with only its .hydra/ (a named
    # run's directory, or one given with hydra.run.dir, that holds a run already is kept as it is).
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)
        for made in made_dirs:  # the day's directory, if this run made it and it holds nothing else
            with contextlib.suppress(OSError):
                made.rmdir()


def stopped_by_signal(run_dir: Path, e: BaseException) -> None:
    # Ctrl-C (or a SIGINT, SIGTERM, SIGHUP sent to this process): the workers have stopped (the elastic agent sends
    # them the signal, and kills what is left after its timeout); rank 0 recorded the step it reached. One line,
    # and the shell's exit status for the signal (130 for SIGINT): no traceback, no worker left.
    signum = int(getattr(e, "sigval", signal.SIGINT))
    recorded = RunSummary.read(run_dir) if (run_dir / "summary.json").is_file() else None
    if signum == signal.SIGINT:
        line = str(e) if str(e).startswith("interrupted") else None
        line = line or (
            recorded.error if recorded and (recorded.error or "").startswith("interrupted") else None
        )
        line = line or "interrupted before the first step"
    else:
        line = f"stopped by {signal.Signals(signum).name}"
    record_failure(run_dir, line)
    print(f"shardlab: {line}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def stopped(run_dir: Path, summary: RunSummary | None, got: list[int]) -> None:
    # A SLURM signal came while the workers ran. They saved a checkpoint at a step boundary and stopped (or, where
    # it came in the last step, finished): the run is recorded as stopped until a requeued job finishes it.
    if summary is not None and summary.status != PREEMPTED:
        return  # finished before the signal mattered (None: rank 0 ran on another node)
    signum = got[0] if got else signal.Signals[summary.signal]
    name = signal.Signals(signum).name
    where = f"at step {summary.step}, checkpoint {summary.checkpoint}" if summary else "on another node"
    reason = (
        f"stopped by {name} {where} (SLURM preemption, requeue or time limit): a requeued job resumes from it"
    )
    record_failure(run_dir, reason)
    print(f"shardlab: {reason}", flush=True)
    slurm.hand_over(signum)


def job_outcome(run_dir: Path, summary: RunSummary | None) -> RunSummary | None:
    if summary is not None:
        loss = summary.final_loss if summary.final_loss is not None else float("nan")
        print(
            f"shardlab: {summary.status}: {run_dir}: {summary.error or f'final loss {loss:.4f}'}", flush=True
        )
    return summary
