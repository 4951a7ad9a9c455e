# Token sources. Each optimizer step draws one *global* batch that depends only on (seed, step), whatever
# the world size; rank r takes its slice of rows and splits it into micro-batches. So single, DDP and
# FSDP see the same tokens per step (the parity tests rely on this), and a resumed run continues from
# `step` with nothing else to restore. Each source also holds held-out tokens that training never touches:
# eval batch i is the same consecutive windows every time it is asked for, so validation curves compare.
#   synthetic  uniform random tokens from the seed; held out: a stream of its own
#   text       the bytes (or a local tokenizer's ids) of files; held out: the stream's last data.val_fraction
#   tokens     the flat token files of `python -m commands.prepare`, read through numpy.memmap (a window is
#              read when a batch asks for it; the file is never copied into memory); held out: its val split
import json
import mmap
import sys
from pathlib import Path

import numpy as np
import torch

from trainer.config import one_of
from trainer.integrity import ALGORITHM, digest_file
from trainer.paths import is_binary
from trainer.tokenizer import load_tokenizer

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step, row) over the generator's seed space
_VAL_STREAM = 2**31 - 1  # synthetic held-out batches: seeds no training step uses
SOURCES = ("synthetic", "text", "tokens")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}  # commands/prepare.py writes these


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * _MIX + p + 1) % (2**63 - 1)
    return h


class SyntheticTokens:
    # Uniform random tokens: measures throughput, learns nothing.
    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.description = f"synthetic uniform tokens, vocab {vocab_size}"
        self.val_windows = None  # unbounded

    def _draw(self, stream: int, rows: range) -> torch.Tensor:
        g = torch.Generator()
        out = torch.empty(len(rows), self.seq_len + 1, dtype=torch.long)
        for i, row in enumerate(rows):
            g.manual_seed(_seed(self.seed, stream, row))
            out[i] = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)
        return out  # (rows, T + 1)

    def rows(self, step: int, rows: range, global_rows: int) -> torch.Tensor:
        return self._draw(step, rows)

    def val_rows(self, batch: int, rows: range, global_rows: int) -> torch.Tensor:
        return self._draw(
            _VAL_STREAM - batch, range(batch * global_rows + rows.start, batch * global_rows + rows.stop)
        )


class Windows:
    # Windows of seq_len + 1 tokens: for training at random offsets of `train`, held out consecutive and
    # disjoint in `val`. train and val: 1-D integer arrays (numpy, or a numpy.memmap of a token file).
    def __init__(self, train, val, vocab_size: int, seq_len: int, seed: int, description: str):
        if len(train) < seq_len + 1:
            raise ValueError(
                f"data has {len(train)} training tokens, fewer than trainer.seq_len + 1 = {seq_len + 1}: "
                "point data.path at more text or lower trainer.seq_len"
            )
        self.train, self.val, self.vocab_size, self.seq_len, self.seed = train, val, vocab_size, seq_len, seed
        self.description = description
        self.val_windows = len(val) // (seq_len + 1)  # how many held-out windows there are

    def _gather(self, tokens, starts: np.ndarray) -> torch.Tensor:
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # fancy indexing reads only these tokens
        rows = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # (rows, T + 1), a copy
        _release(tokens)
        return rows

    def rows(self, step: int, rows: range, global_rows: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, step))
        # Offsets for the whole global batch, so each row's window is the same at any world size. A window
        # holds seq_len + 1 tokens, so the last valid start is len - seq_len - 1 (randint's high is exclusive).
        starts = torch.randint(0, len(self.train) - self.seq_len, (global_rows,), generator=g)
        return self._gather(self.train, starts[rows.start : rows.stop].numpy())

    def val_rows(self, batch: int, rows: range, global_rows: int) -> torch.Tensor:
        first = batch * global_rows
        starts = np.arange(first + rows.start, first + rows.stop) * (self.seq_len + 1)
        return self._gather(self.val, starts)


