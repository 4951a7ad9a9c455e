# What a shardlab job does differently inside a SLURM allocation: a job of Hydra's submitit launcher
# (`-m hydra/launcher=submitit_slurm`, hydra_plugins/shardlab_slurm) or the `srun python train.py` of a script from
# `python -m commands.sbatch`. One task per node; in each, shardlab's own launcher starts the local workers.
#   - the rendezvous comes from the allocation (trainer/environments.py's Slurm: launcher.nnodes is checked
#     against the step's tasks, the endpoint is the first node, the id the SLURM job id);
#   - preemption: SLURM's SIGTERM and submitit's pre-timeout SIGUSR2 reach every process of the job. The workers
#     save a checkpoint at the next step boundary (trainer/preempt.py) while this process holds the signal back,
#     then hands it to submitit, which requeues the job; the requeued job resumes from that checkpoint.
# Standard library only: train.py imports this before torch.
import contextlib
import signal

from trainer.environments import Slurm, current


def per_node(nproc) -> int | None:
    # launcher.nproc_per_node as a count to request; "auto" is decided on the node, so nothing is requested.
    return int(nproc) if str(nproc).isdigit() else None


def slurm_gpus(nproc, device: str) -> int | None:
    # GPUs per node to request: one per worker, none for trainer.device=cpu.
    return None if device == "cpu" else per_node(nproc)


@contextlib.contextmanager
def held_signals():
    # Around the launch of the workers in a SLURM job: SIGUSR2 and SIGTERM are noted, not acted on, while the
    # workers checkpoint (submitit's own handler would requeue and exit at once; torch's elastic agent leaves
    # SIGTERM alone there, see launcher/elastic.py). -> the signals received, in order.
    got: list[int] = []
    with _handling(lambda signum, frame: got.append(signum)):
        yield got


def ignored_in_children():
    # For starting the forkserver the workers fork from: a process ignores what its parent ignored (across
    # exec, unlike handlers), so the workers are not killed by these signals before they catch them.
    return _handling(signal.SIG_IGN)


@contextlib.contextmanager
def _handling(handler):
    # Where signals mean preemption (a SLURM job): they go to handler for the duration, then back to what handled
    # them before.
    before = {sig: signal.signal(sig, handler) for sig in current().preemption_signals}
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


# The signals on which torch's elastic agent stops its workers (its default, LaunchConfig.signals_to_handle).
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def agent_signals() -> str:
    # Not those that mean preemption here (a SLURM job's SIGTERM): the agent would kill its workers mid-save.
    held = {s.name for s in current().preemption_signals}
    return ",".join(s for s in AGENT_SIGNALS if s not in held)


def hand_over(signum: int) -> None:
    # After the workers saved: submitit's handler gets the signal it was sent (SIGUSR2: requeue this job and
    # exit; SIGTERM: nothing, SLURM requeues or ends the job itself). Either way this process leaves without a
    # result, so submitit waits for the requeued job's. Outside submitit (a printed sbatch script) the job
    # ends here; SLURM requeues it on preemption where the script asked for --requeue.
    env = current()
    if isinstance(env, Slurm) and env.under_submitit():
        signal.raise_signal(signum)
    raise SystemExit(128 + signum)
