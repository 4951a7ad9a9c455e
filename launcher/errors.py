# Hydra reports a bad override over several lines, with a hint about HYDRA_FULL_ERROR, and exit code 1.
# train.py runs Hydra with HYDRA_FULL_ERROR=1 so the exception reaches it instead, and says it in one line
# that names what to change, with exit code 2, like shardlab's own checks. A user who sets HYDRA_FULL_ERROR
# gets Hydra's full traceback, as Hydra documents.
import contextlib
import dataclasses
import os

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from launcher.compose import fail
from trainer.checks import unknown_key_message

# Lines of Hydra's and OmegaConf's messages that say nothing a one-line error needs.
_NOISE = (
    "full_key:",
    "object_type=",
    "To append to your config",
    "Set the environment variable",
    "provider=",
)


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
