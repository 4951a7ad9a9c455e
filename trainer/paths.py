# Paths a run writes to, checked before anything is created, and directories published whole (no torch here:
# the launcher's parent and Hydra's resolvers use it before any heavy import).
import contextlib
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path


def unwritable_reason(path) -> str | None:
    # -> why a directory cannot be made at path, or None if it can. The nearest existing ancestor must be a
    # directory this process may write into (a path under a regular file fails even as root), and one that can
    # really hold a new directory: on special filesystems (/proc, /sys) and read-only mounts even root's mkdir
    # fails, which only trying tells, so a directory is made there and removed at once.
    path = Path(path).expanduser().absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                return f"{p} is a file, not a directory"
            if not os.access(p, os.W_OK | os.X_OK):
                return f"{p} is not writable"
            if p == path:
                return None
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".shardlab-probe-", dir=p))
            except OSError as e:
                return f"a directory cannot be made in {p}: {e.strerror}"
            return None
    return None


# The process's umask, read once (reading it means setting it): files written through a temporary file
# (tempfile.mkstemp, safetensors) are created 0600, and take the mode an ordinary open() would have given them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def as_shared(path) -> None:
    # A file a user shares (summary.json, an export): the mode the user's umask gives new files, not 0600.
    os.chmod(path, 0o666 & ~_UMASK)


BINARY_SNIFF = 8000  # bytes: git's buffer_is_binary looks for a NUL byte in as many, and so does this


def is_binary(path: Path) -> bool:
    # A file that is not text, as git and `file` tell it: a NUL byte near its start (UTF-8 text never holds one).
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF)


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
