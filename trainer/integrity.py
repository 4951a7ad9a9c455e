# Digests of the files shardlab writes and later reads back (checkpoints, prepared token files), so that a byte
# that changed after writing is refused instead of resumed or trained on. xxHash's XXH3 (128-bit): at several
# GB/s it costs a save a few percent (benchmarks/checkpoint_digest.py measures it on a 1 GB checkpoint), where
# blake2 or SHA-256 would cost a multiple of that; it detects accidental change (disk, copy, edit), which is the
# point here, not tampering. The xxhash package is already what `datasets` and `wandb` hash with. Standard
# library and xxhash only: the launcher's parent verifies before any worker starts.
import json
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
CHUNK = 64 << 20  # hashed in 64 MB pieces (a multiple of every token size)
MANIFEST = "digests.json"  # a checkpoint directory's record of its files


def digest_file(path: Path, each_chunk: Callable[[memoryview], None] | None = None) -> str:
    # -> the file's digest; each_chunk sees every piece of it in order (a token file's largest id, on the same
    # pass). Read through a memory map: the page cache's pages are hashed where they lie, with no copy (a third of
    # the time of read() into a buffer, measured by benchmarks/checkpoint_digest.py).
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:  # nothing to map
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for start in range(0, size, CHUNK):
                    piece = view[start : start + CHUNK]
                    h.update(piece)
                    if each_chunk is not None:
                        each_chunk(piece)
                    piece.release()
            finally:
                view.release()
    return h.hexdigest()


def record(root: Path, names) -> dict[str, dict]:
    # -> {name: {"bytes": size, "xxh3_128": digest}} for the files `names` under root.
    return {n: {"bytes": (root / n).stat().st_size, ALGORITHM: digest_file(root / n)} for n in sorted(names)}


def mismatch(root: Path, recorded: dict[str, dict]) -> str | None:
    # -> the first file under root that is missing, or whose size or digest differs from what was recorded, said in
    # a few words ("__0_0.distcp does not match its digest"); None when every file matches.
    for name, want in sorted(recorded.items()):
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} is {path.stat().st_size} bytes, not the {want['bytes']} it was written with"
        if digest_file(path) != want[ALGORITHM]:
            return f"{name} does not match the digest recorded when it was written (its bytes changed since)"
    return None


def write_manifest(root: Path, files: dict[str, dict]) -> None:
    # Written last, under a temporary name and renamed: a manifest that exists is whole.
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: Path) -> dict[str, dict] | None:
    # -> the recorded files of a directory's manifest; None where there is none (written before digests were).
    # A manifest that does not parse raises ValueError (it was damaged, which is itself a mismatch).
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data["algorithm"] != ALGORITHM:
            raise ValueError(f"algorithm {data['algorithm']!r}, not {ALGORITHM}")
        return {
            str(k): {"bytes": int(v["bytes"]), ALGORITHM: str(v[ALGORITHM])} for k, v in data["files"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{MANIFEST} cannot be read ({type(e).__name__}: {e})") from None
