# One rank's whole run, whoever started it (in-process, the elastic agent's spawned workers, torchrun): the
# config saved, train(), and a failure recorded in summary.json before it propagates.
import signal
import sys
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launcher.errors import first_line, record_failure
from trainer import preempt
from trainer.dist import DistEnv, close_distributed, first_failure
from trainer.environments import current
from trainer.loop import train
from trainer.preempt import Interrupted
from trainer.summary import RunSummary

# Longer than two polls of the elastic agent (launcher.monitor_interval, 0.5 s) and torchrun's (0.1 s).
FAILURE_GRACE_S = 2.0


class Terminated(BaseException):
    # SIGTERM in a worker of a multi-process run, as an exception: a launcher stops every rank once one has
    # failed, and rank 0 still records the run's failure on its way out. A BaseException: not its own failure.
    pass


def _raise_terminated(signum, frame):
    raise Terminated(f"stopped by {signal.Signals(signum).name} (a launcher stops all ranks when one fails)")


def _handle(sig: signal.Signals, handler) -> None:
    # Python runs signal handlers in the main thread only, and a Ray Train worker's function runs in another
    # (Ray ends those workers itself): there, signals keep the meaning Ray gives them.
    if threading.current_thread() is threading.main_thread():
        signal.signal(sig, handler)


def run_worker(cfg: DictConfig, env: DistEnv, args, say_first_failure: bool = False) -> RunSummary:
    # args: the model's arguments, computed once where the config was checked. A failure is recorded in
    # summary.json (rank 0: the run's first failure, whichever rank had it) before it propagates;
    # say_first_failure: the rank that had it also prints it in one line.
    run_dir = Path(cfg.run_dir)
    # A SLURM job's SIGTERM or SIGUSR2 asks for a checkpoint at the next step (trainer/preempt.py). Under SLURM
    # a launcher's SIGTERM after another rank failed is caught the same way: the others then fail in the
    # failed rank's collectives (gloo), or are killed by the agent after its shutdown timeout (nccl).
    if not preempt.arm(current().preemption_signals) and env.world_size > 1:
        _handle(signal.SIGTERM, _raise_terminated)
    try:
        if env.is_rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        summary = train(cfg, env, run_dir, args)
    except (Interrupted, KeyboardInterrupt) as e:
        # Ctrl-C reaches every process: rank 0 records where the run stopped; the launcher says it in one line.
        _handle(signal.SIGINT, signal.SIG_IGN)
        if env.is_rank0:
            record_failure(run_dir, str(e) or "interrupted before the first step")
        if env.world_size > 1:
            raise SystemExit(130) from None  # a worker's exit, not a traceback in its log
        raise
    except BaseException as e:
        if env.world_size > 1:  # a launcher's SIGTERM must not cut the record short
            _handle(signal.SIGTERM, signal.SIG_IGN)
        mine = f"rank {env.rank} failed: {first_line(e)}"
        cause = first_failure(env, mine)
        if say_first_failure and cause == mine:
            print(f"shardlab: error: {mine}", file=sys.stderr, flush=True)
        # Rank 0 records the run's first failure, and so does the rank that had it: under nccl the others
        # may be blocked in a CUDA sync where no signal handler runs, rank 0 among them.
        if env.is_rank0 or cause == mine:
            record_failure(run_dir, cause)
        if isinstance(e, Exception) and env.world_size > 1:
            # No barrier and no teardown here: the other ranks are still inside the step's collectives,
            # so a barrier would wait for them forever. They fail when this process exits and closes its
            # connections; waiting first lets the launcher see this rank fail before theirs, and name it.
            time.sleep(FAILURE_GRACE_S)
        raise
    close_distributed(env)
    return summary
