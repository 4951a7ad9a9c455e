# Text -> flat token files that data=tokens reads through numpy.memmap, tokenized once instead of every run:
#   python -m commands.prepare <source> <out dir> [--tokenizer DIR] [--val-fraction F] [--glob G] [--text-field F]
# source: a text file, or a directory of text files (--glob, read recursively in sorted order, one file one
# document), JSON Lines or Parquet files with a text field. Read with Hugging Face `datasets` from local
# files only (never the hub), tokenized in batches on all cores (byte-level, or a local HF tokenizer).
# Out: train.bin and val.bin (uint16 where the vocabulary fits, else uint32), split by whole documents, each
# document followed by the tokenizer's EOS token (bytes: 0); meta.json (tokenizer, vocab, dtype, token and
# document counts per split, sources and their sizes); tokenizer/ (the tokenizer's files, for export). The
# same input gives byte-identical files. Everything is written under a temporary name and renamed when
# complete, so an interrupted prepare leaves nothing a run would load.
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from launcher.errors import fail
from trainer.paths import staged
from trainer.tokenizer import load_tokenizer

BYTE_EOS = 0  # byte-level documents are separated by a NUL byte, which text does not hold
KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # any other suffix: plain text
SPLIT_SEED = 0  # which documents are held out: a fixed permutation, so the same input splits the same way


def source_files(source: Path, glob: str) -> tuple[list[Path], str]:
    # -> (the files, in order, and their kind: text, json or parquet)
    if not source.exists():
        raise ValueError(
            f"source {source} does not exist: give a text, JSON Lines or Parquet file, or a directory"
        )
    files = [source] if source.is_file() else sorted(f for f in source.rglob(glob) if f.is_file())
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise ValueError(
            f"source {source} holds no non-empty file matching --glob {glob!r}: give another source or --glob"
        )
    kinds = {KINDS.get(f.suffix, "text") for f in files}
    if len(kinds) > 1:
        raise ValueError(
            f"source {source} mixes {', '.join(sorted(kinds))} files: prepare one kind at a time (--glob selects them)"
        )
    return files, kinds.pop()


def load_documents(files: list[Path], kind: str, text_field: str, cache: Path):
    # One row per document with its text in `text_field`: a text file is one document, a JSON/Parquet row one.
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # local files only, never the hub
    import datasets

    options = {"sample_by": "document", "encoding_errors": "replace"} if kind == "text" else {}
    datasets.disable_progress_bars()  # reading is quick; the bar that says something is the tokenizer's
    try:
        ds = datasets.load_dataset(
            kind, data_files=[str(f) for f in files], split="train", cache_dir=str(cache), **options
        )
    finally:
        datasets.enable_progress_bars()
    field = "text" if kind == "text" else text_field
    if field not in ds.column_names:
        raise ValueError(
            f"the {kind} files have no field {field!r}: set --text-field to one of {', '.join(ds.column_names)}"
        )
    return ds, field


def tokenizer_of(path: str | None):
    # -> (the tokenizer or None for bytes, its vocabulary, its EOS id)
    if path is None:
        return None, 256, BYTE_EOS
    tok = load_tokenizer(path, "--tokenizer", "leave --tokenizer out")
    if tok.eos_token_id is None:
        raise ValueError(f"--tokenizer {path} has no EOS token to separate documents with: give one that has")
    return tok, len(tok), tok.eos_token_id


def _encoder(tokenizer_path: str | None, field: str):
    # A function of a batch, for datasets.map on every core (each worker loads the tokenizer once).
    state = {}

    def encode(batch):
        if tokenizer_path is None:
            return {"ids": [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in batch[field]]}
        if "tok" not in state:
            state["tok"] = tokenizer_of(tokenizer_path)[0]
        return {"ids": state["tok"](batch[field], add_special_tokens=False)["input_ids"]}

    return encode


def split_documents(n_docs: int, val_fraction: float) -> np.ndarray:
    # -> a bool per document, True: held out. Whole documents, a fixed permutation.
    n_val = round(n_docs * val_fraction)
    if n_docs < 2:
        raise ValueError(
            "the source holds 1 document: a train and a val split need at least 2 (more files or rows)"
        )
    if n_val == 0 or n_val == n_docs:
        raise ValueError(
            f"--val-fraction {val_fraction} of {n_docs} documents leaves the {'val' if n_val == 0 else 'train'} split "
            f"empty: choose a fraction between {1 / n_docs:.3g} and {1 - 1 / n_docs:.3g}, or give more documents"
        )
    held = np.zeros(n_docs, dtype=bool)
    held[np.random.default_rng(SPLIT_SEED).permutation(n_docs)[:n_val]] = True
    return held


