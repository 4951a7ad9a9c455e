# What a shardlab job does differently inside a SLURM allocation: a job of Hydra's submitit launcher
# (`-m hydra/launcher=submitit_slurm`, hydra_plugins/shardlab_slurm) or the `srun python train.py` of a script from
# `python -m commands.sbatch`. One task per node; in each, shardlab's own launcher starts the local workers.
#   - the rendezvous comes from the allocation: launcher.nnodes is checked against the step's tasks, the
#     endpoint is the first node, the id the SLURM job id (nothing to fill in per job);
#   - preemption: SLURM's SIGTERM and submitit's pre-timeout SIGUSR2 reach every process of the job. The workers
#     save a checkpoint at the next step boundary (trainer/preempt.py) while this process holds the signal back,
#     then hands it to submitit, which requeues the job; the requeued job resumes from that checkpoint.
# Standard library only: train.py imports this before torch.
import contextlib
import os
import signal
import subprocess

from trainer.preempt import SIGNALS, under_slurm

PORT_BASE, PORT_SPAN = 20000, 20000  # the rendezvous port of a job: the same on every node, from its id


def per_node(nproc) -> int | None:
    # launcher.nproc_per_node as a count to request; "auto" is decided on the node, so nothing is requested.
    return int(nproc) if str(nproc).isdigit() else None


def slurm_gpus(nproc, device: str) -> int | None:
    # GPUs per node to request: one per worker, none for trainer.device=cpu.
    return None if device == "cpu" else per_node(nproc)


def under_submitit() -> bool:
    return "SUBMITIT_FOLDER" in os.environ  # set by submitit's job runner before it calls the job


def first_node() -> str:
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def fill_rendezvous(launcher_cfg) -> None:
    # Inside an srun step of several tasks (one per node): launcher.nnodes must be that count, and an empty
    # launcher.rdzv_endpoint / rdzv_id is filled from the allocation. A batch script's own shell (no srun
    # step) is one process on one node, whatever the allocation.
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
    if not under_slurm() or (tasks == 1 and launcher_cfg.nnodes == 1):
        return
    if launcher_cfg.nnodes != tasks:
        raise ValueError(
            f"launcher.nnodes={launcher_cfg.nnodes}, but this SLURM job step runs {tasks} task(s), one per node: "
            f"set launcher.nnodes={tasks}, or request launcher.nnodes nodes (hydra.launcher.nodes, sbatch --nodes) "
            "with one task each"
        )
    if not launcher_cfg.rdzv_endpoint:
        port = PORT_BASE + int(os.environ["SLURM_JOB_ID"]) % PORT_SPAN
        launcher_cfg.rdzv_endpoint = f"{first_node()}:{port}"
    if not launcher_cfg.rdzv_id:
        launcher_cfg.rdzv_id = f"slurm-{os.environ['SLURM_JOB_ID']}"


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
    # In a SLURM job: SIGNALS go to handler for the duration, then back to what handled them before.
    before = {sig: signal.signal(sig, handler) for sig in SIGNALS} if under_slurm() else {}
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


# The signals on which torch's elastic agent stops its workers; not SIGTERM: in a SLURM job the agent would kill
# its workers mid-save.
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def hand_over(signum: int) -> None:
    # After the workers saved: submitit's handler gets the signal it was sent (SIGUSR2: requeue this job and
    # exit; SIGTERM: nothing, SLURM requeues or ends the job itself). Either way this process leaves without a
    # result, so submitit waits for the requeued job's. Outside submitit (a printed sbatch script) the job
    # ends here; SLURM requeues it on preemption where the script asked for --requeue.
    if under_submitit():
        signal.raise_signal(signum)
    raise SystemExit(128 + signum)
