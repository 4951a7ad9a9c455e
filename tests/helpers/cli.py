# The real command lines in subprocesses: train.py (and torchrun, sweeps) from the repo root with a clean
# environment, and the worker processes they start.
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers.run import REPO, TINY
from tests.helpers.wandb import wandb_env

# Inherited variables that would make a child process think torchrun or a debugger started it.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
_LAUNCH_VARS += ("MASTER_ADDR", "MASTER_PORT", "HYDRA_FULL_ERROR")


def cli_env(wandb_home: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    # One thread per process: this machine has 2 cores shared with other jobs, where OpenMP threads
    # spinning against each other make a step 10-100x slower.
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(wandb_env(wandb_home))
    return env


def cli_args(tmp_path: Path, *overrides: str, tiny: bool = True, run_dir: str | None = None) -> list[str]:
    run_dir = run_dir or str(tmp_path / "run")
    return [sys.executable, "train.py", *(TINY if tiny else ()), f"hydra.run.dir={run_dir}", *overrides]


def start(args, cwd: Path = REPO, env: dict | None = None, **kw) -> subprocess.Popen:
    # Its own session, so that a timeout can end the launcher and every worker it started, by group id.
    return subprocess.Popen(
        list(args), cwd=cwd, env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kw,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args[:3]} ran past {timeout} s:\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}")
    return proc.returncode, out, err


def start_cli(tmp_path: Path, *overrides: str, tiny: bool = True, run_dir: str | None = None):
    return start(cli_args(tmp_path, *overrides, tiny=tiny, run_dir=run_dir))


def run_cli(tmp_path: Path, *overrides: str, tiny: bool = True, run_dir: str | None = None, timeout=180):
    # `python train.py <TINY> hydra.run.dir=<tmp>/run <overrides>` from the repo root.
    return finish(start_cli(tmp_path, *overrides, tiny=tiny, run_dir=run_dir), timeout)


def workers(pid: int, marker: str = "forkserver") -> list[psutil.Process]:
    # The worker processes a launcher (pid) started, oldest first: an agent starts local ranks 0, 1, ... in
    # order. marker: what their command line holds. The elastic launches of train.py fork their workers from a
    # forkserver (launcher/prefork.py): its children, not the server itself; torchrun's hold "train.py".
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()) and not (
                marker == "forkserver" and marker not in " ".join(p.parent().cmdline())
            ):
                found.append(p)
        except psutil.Error:  # exited meanwhile
            continue
    return sorted(found, key=lambda p: (p.create_time(), p.pid))