# ---------------------------------------------------------------- data=text
def text_files(path: str, glob: str, max_bytes: int) -> tuple[list[Path], int, int]:
    # -> (the files read in order, the bytes they give (capped at max_bytes), the binary files passed over). A
    # binary file (a NUL byte near its start, as git tells) is not text: skipped, as commands.prepare skips it.
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data.path {str(p)!r} does not exist: point data.path at a text file or directory")
    files = [p] if p.is_file() else sorted(f for f in p.rglob(glob) if f.is_file())
    chosen, total, binary = [], 0, 0
    for f in files:
        if total >= max_bytes:
            break
        if f.stat().st_size == 0:
            continue
        if is_binary(f):
            binary += 1
            continue
        chosen.append(f)
        total += min(f.stat().st_size, max_bytes - total)
    if total == 0:
        what = f" ({binary} binary file(s) skipped: a NUL byte near their start)" if binary else ""
        raise ValueError(f"no text found under data.path {str(p)!r} matching data.glob {glob!r}{what}")
    return chosen, total, binary


def read_text(path: str, glob: str, max_bytes: int) -> tuple[bytes, int, int]:
    # -> (the bytes, the files read, the binary files skipped)
    files, total, binary = text_files(path, glob, max_bytes)
    chunks, left = [], total
    for f in files:
        chunks.append(f.read_bytes()[:left])
        left -= len(chunks[-1])
    return b"".join(chunks), len(files), binary


def _text(data_cfg, seq_len: int, seed: int) -> Windows:
    raw, n_files, binary = read_text(data_cfg.path, data_cfg.glob, data_cfg.max_bytes)
    skipped = f" ({binary} binary file(s) skipped)" if binary else ""
    if data_cfg.tokenizer is None:
        tokens, vocab = np.frombuffer(raw, dtype=np.uint8), 256
        what = f"{len(raw):,} bytes of {n_files} file(s){skipped} under {data_cfg.path}, byte-level tokens"
    else:
        tok = load_tokenizer(data_cfg.tokenizer)
        ids = tok(raw.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        tokens, vocab = np.asarray(ids, dtype=np.int64), len(tok)
        what = f"{len(ids):,} tokens of {n_files} file(s){skipped} under {data_cfg.path}, tokenizer {data_cfg.tokenizer}"
    n_val = int(len(tokens) * data_cfg.val_fraction)  # the stream's tail, which no training window reaches
    what += f"; the last {n_val:,} held out" if n_val else ""
    return Windows(tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :], vocab, seq_len, seed, what)


def check_text_source(data_cfg, seq_len: int) -> int | None:
    # Before any worker starts: the text there is, and one window of it. -> the held-out windows of seq_len + 1
    # tokens it will have (byte-level: known from the files' sizes; a tokenizer's count: None, unknown until it
    # has run). Reads the first 8000 bytes of each file it counts (binary or text), never a whole file.
    if not data_cfg.path:
        raise ValueError(
            "data=text needs data.path: point data.path at a text file or directory "
            "(data/text.yaml's default is the Python standard library's sources)"
        )
    _, total, _ = text_files(data_cfg.path, data_cfg.glob, data_cfg.max_bytes)
    if data_cfg.tokenizer is not None:
        return None
    n_val = int(total * data_cfg.val_fraction)
    if total - n_val < seq_len + 1:
        raise ValueError(
            f"data.path {data_cfg.path!r} gives {total - n_val} training bytes (data.max_bytes {data_cfg.max_bytes}, "
            f"data.val_fraction {data_cfg.val_fraction}), fewer than trainer.seq_len + 1 = {seq_len + 1}: point "
            "data.path at more text or lower trainer.seq_len"
        )
    return n_val // (seq_len + 1)


# ---------------------------------------------------------------- data=tokens
VERIFY_AUTO_BYTES = 4 << 30  # data.verify=null reads token files through where they total under this


