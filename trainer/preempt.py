# A stop requested from outside: SLURM's SIGTERM (preemption, `scontrol requeue`, scancel) and the pre-timeout
# signal submitit asks for (SIGUSR2, `--signal=USR2@<hydra.launcher.signal_delay_s>`) reach every process of a
# job, the workers included. A worker of a SLURM job turns either into a request: at the next step boundary,
# every rank having agreed, the run saves a checkpoint and stops (launcher.slurm then requeues the job, which
# resumes from that checkpoint). Elsewhere the signals keep their usual meaning.
# Standard library at import: launcher/slurm.py (imported before torch) takes job_id from here.
import os
import signal

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
_received: list[int] = []
_armed = False


def under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


def job_id() -> str | None:
    # As sacct and squeue name it: "<array job>_<task>" for a job of an array (a sweep), else the job id.
    if not under_slurm():
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]


def arm() -> bool:
    # In a worker: catch the signals (instead of dying of them) and remember which came. -> whether armed.
    global _armed
    if not under_slurm():
        return False
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: _received.append(signum))
    _armed = True
    return True


def requested(env) -> str | None:
    # At a step boundary: the signal's name if any rank got one, the same answer on every rank (a rank that saved
    # alone would leave the others in the next step's collectives). One small all-reduce per step, only when armed.
    if not _armed:
        return None
    import torch
    import torch.distributed as dist

    flag = torch.tensor([_received[0] if _received else 0], dtype=torch.int32, device=env.device)
    if env.distributed and env.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return signal.Signals(int(flag.item())).name if flag.item() else None


def restarted() -> bool:
    # A requeued SLURM job runs again from its start; SLURM counts the restarts.
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
