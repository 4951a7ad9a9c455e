# A stop requested from outside: the signals that mean preemption where the job runs (trainer/environments.py:
# SLURM's SIGTERM and submitit's pre-timeout SIGUSR2) reach every process of a job, the workers included. A
# worker turns either into a request: at the next step boundary, every rank having agreed, the run saves a
# checkpoint and stops (launcher.slurm then requeues the job, which resumes from that checkpoint). Where no
# signal means preemption, signals keep their usual meaning.
import signal

_received: list[int] = []
_armed = False


class Interrupted(BaseException):
    # Ctrl-C (SIGINT) while training: "interrupted at step N; checkpoint ...", for the launcher to say in one line
    # and exit 130. A BaseException, as the KeyboardInterrupt it replaces: no handler of errors takes it for one.
    pass


def arm(signals) -> bool:
    # In a worker: catch these signals (instead of dying of them) and remember which came. -> whether armed.
    global _armed
    for sig in signals:
        signal.signal(sig, lambda signum, frame: _received.append(signum))
    _armed = bool(signals)
    return _armed


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
