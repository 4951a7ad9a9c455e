# Prepared token files: `python -m commands.prepare` from text files, JSON Lines and Parquet (bytes or a local
# tokenizer), split by whole documents, deterministic, written whole or not at all; data=tokens reading them
# through numpy.memmap; and every bad input of both in one line.
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from commands.prepare import prepare
from tests.helpers.cli import cli_env
from tests.helpers.run import REPO, compose_config, read_rows, train_in_process
from trainer.checks import validate
from trainer.data import build_data, micro_batches


def _docs(out: Path, split: str, dtype=np.uint16, eos: int = 0) -> list[np.ndarray]:
    tokens = np.fromfile(out / f"{split}.bin", dtype=dtype)
    assert tokens[-1] == eos  # every document ends in EOS
    return [d[:-1] for d in np.split(tokens, np.flatnonzero(tokens == eos) + 1)[:-1]]


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory, text_corpus) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "bytes"
    proc = subprocess.run(
        [sys.executable, "-m", "commands.prepare", str(text_corpus), str(out), "--glob", "*.py", "--val-fraction", "0.34"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"shardlab: wrote {out}: ")
    return out


def test_bytes_of_files_split_by_whole_documents(byte_dir, text_corpus):
    meta = json.loads((byte_dir / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["eos_id"]) == (
        "bytes",
        256,
        "uint16",
        0,
    )
    files = sorted(text_corpus.glob("*.py"))
    assert [s["path"] for s in meta["sources"]] == [f.name for f in files]
    assert [s["bytes"] for s in meta["sources"]] == [f.stat().st_size for f in files]
    docs = {split: [bytes(d.astype(np.uint8)) for d in _docs(byte_dir, split)] for split in ("train", "val")}
    assert (len(docs["train"]), len(docs["val"])) == (2, 1)  # 3 files, one held out whole
    assert sorted(docs["train"] + docs["val"]) == sorted(f.read_bytes() for f in files)
    for split in ("train", "val"):
        assert meta["splits"][split]["tokens"] == sum(len(d) + 1 for d in docs[split])
        assert meta["splits"][split]["documents"] == len(docs[split])
    assert sorted(p.name for p in byte_dir.parent.iterdir()) == ["bytes"]  # no temporary left beside it


def test_the_same_input_gives_byte_identical_files(byte_dir, text_corpus, tmp_path):
    again = prepare(str(text_corpus), str(tmp_path / "again"), glob="*.py", val_fraction=0.34, num_proc=1)
    assert again["splits"] == json.loads((byte_dir / "meta.json").read_text())["splits"]
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (byte_dir / name).read_bytes(), name


def test_json_lines_and_parquet_rows_with_a_tokenizer(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    rows = [
        {"id": i, "body": f"document number {i}: " + "def f(x): return x * 2\n" * (i + 1)} for i in range(10)
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for source in ("a.jsonl", "a.parquet"):
        out = tmp_path / f"out-{source}"
        meta = prepare(
            str(tmp_path / source), str(out), str(tokenizer_dir), val_fraction=0.2, text_field="body"
        )
        assert (meta["vocab_size"], meta["dtype"], meta["eos_id"]) == (len(tok), "uint16", tok.eos_token_id)
        docs = [tok.decode(d) for split in ("train", "val") for d in _docs(out, split, eos=tok.eos_token_id)]
        assert sorted(docs) == sorted(r["body"] for r in rows)
        assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (8, 2)
        assert (out / "tokenizer" / "tokenizer.json").is_file()  # for the Hugging Face export


def test_data_tokens_reads_windows_through_memmap(byte_dir, tmp_path, one_thread):
    cfg = compose_config("data=tokens", f"data.path={byte_dir}", "trainer.seq_len=64", "eval.batches=1")
    data = build_data(cfg.data, 64, 1234, 256)
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)  # never a copy in memory
    train = np.fromfile(byte_dir / "train.bin", dtype=np.uint16)
    x, y = next(micro_batches(data, 3, 0, 1, 4, 1))
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():  # each window is consecutive tokens of train.bin
        starts = np.flatnonzero(train == row[0])
        assert any(np.array_equal(train[s : s + 65], row) for s in starts)
    assert torch.equal(data.rows(3, range(4), 4), data.rows(3, range(4), 4))
    val = np.fromfile(byte_dir / "val.bin", dtype=np.uint16)
    assert np.array_equal(data.val_rows(0, range(2), 2).numpy().ravel(), val[: 2 * 65])
    summary = train_in_process(cfg, tmp_path / "run")
    assert summary.status == "ok" and "uint16" in summary.data and summary.val_loss > 0
    assert read_rows(tmp_path / "run")[-1]["val_loss"] == summary.val_loss


def test_data_tokens_bad_input(byte_dir, tmp_path, tokenizer_dir, text_corpus):
    def refused(path, *overrides) -> str:
        with pytest.raises(ValueError) as info:
            validate(compose_config("data=tokens", f"data.path={path}", *overrides), 1, "cpu")
        return str(info.value)

    broken = tmp_path / "broken"
    broken.mkdir()
    assert "meta.json is missing" in refused(broken)
    (broken / "meta.json").write_text("{not json")
    assert "meta.json cannot be read (JSONDecodeError" in refused(broken)
    short = tmp_path / "short"
    short.mkdir()
    for name in ("meta.json", "val.bin"):
        (short / name).write_bytes((byte_dir / name).read_bytes())
    (short / "train.bin").write_bytes((byte_dir / "train.bin").read_bytes()[:-2])
    assert "train.bin is" in refused(short) and "but meta.json records" in refused(short)
    big = prepare(str(text_corpus), str(tmp_path / "tok"), str(tokenizer_dir), val_fraction=0.34, glob="*.py")
    message = refused(tmp_path / "tok", "model.vocab_size=256")
    assert (
        f"data needs a vocabulary of {big['vocab_size']} tokens (its meta.json) but model.vocab_size is 256"
        in message
    )
    assert "held-out windows" in refused(byte_dir, "eval.batches=1000") and "--val-fraction" in refused(
        byte_dir, "eval.batches=1000"
    )


def test_a_prepare_that_fails_midway_leaves_nothing(tmp_path):
    # (Its bad inputs, each in one line: tests/test_bad_input.py's table.)
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match="a.jsonl:3: 'text' is 5, not a string"):
        prepare(str(tmp_path / "a.jsonl"), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
