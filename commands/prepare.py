# Text -> flat token files that data=tokens reads through numpy.memmap, tokenized once instead of every run:
#   python -m commands.prepare <source> <out dir> [--tokenizer DIR] [--val-fraction F] [--glob G] [--text-field F]
# source: a text file, or a directory of text files (--glob, read recursively in sorted order, one file one
# document), JSON Lines or Parquet files with a text field. Read with Hugging Face `datasets` from local
# files only (never the hub), tokenized in batches on all cores (byte-level, or a local HF tokenizer).
# Out: train.bin and val.bin (uint16 where the vocabulary fits, else uint32), split by whole documents, each
# document followed by the tokenizer's EOS token (bytes: 0); meta.json (tokenizer, vocab, dtype, token and
# document counts per split, the largest token id, each file's size and digest, sources and their sizes);
# tokenizer/ (the tokenizer's files, for export). The same input gives byte-identical files. Everything is
# written under a temporary name and renamed when complete, so an interrupted prepare leaves nothing a run would
# load. Binary files in a text source are skipped (and counted), as git and `file` tell them: a NUL byte.
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from commands.cli import Parser
from launcher.errors import command_errors
from trainer.integrity import ALGORITHM, record
from trainer.paths import is_binary, staged, unwritable_reason
from trainer.tokenizer import BYTE_EOS, load_tokenizer, save_tokenizer

KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # any other suffix: plain text
SPLIT_SEED = 0  # which documents are held out: a fixed permutation, so the same input splits the same way


TOKENS_FORMAT = "shardlab tokens 1"  # meta.json's "format": what data=tokens reads


def source_files(source: Path, glob: str) -> tuple[list[Path], str, int]:
    # -> (the files, in order, their kind: text, json or parquet, and how many binary files were skipped)
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
    kind = kinds.pop()
    if kind != "text":
        return files, kind, 0
    text = [f for f in files if not is_binary(f)]
    if not text:
        what = "is a binary file" if source.is_file() else f"holds only binary files ({len(files)})"
        raise ValueError(
            f"source {source} {what} (a NUL byte in the first 8000 bytes, as git tells binary from text): give text, "
            "JSON Lines or Parquet files (--glob selects them)"
        )
    return text, kind, len(files) - len(text)


def check_out(src: Path, target: Path, out: str, overwrite: bool) -> None:
    # Never the source or what holds it or lies in it; a directory replaced only where it holds an earlier
    # prepare's output, so a mistyped out cannot take other files with it.
    if target == src or target in src.parents or src in target.parents:
        raise ValueError(
            f"out {out} is, holds or lies inside the source {src}: choose an out directory outside the source"
        )
    if why := unwritable_reason(target):
        raise ValueError(f"out {out} cannot be created ({why}): choose another out directory")
    if target.exists() and not target.is_dir():
        raise ValueError(f"out {out} is a file: choose a directory to write the token files into")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise ValueError(
            f"{target} already exists and is not empty: choose another out dir, or pass --overwrite"
        )
    try:
        ours = json.loads((target / "meta.json").read_text()).get("format") == TOKENS_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(
            f"out {target} holds files that prepare did not write (no meta.json of its own): --overwrite replaces "
            "only an earlier prepare's output; choose another out directory"
        )


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
    except (
        datasets.exceptions.DatasetGenerationError,
        ValueError,
        OSError,
    ) as e:  # pyarrow's: ValueError, OSError
        raise ValueError(unreadable(files, kind, e)) from None
    finally:
        datasets.enable_progress_bars()
    field = "text" if kind == "text" else text_field
    if field not in ds.column_names:
        raise ValueError(
            f"the {kind} files have no field {field!r}: set --text-field to one of {', '.join(ds.column_names)}"
        )
    feature = ds.features[field]
    strings = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not strings or ds.data.column(field).null_count:
        raise ValueError(not_text(files, kind, field, ds))
    return ds, field


def unreadable(files: list[Path], kind: str, e: Exception) -> str:
    # datasets says only that generation failed: the first line that is not JSON, by file and line number.
    if kind == "json":
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as lines:
                for n, line in enumerate(lines, 1):
                    try:
                        line.strip() and json.loads(line)
                    except ValueError as bad:
                        return f"{f}:{n} is not JSON ({bad}): fix or remove that line"
    if kind == "parquet":
        import pyarrow.parquet

        for f in files:
            try:
                pyarrow.parquet.read_metadata(f)
            except (ValueError, OSError) as bad:
                return f"{f} cannot be read as Parquet ({type(bad).__name__}: {str(bad).splitlines()[0]}): check it"
    cause = e.__cause__ or e
    return (
        f"the {kind} files cannot be read ({type(cause).__name__}: {str(cause).splitlines()[0]}): check them"
    )


def not_text(files: list[Path], kind: str, field: str, ds) -> str:
    # The first row whose text field holds no string (a number, a list, null), by file and line for JSON Lines.
    fix = f"give each row a string in {field!r}, or set --text-field to the field that holds the text"
    if kind == "json":
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as lines:
                for n, line in enumerate(lines, 1):
                    value = json.loads(line).get(field) if line.strip() else ""
                    if not isinstance(value, str):
                        return f"{f}:{n}: {field!r} is {json.dumps(value)[:40]}, not a string: {fix}"
    row = next(i for i, v in enumerate(ds[field]) if not isinstance(v, str))
    return f"row {row + 1} of the {kind} files: {field!r} is {ds[field][row]!r:.40}, not a string: {fix}"


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
    # Streams every document's ids, then EOS, into train.bin or val.bin; -> counts per split and the max id (the
    # files' sizes and digests are added once they are written).
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
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"--num-proc must be at least 1, got {num_proc}: leave it out for every core")
    check_out(src, target, out, overwrite)
    files, kind, binary = source_files(src, glob)
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
            save_tokenizer(tok, tmp / "tokenizer")
        meta = {
            "format": TOKENS_FORMAT,
            "tokenizer": "bytes" if tokenizer is None else str(Path(tokenizer).expanduser().absolute()),
            "vocab_size": vocab,
            "dtype": np.dtype(dtype).name,
            "eos_id": eos,
            **written,
            # what data=tokens checks the files against before training on them
            "files": record(tmp, ["train.bin", "val.bin"]),
            "digest": ALGORITHM,
            "val_fraction": val_fraction,
            "source": str(src),
            "kind": kind,
            "text_field": field,
            "sources": [
                {"path": str(f.relative_to(src)) if f != src else f.name, "bytes": f.stat().st_size}
                for f in files
            ],
            "skipped_binary_files": binary,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        del ds, tokenized
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = Parser(
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
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier prepare's out dir")
    ap.add_argument("--debug", action="store_true", help="a traceback instead of one line on bad input")
    opts = ap.parse_args(sys.argv[1:] if argv is None else argv)
    with command_errors(opts.debug):
        meta = prepare(opts.source, opts.out, opts.tokenizer, opts.val_fraction, opts.glob, opts.text_field,
                       opts.overwrite, opts.num_proc)  # fmt: skip
    s = meta["splits"]
    skipped = (
        f"; skipped {meta['skipped_binary_files']} binary file(s)" if meta["skipped_binary_files"] else ""
    )
    print(
        f"shardlab: wrote {opts.out}: {s['train']['tokens']:,} train tokens ({s['train']['documents']} documents), "
        f"{s['val']['tokens']:,} val tokens ({s['val']['documents']}), {meta['dtype']}, vocab {meta['vocab_size']}"
        f"{skipped}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