def read_meta(path: str, verify: bool | None = False) -> dict:
    # A prepared token directory's meta.json, and its token files checked against it: sizes always; with verify
    # (None: where the files total under VERIFY_AUTO_BYTES) every byte, against the digest and the largest token
    # id that prepare recorded, so a changed byte or an edited meta.json is refused before a worker trains on it.
    if not path:
        raise ValueError(
            "data=tokens needs data.path: point it at a directory written by `python -m commands.prepare`"
        )
    root = Path(path).expanduser()
    fix = f"point data.path at a directory written by `python -m commands.prepare`, or prepare {root} again"
    if not root.is_dir():
        raise ValueError(f"data.path {str(root)!r} is not a directory: {fix}")
    try:
        meta = json.loads((root / "meta.json").read_text())
        dtype, vocab = TOKEN_DTYPES[meta["dtype"]], int(meta["vocab_size"])
        counts = {split: int(meta["splits"][split]["tokens"]) for split in ("train", "val")}
        max_id = int(meta["max_token_id"]) if "max_token_id" in meta else None
        recorded = meta.get("files")
        if recorded is not None:
            recorded = {f"{s}.bin": {"bytes": int(recorded[f"{s}.bin"]["bytes"]), ALGORITHM: str(recorded[f"{s}.bin"][ALGORITHM])}
                        for s in counts}  # fmt: skip
    except FileNotFoundError:
        raise ValueError(f"{root / 'meta.json'} is missing: {fix}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{root / 'meta.json'} cannot be read ({type(e).__name__}: {e}): {fix}") from None
    for split, n in counts.items():
        file = root / f"{split}.bin"
        want = n * np.dtype(dtype).itemsize
        have = file.stat().st_size if file.is_file() else None
        if have != want:
            found = "missing" if have is None else f"{have:,} bytes"
            raise ValueError(
                f"{file} is {found}, but meta.json records {n:,} {meta['dtype']} tokens ({want:,} bytes): {fix}"
            )
    if max_id is not None and max_id >= vocab:
        raise ValueError(
            f"{root / 'meta.json'} records token ids up to {max_id} but a vocabulary of {vocab}: it no longer matches "
            f"its files (was it edited?): {fix}"
        )
    total = sum(want["bytes"] for want in (recorded or {}).values())
    if recorded is None and verify is not False:
        warn_once(
            f"shardlab: warning: {root / 'meta.json'} records no digests (prepared before shardlab recorded them): "
            f"its token files are checked by size only; prepare {root} again to have them verified"
        )
    elif verify or (verify is None and total < VERIFY_AUTO_BYTES):
        verify_tokens(root, recorded, dtype, max_id, fix)
    return {**meta, "root": str(root), "np_dtype": dtype, "vocab_size": vocab}


def verify_tokens(root: Path, recorded: dict, dtype, max_id: int | None, fix: str) -> None:
    # Each token file read once: its digest, and its largest id on the same pass.
    for name, want in sorted(recorded.items()):
        largest = [0]

        def track(chunk: memoryview, largest=largest) -> None:
            ids = np.frombuffer(chunk, dtype=dtype)  # chunks are whole tokens: CHUNK is a multiple of 4 bytes
            if ids.size:
                largest[0] = max(largest[0], int(ids.max()))

        if digest_file(root / name, track) != want[ALGORITHM]:
            raise ValueError(
                f"{root / name} does not match the digest meta.json records (its bytes changed since prepare wrote "
                f"it): {fix}"
            )
        if max_id is not None and largest[0] > max_id:
            raise ValueError(
                f"{root / name} holds token id {largest[0]}, above the largest ({max_id}) meta.json records: it no "
                f"longer matches its files (was it edited?): {fix}"
            )


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr, flush=True)


def _random_access(tokens: np.memmap) -> np.memmap:
    # Windows are read at random offsets: no read-ahead around each one (it would read MBs from disk per window).
    if hasattr(mmap, "MADV_RANDOM") and getattr(tokens, "_mmap", None) is not None:
        tokens._mmap.madvise(mmap.MADV_RANDOM)
    return tokens


def _release(tokens) -> None:
    # Unmap what a batch touched: a page fault maps a whole page-cache folio around the window (measured here:
    # ~200 KB per 514-byte window, even with MADV_RANDOM), and RSS counts it, so a run's peak RSS grew with the
    # file it sampled (+590 MB on a 1 GB file in 30 steps). MADV_DONTNEED on a read-only file mapping drops only
    # this process's mapping; the page cache keeps the data. Costs well under a millisecond per batch.
    if hasattr(mmap, "MADV_DONTNEED") and getattr(tokens, "_mmap", None) is not None:
        tokens._mmap.madvise(mmap.MADV_DONTNEED)


