# Paths a run writes to, checked before anything is created (no torch here: the launcher's parent and
# Hydra's resolvers use it before any heavy import).
import os
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
