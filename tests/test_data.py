# Token sources: deterministic in (seed, step), the same global batch at any world size and gradient
# accumulation, and text tokens that are the bytes of the real files.
import sysconfig
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers.run import compose_config
from trainer.checks import validate
from trainer.data import SyntheticTokens, build_data, micro_batches, read_text

SEQ_LEN = 16


def text_cfg(path, glob="*", max_bytes=8_000_000, val_fraction=0.0):
    return OmegaConf.create(
        {
            "name": "text",
            "path": str(path),
            "glob": glob,
            "max_bytes": max_bytes,
            "tokenizer": None,
            "val_fraction": val_fraction,
        }
    )


def sources(text_corpus: Path, seed: int = 1234):
    return {
        "synthetic": build_data(OmegaConf.create({"name": "synthetic"}), SEQ_LEN, seed, 256),
        "text": build_data(text_cfg(text_corpus, "*.py"), SEQ_LEN, seed, 256),
    }


def global_batch(source, step: int, world: int, gbs: int, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    # What all ranks of one step see together, concatenated in rank order.
    micro = gbs // world // accum
    xs, ys = [], []
    for rank in range(world):
        for x, y in micro_batches(source, step, rank, world, micro, accum):
            assert x.shape == y.shape == (micro, SEQ_LEN)
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("kind", ["synthetic", "text"])
def test_deterministic_given_the_seed(text_corpus, kind):
    a, b, other = sources(text_corpus)[kind], sources(text_corpus)[kind], sources(text_corpus, seed=99)[kind]
    for step in (1, 2, 57):
        rows = a.rows(step, range(8), 8)
        assert rows.shape == (8, SEQ_LEN + 1) and rows.dtype == torch.long
        assert torch.equal(rows, b.rows(step, range(8), 8))
        assert not torch.equal(rows, other.rows(step, range(8), 8))
        assert int(rows.min()) >= 0 and int(rows.max()) < 256
    assert not torch.equal(a.rows(1, range(8), 8), a.rows(2, range(8), 8))  # each step draws anew


@pytest.mark.parametrize("kind", ["synthetic", "text"])
@pytest.mark.parametrize("accum", [1, 2])
def test_global_batch_is_the_same_at_any_world_size(text_corpus, kind, accum):
    source = sources(text_corpus)[kind]
    gbs = 8
    for step in (1, 3):
        x1, y1 = global_batch(source, step, 1, gbs, 1)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
        for world in (1, 2, 4):
            x, y = global_batch(source, step, world, gbs, accum)
            assert torch.equal(x, x1) and torch.equal(y, y1), (world, accum)


def test_text_tokens_are_the_bytes_of_the_files(text_corpus):
    raw, n_files, _ = read_text(str(text_corpus), "*.py", 8_000_000)
    files = sorted(text_corpus.glob("*.py"))
    assert n_files == 3
    assert raw == b"".join(f.read_bytes() for f in files)  # sorted by path, concatenated
    source = build_data(text_cfg(text_corpus, "*.py"), SEQ_LEN, 1234, 256)
    assert bytes(source.train) == raw
    for row in source.rows(5, range(32), 32):
        assert bytes(row.tolist()) in raw

    # max_bytes cuts the stream in sorted file order; a single file is read alone.
    cut = build_data(text_cfg(text_corpus, "*.py", max_bytes=1000), SEQ_LEN, 1234, 256)
    assert bytes(cut.train) == raw[:1000]
    single = build_data(text_cfg(text_corpus / "notes.txt"), SEQ_LEN, 1234, 256)
    assert bytes(single.train) == b"not python " * 50


def test_every_window_can_be_drawn(tmp_path):
    # A file of exactly seq_len + 1 bytes holds one window, and both of its ends are reachable. (No NUL byte in
    # it: that would make it a binary file, which data=text skips.)
    data = bytes(range(1, SEQ_LEN + 2))
    (tmp_path / "one.txt").write_bytes(data)
    source = build_data(text_cfg(tmp_path / "one.txt"), SEQ_LEN, 0, 256)
    assert torch.equal(source.rows(1, range(4), 4), torch.tensor([list(data)] * 4))
    (tmp_path / "short.txt").write_bytes(data[:-1])
    with pytest.raises(ValueError, match=r"trainer\.seq_len"):
        build_data(text_cfg(tmp_path / "short.txt"), SEQ_LEN, 0, 256)
    cfg = compose_config("data=text", f"data.path={tmp_path / 'short.txt'}", f"trainer.seq_len={SEQ_LEN}")
    with pytest.raises(ValueError, match=r"trainer\.seq_len \+ 1 = 17"):
        validate(cfg, 1, "cpu")


def test_default_text_is_the_python_stdlib():
    cfg = compose_config("data=text")
    path = Path(cfg.data.path)
    assert path == Path(sysconfig.get_paths()["stdlib"]) and path.is_dir()
    assert (path / "os.py").is_file()
    source = build_data(cfg.data, 64, 1234, 256)
    # The stdlib holds more than 8 MB of Python; the last data.val_fraction of it is held out.
    assert len(source.train) + len(source.val) == cfg.data.max_bytes
    assert len(source.val) == int(cfg.data.max_bytes * cfg.data.val_fraction) > 0
    assert "byte-level" in source.description
    text = b"".join(bytes(r.tolist()) for r in source.rows(1, range(64), 64)).decode("utf-8", "replace")
    assert "def " in text or "import " in text or "self" in text


def test_missing_path_names_data_path(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path .*no-such"):
        build_data(text_cfg(tmp_path / "no-such"), SEQ_LEN, 0, 256)
    for path in ("null", str(tmp_path / "no-such")):
        with pytest.raises(ValueError, match=r"data\.path"):
            validate(compose_config("data=text", f"data.path={path}"), 1, "cpu")


def test_synthetic_is_uniform_over_the_vocabulary():
    rows = SyntheticTokens(vocab_size=50, seq_len=255, seed=0).rows(1, range(40), 40)
    counts = torch.bincount(rows.flatten(), minlength=50)
    assert counts.numel() == 50 and int(counts.min()) > 0.5 * rows.numel() / 50


def test_synthetic_rows_are_independent_of_the_rows_requested():
    source = SyntheticTokens(256, SEQ_LEN, 7)
    full = source.rows(4, range(8), 8)
    assert torch.equal(source.rows(4, range(3, 6), 8), full[3:6])


def test_text_holds_out_the_streams_tail_and_evaluates_on_the_same_windows(text_corpus):
    raw, _, _ = read_text(str(text_corpus), "*.py", 8_000_000)
    source = build_data(text_cfg(text_corpus, "*.py", val_fraction=0.1), SEQ_LEN, 1234, 256)
    n_val = int(len(raw) * 0.1)
    assert bytes(source.train) == raw[:-n_val] and bytes(source.val) == raw[-n_val:]
    assert source.val_windows == n_val // (SEQ_LEN + 1)
    for step in range(1, 50):  # no training window reaches into the held-out tail
        for row in source.rows(step, range(8), 8):
            assert bytes(row.tolist()) in raw[:-n_val]
    # Held-out batch i is the same consecutive windows every time, and rank slices tile it.
    batch = source.val_rows(1, range(0, 8), 8)
    assert torch.equal(batch, source.val_rows(1, range(0, 8), 8))
    assert torch.equal(
        torch.cat([source.val_rows(1, range(0, 4), 8), source.val_rows(1, range(4, 8), 8)]), batch
    )
    first = 8 * (SEQ_LEN + 1)  # batch 1 starts after batch 0's 8 windows
    assert bytes(batch[0].tolist()) == raw[-n_val:][first : first + SEQ_LEN + 1]


def test_synthetic_held_out_stream_is_not_a_training_step():
    source = SyntheticTokens(256, SEQ_LEN, 7)
    held = source.val_rows(0, range(8), 8)
    assert torch.equal(held, source.val_rows(0, range(8), 8))
    assert all(not torch.equal(held, source.rows(step, range(8), 8)) for step in range(1, 20))
