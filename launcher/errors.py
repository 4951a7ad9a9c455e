# Every failure as the one line a person reads: shardlab's own checks (ValueError, already one line), Hydra's
# and OmegaConf's multi-line reports, a worker's failure as the elastic agent saw it, and a sweep job's reason.
# Hydra reports a bad override over several lines, with a hint about HYDRA_FULL_ERROR, and exit code 1.
# train.py runs Hydra with HYDRA_FULL_ERROR=1 so the exception reaches it instead, and says it in one line
# that names what to change, with exit code 2, like shardlab's own checks. A user who sets HYDRA_FULL_ERROR
# gets Hydra's full traceback, as Hydra documents. No torch here: train.py imports this before Hydra parses.
import contextlib
import dataclasses
import os
import re
import sys
from pathlib import Path

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from trainer.config import unknown_key_message
from trainer.environments import current
from trainer.summary import FAILED, RunSummary

NO_ERROR_FILE = "<N/A>"  # torch's ProcessFailure.error_file when a worker wrote none (a signal, an exit)

# Lines of Hydra's and OmegaConf's messages that say nothing a one-line error needs.
_NOISE = (
    "full_key:",
    "object_type=",
    "To append to your config",
    "Set the environment variable",
    "provider=",
)


def fail(message: str, code: int = 2) -> None:
    print(f"shardlab: error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextlib.contextmanager
def command_errors(debug: bool = False):
    # The stand-alone commands (commands/): bad input, whether shardlab's own check (ValueError), a config Hydra
    # cannot compose, or a path the system refuses (OSError), is one line and exit code 2; --debug shows the
    # traceback instead. Anything else is a bug, and keeps its traceback.
    try:
        yield
    except (ValueError, HydraException, OmegaConfBaseException, OSError) as e:
        if debug:
            raise
        if isinstance(e, OSError) and e.filename is not None:
            fail(f"{e.filename}: {e.strerror}")
        fail(describe_error(e))


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def one_line(e: BaseException) -> str:
    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option of {group}: choose one of {', '.join(e.options)}"
    if isinstance(e, OverrideParseException):
        return (
            f"cannot parse the override {e.override!r} ({_first(e.message)}): check its quoting and brackets"
        )
    if isinstance(e, MissingMandatoryValue) and e.full_key:  # e.g. a group removed with ~model
        return f"{e.full_key} has no value: set {e.full_key}=<option>"
    cause = e.__cause__
    unknown_key = isinstance(cause, (ConfigKeyError, ConfigAttributeError))
    if unknown_key and dataclasses.is_dataclass(cause.object_type) and cause.full_key:
        return unknown_key_message(cause.full_key, cause.object_type)
    parts = []
    while e is not None:
        parts += [line.strip().rstrip(".") for line in str(e).splitlines() if _useful(line)]
        e = e.__cause__
    return ": ".join(parts) or "the configuration could not be composed"


def describe_error(e: BaseException) -> str:
    # shardlab's own checks raise ValueError with a one-line message; Hydra's and OmegaConf's are condensed.
    return one_line(e) if isinstance(e, (HydraException, OmegaConfBaseException)) else str(e)


def _first(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _useful(line: str) -> bool:
    line = line.strip()
    return bool(line) and not line.startswith(_NOISE) and line != "Config search path:"


@contextlib.contextmanager
def one_line_errors():
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except (HydraException, OmegaConfBaseException) as e:
        if user_wants_traceback:
            raise
        fail(one_line(e))


def describe_failure(e) -> str:
    # A ChildFailedError from an elastic launch -> "rank R failed (exit code C): <cause>".
    rank, failure = e.get_first_failure()  # the earliest failure this node's agent saw
    # The exception the worker recorded is the cause, even when the process then died of a signal on its
    # way out; without one (no error file: torch's message is then a link to its docs) only the signal is.
    cause = _error_line(failure.message) if failure.error_file != NO_ERROR_FILE else ""
    if not cause and failure.exitcode < 0:
        cause = f"killed by {failure.signal_name()}"
    return f"rank {rank} failed (exit code {failure.exitcode}): {cause or 'see its output above'}"


def _error_line(message) -> str:
    # @record's error file holds {"message": "ExcType: what", "extraInfo": {"py_callstack": ...}}; an
    # error file written by other means may hold a plain string that ends with the traceback.
    if isinstance(message, dict):
        lines = [line.strip() for line in str(message.get("message", "")).splitlines() if line.strip()]
        return lines[0] if lines else ""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failure_traceback(e) -> str:
    # The failed rank's Python traceback, as @record wrote it to its error file ("" when there is none).
    _, failure = e.get_first_failure()
    message = failure.message
    return str(message.get("extraInfo", {}).get("py_callstack", "")) if isinstance(message, dict) else ""


def short_reason(error: str, last_step: int | None) -> str:
    # A sweep job's failure in one line a person can act on: OOM says when (last_step: the last step the job
    # logged), anything else is the exception's own first line.
    text = " ".join(str(error).split()) or "unknown error"
    if re.search(r"out of memory|OutOfMemoryError", text, re.IGNORECASE):
        return "out of memory" + (
            f" after step {last_step}" if last_step else " before the first logged step"
        )
    if "SIGKILL" in text:
        text += " (often the host's out-of-memory killer)"
    return text if len(text) <= 160 else text[:157] + "..."


def record_failure(run_dir: Path, reason: str, **job) -> None:
    # job: the scheduler's id for it where the caller knows it (slurm_job_id=, ray_run_id=); else where this
    # process runs says it (inside a SLURM job, a Ray Train worker).
    run_dir.mkdir(parents=True, exist_ok=True)
    where = current()
    if not job and (job_id := where.job_id()) is not None:
        job = {where.job_field: job_id}
    RunSummary(status=FAILED, error=reason, run_dir=str(run_dir), **job).write(run_dir)