def _tokens(data_cfg, seq_len: int, seed: int) -> Windows:
    meta = read_meta(data_cfg.path)
    root, dtype = Path(meta["root"]), meta["np_dtype"]
    splits = {
        s: _random_access(np.memmap(root / f"{s}.bin", dtype=dtype, mode="r")) for s in ("train", "val")
    }
    n = {s: len(m) for s, m in splits.items()}
    what = f"{n['train']:,} train / {n['val']:,} val tokens ({meta['dtype']}) in {root}, {meta['tokenizer']}"
    return Windows(splits["train"], splits["val"], meta["vocab_size"], seq_len, seed, what)


# ---------------------------------------------------------------- what the loop and the checks ask
def build_data(data_cfg, seq_len: int, seed: int, vocab_size: int):
    if data_cfg.name == "synthetic":
        return SyntheticTokens(vocab_size, seq_len, seed)
    if data_cfg.name == "text":
        return _text(data_cfg, seq_len, seed)
    if data_cfg.name == "tokens":
        return _tokens(data_cfg, seq_len, seed)
    one_of("data", data_cfg.name, SOURCES)
    raise AssertionError(f"no source for data {data_cfg.name!r}")


def data_facts(data_cfg, seq_len: int = 1) -> tuple[int | None, int | None]:
    # -> (the vocabulary the data needs, the held-out windows of seq_len + 1 tokens it has), as far as known
    # before any worker starts (None: unknown until the data is read, or unbounded).
    one_of("data", data_cfg.name, SOURCES)
    if data_cfg.name == "text":
        held_out = check_text_source(data_cfg, seq_len)
        if data_cfg.tokenizer is not None:
            return len(load_tokenizer(data_cfg.tokenizer)), None
        return 256, held_out
    if data_cfg.name == "tokens":
        meta = read_meta(data_cfg.path, data_cfg.verify)  # every byte, before any worker starts
        train = int(meta["splits"]["train"]["tokens"])
        if train < seq_len + 1:
            raise ValueError(
                f"the train split of {meta['root']} holds {train:,} tokens, fewer than trainer.seq_len + 1 = "
                f"{seq_len + 1}: lower trainer.seq_len, or prepare more text"
            )
        return meta["vocab_size"], int(meta["splits"]["val"]["tokens"]) // (seq_len + 1)
    return None, None


def tokenizer_source(data_cfg) -> Path | None:
    # data=text's data.tokenizer, or the tokenizer a prepared token directory was written with (None: bytes, or
    # synthetic tokens).
    if data_cfg.name == "text" and data_cfg.tokenizer:
        return Path(data_cfg.tokenizer).expanduser().absolute()
    if data_cfg.name == "tokens" and data_cfg.path and (Path(data_cfg.path) / "tokenizer").is_dir():
        return (Path(data_cfg.path) / "tokenizer").expanduser().absolute()
    return None


def decoder(data_cfg):
    # ids -> the text they stand for: the data's tokenizer, UTF-8 bytes, or (synthetic) the ids themselves.
    if (source := tokenizer_source(data_cfg)) is not None:
        tokenizer = load_tokenizer(str(source))
        return lambda ids: tokenizer.decode(ids)
    if data_cfg.name == "synthetic":
        return lambda ids: " ".join(map(str, ids))
    return lambda ids: bytes(ids).decode("utf-8", errors="replace")


def micro_batches(source, step: int, dp_rank: int, dp_size: int, micro_batch_size: int, accum: int):
    # Data-parallel rank r holds rows [r * per_rank, (r + 1) * per_rank) of the global batch; yields (x, y) per
    # micro-step.
    per_rank = micro_batch_size * accum
    rows = source.rows(step, range(dp_rank * per_rank, (dp_rank + 1) * per_rank), per_rank * dp_size)
    for chunk in rows.split(micro_batch_size):
        yield chunk[:, :-1], chunk[:, 1:]  # (micro, T) inputs and next-token targets
