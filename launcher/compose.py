# Hydra set-up shared by train.py, `python -m commands.plan` and the tests: the schemas and the resolvers
# that keep one run directory per run whichever way the run was started. No torch here: train.py imports
# this before Hydra has parsed the command line.
import re
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from launcher.errors import fail
from trainer.config import SCHEMAS, register_configs
from trainer.environments import current
from trainer.paths import stdlib_path, unwritable_reason

_run_dir: str | None = None
made_dirs: list[Path] = []  # the day's directory, where this process made it (for a refused run to take back)


_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")


def _new_run_dir(base: str, rdzv_id: str = "", name: str | None = None) -> str:
    # Created exclusively here, so two runs started in the same second get two directories. The nodes of
    # one multi-node job share launcher.rdzv_id, and so one directory (on a shared filesystem); so do the
    # processes of a torchrun or of pods, by the run id their environment gives them (trainer/environments.py).
    # A named run (run.name) is <base>/<name>, the same every time, so that running it again resumes it.
    global _run_dir
    if _run_dir is None:
        if why := unwritable_reason(base):
            fail(
                f"the run directory cannot be created under {base} ({why}): set hydra.run.dir=<a writable dir>"
            )
        if name is not None:
            if not _RUN_NAME.match(str(name)) or ".." in str(name).split("/"):
                fail(
                    f"run.name={name!r} is not a name for a directory under {base}: use letters, digits, '_', '-' "
                    "and '.', with '/' between parts (or hydra.run.dir=<any dir>)"
                )
            _run_dir = f"{base}/{name}"
        elif rdzv_id:
            _run_dir = f"{base}/multinode/{rdzv_id}"
        elif shared := current().run_path():
            _run_dir = f"{base}/{shared}"
        else:
            stem = Path(base) / f"{datetime.now():%Y-%m-%d}" / f"{datetime.now():%H-%M-%S}"
            if not stem.parent.exists():
                made_dirs.append(stem.parent)
            stem.parent.mkdir(parents=True, exist_ok=True)
            for n in range(1000):
                candidate = stem.with_name(stem.name + (f"-{n}" if n else ""))
                try:
                    candidate.mkdir()
                    break
                except FileExistsError:
                    continue
            _run_dir = str(candidate)
    return _run_dir


def _hydra_subdir() -> str | None:
    # Under torchrun (and on pods) every rank or node runs Hydra; only rank 0 writes .hydra/.
    return ".hydra" if current().rank() == 0 else None


def setup_hydra() -> None:
    register_configs()
    resolvers = {
        "shardlab_run_dir": _new_run_dir,
        "shardlab_hydra_subdir": _hydra_subdir,
        "stdlib_path": stdlib_path,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def config_dir() -> str:
    return str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str]) -> DictConfig:
    # The config train.py would get, without a run: Hydra's own section dropped (its run-dir resolver must not
    # run: planning writes nothing), cfg.choices filled in as launcher.main.stamp_run does.
    setup_hydra()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.choices = {g: str(choices[g]) for g in SCHEMAS if g in choices}
    return cfg


def check_output_dirs(argv: list[str]) -> None:
    # Before Hydra creates the run (or sweep) directory, whose failure would be a traceback: a directory named
    # on the command line must be one that can be created. Interpolations resolve later: their literal prefix.
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        value = value.strip("'\"")
        literal = value.split("${", 1)[0]
        if sep and key in ("hydra.run.dir", "hydra.sweep.dir") and literal:
            if why := unwritable_reason(literal):
                fail(f"{key}={value} cannot be created ({why}): choose another {key}")
