# Paths a run writes to, checked before anything is created, and directories published whole (no torch here:
# the launcher's parent and Hydra's resolvers use it before any heavy import).
import contextlib
import os
import shutil
import sysconfig
from pathlib import Path


def unwritable_reason(path) -> str | None:
    # -> why a directory cannot be made at path, or None if it can; creates nothing. The nearest existing
    # ancestor must be a directory this process may write into (a path under a regular file fails even as root).
    path = Path(path).expanduser().absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                return f"{p} is a file, not a directory"
            return None if os.access(p, os.W_OK | os.X_OK) else f"{p} is not writable"
    return None


def stdlib_path() -> str:
    # data=text's default corpus: the Python standard library's own sources, on every machine.
    return sysconfig.get_paths()["stdlib"]


def publish(tmp: Path, target: Path) -> None:
    # A complete directory takes target's name in one rename. One already there is moved aside first and removed
    # after, not deleted first: a crash at any point leaves a complete directory under the name, old or new.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(target: Path):
    # -> a temporary directory beside target to write into: published as target when the block ends, removed
    # if it raises, so an interrupted write leaves nothing a reader would take for complete.
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
