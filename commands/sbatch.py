# A ready sbatch script for a config, for users who submit by hand:
#   python -m commands.sbatch model=llama_1b strategy=fsdp launcher.nproc_per_node=8 launcher.nnodes=2 \
#       --partition gpu --time 240 > train.sbatch && sbatch train.sbatch
# One srun task per node runs `python train.py <overrides>`; in each, shardlab's launcher starts the node's
# workers and takes the rendezvous from the allocation (launcher/slurm.py). The run directory is named after the
# job (<run root>/<job id>), so a requeued job finds its checkpoints: with --requeue, SLURM requeues the job on
# preemption, the workers checkpoint on its SIGTERM, and the job resumes. The resources follow the config as
# with hydra/launcher=submitit_slurm: nodes = launcher.nnodes, GPUs per node = launcher.nproc_per_node (none for
# trainer.device=cpu), a CPU per worker unless --cpus-per-task says otherwise.
import argparse
import shlex
import sys
from pathlib import Path

from commands.cli import Parser
from launcher.compose import compose_config
from launcher.errors import command_errors
from launcher.slurm import per_node, slurm_gpus
from trainer.checks import validate
from trainer.paths import unwritable_reason

REPO = Path(__file__).resolve().parent.parent


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = Parser(
        prog="python -m commands.sbatch",
        description="print a ready sbatch script for a config: one srun task per node runs train.py with the "
        "given overrides; resources follow launcher.nnodes and launcher.nproc_per_node",
    )
    ap.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    ap.add_argument("--time", type=int, default=60, help="time limit, minutes (default 60)")
    ap.add_argument("--mem-gb", type=int, help="memory per node, GB (default: the partition's)")
    ap.add_argument("--cpus-per-task", type=int, help="CPUs per node's task (default: one per worker)")
    ap.add_argument("--job-name", default="shardlab")
    ap.add_argument("--run-root", default="outputs/slurm", help="run directories: <run root>/<job id>")
    ap.add_argument("--output", help="the job's log (default: <run root>/%%x-%%j.out)")
    ap.add_argument("--debug", action="store_true", help="a traceback instead of one line on bad input")
    return ap.parse_with_overrides(argv)


def check_options(opts: argparse.Namespace) -> None:
    # Values SLURM would reject at submission, or worse take (a negative --time is read as no limit by some
    # versions): refused here, never printed into a script.
    for flag, value in (
        ("--time", opts.time),
        ("--mem-gb", opts.mem_gb),
        ("--cpus-per-task", opts.cpus_per_task),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}: leave it out for the default")
    for flag, value in (
        ("--job-name", opts.job_name),
        ("--run-root", opts.run_root),
        ("--output", opts.output),
    ):
        if value is not None and (not value.strip() or any(c in value for c in "\n\r")):
            raise ValueError(f"{flag} must be a non-empty single line, got {value!r}")


def script(opts: argparse.Namespace, overrides: list[str], cfg) -> str:
    nproc, device = cfg.launcher.nproc_per_node, cfg.trainer.device
    cpus = opts.cpus_per_task or per_node(nproc)
    gpus = slurm_gpus(nproc, device)
    root = opts.run_root
    lines = [
        "#!/bin/bash",
        f"# shardlab: python -m commands.sbatch {shlex.join(sys.argv[1:])}",
        f"#SBATCH --job-name={opts.job_name}",
        f"#SBATCH --nodes={cfg.launcher.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --cpus-per-task={cpus}"] if cpus else []),
        *([f"#SBATCH --gpus-per-node={gpus}"] if gpus else []),
        *([f"#SBATCH --mem={opts.mem_gb}G"] if opts.mem_gb else []),
        f"#SBATCH --time={opts.time}",
        *([f"#SBATCH --partition={opts.partition}"] if opts.partition else []),
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={opts.output or f'{root}/%x-%j.out'}",
        f"#SBATCH --chdir={REPO}",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(root)}",
        # one task per node; the workers' rendezvous comes from the allocation
        f"srun --kill-on-bad-exit=1 {shlex.quote(sys.executable)} train.py {shlex.join(overrides)} \\",
        f'    "hydra.run.dir={root}/${{SLURM_JOB_ID}}"',
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    opts, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    with command_errors(opts.debug):
        check_options(opts)
        cfg = compose_config(overrides)
        nproc = per_node(cfg.launcher.nproc_per_node) or 1
        world = nproc * cfg.launcher.nnodes
        validate(cfg, world, "cpu" if cfg.trainer.device == "cpu" else "cuda", None, per_node=nproc)
        # SLURM opens the job's log before the script runs: its directory must exist at submission
        log_dir = Path(opts.output).expanduser().parent if opts.output else Path(opts.run_root)
        if why := unwritable_reason(log_dir):
            raise ValueError(
                f"the job's log directory {log_dir} cannot be created ({why}): set --output or --run-root"
            )
        log_dir.mkdir(parents=True, exist_ok=True)
    print(script(opts, overrides, cfg), end="")


if __name__ == "__main__":
    main()