def write_splits(tokenized, held: np.ndarray, out: Path, dtype, eos: int) -> dict:
    # Streams every document's ids, then EOS, into train.bin or val.bin; -> counts per split and the max id.
    counts = {s: {"tokens": 0, "documents": 0} for s in ("train", "val")}
    max_id, sep = 0, np.array([eos], dtype=dtype)
    with open(out / "train.bin", "wb") as train, open(out / "val.bin", "wb") as val:
        doc = 0
        for batch in tokenized.with_format("numpy").iter(batch_size=256):
            for ids in batch["ids"]:
                split, f = ("val", val) if held[doc] else ("train", train)
                ids = np.asarray(ids)
                if ids.size:
                    max_id = max(max_id, int(ids.max()))
                f.write(ids.astype(dtype).tobytes())
                f.write(sep.tobytes())
                counts[split]["tokens"] += ids.size + 1
                counts[split]["documents"] += 1
                doc += 1
    return {"splits": counts, "max_token_id": max(max_id, eos)}


def prepare(source: str, out: str, tokenizer: str | None = None, val_fraction: float = 0.05, glob: str = "*",
            text_field: str = "text", overwrite: bool = False, num_proc: int | None = None) -> dict:  # fmt: skip
    src, target = Path(source).expanduser().absolute(), Path(out).expanduser().absolute()
    if not 0 < val_fraction < 1:
        raise ValueError(
            f"--val-fraction must be between 0 and 1 (both splits need documents), got {val_fraction}"
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ValueError(
            f"{target} already exists and is not empty: choose another out dir, or pass --overwrite"
        )
    files, kind = source_files(src, glob)
    tok, vocab, eos = tokenizer_of(tokenizer)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    with staged(target) as tmp:
        ds, field = load_documents(files, kind, text_field, tmp / ".cache")
        held = split_documents(len(ds), val_fraction)
        procs = max(1, min(num_proc or os.cpu_count() or 1, len(ds)))
        tokenized = ds.map(_encoder(tokenizer, field), batched=True, batch_size=64, num_proc=procs,
                           remove_columns=ds.column_names, desc=f"tokenizing on {procs} core(s)")  # fmt: skip
        written = write_splits(tokenized, held, tmp, dtype, eos)
        if tok is not None:
            tok.save_pretrained(tmp / "tokenizer")
        meta = {
            "format": "shardlab tokens 1",
            "tokenizer": "bytes" if tokenizer is None else str(Path(tokenizer).expanduser().absolute()),
            "vocab_size": vocab,
            "dtype": np.dtype(dtype).name,
            "eos_id": eos,
            **written,
            "val_fraction": val_fraction,
            "source": str(src),
            "kind": kind,
            "text_field": field,
            "sources": [
                {"path": str(f.relative_to(src)) if f != src else f.name, "bytes": f.stat().st_size}
                for f in files
            ],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        del ds, tokenized
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m commands.prepare",
        description="text, JSON Lines or Parquet files -> the token files data=tokens reads (train.bin, val.bin, "
        "meta.json), byte-level or with a local Hugging Face tokenizer",
    )
    ap.add_argument("source", help="a text, JSON Lines or Parquet file, or a directory of them")
    ap.add_argument("out", help="the directory to write (train.bin, val.bin, meta.json)")
    ap.add_argument(
        "--tokenizer", help="a local Hugging Face tokenizer directory (default: bytes, vocab 256)"
    )
    ap.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation")
    ap.add_argument("--glob", default="*", help="which files of a directory source (default: all)")
    ap.add_argument(
        "--text-field", default="text", help="the field of JSON Lines / Parquet rows with the text"
    )
    ap.add_argument("--num-proc", type=int, help="tokenizer processes (default: every core)")
    ap.add_argument("--overwrite", action="store_true", help="replace an out dir that is not empty")
    opts = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        meta = prepare(opts.source, opts.out, opts.tokenizer, opts.val_fraction, opts.glob, opts.text_field,
                       opts.overwrite, opts.num_proc)  # fmt: skip
    except ValueError as e:
        fail(str(e))
    s = meta["splits"]
    print(
        f"shardlab: wrote {opts.out}: {s['train']['tokens']:,} train tokens ({s['train']['documents']} documents), "
        f"{s['val']['tokens']:,} val tokens ({s['val']['documents']}), {meta['dtype']}, vocab {meta['vocab_size']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
