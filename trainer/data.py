# Token sources. Each optimizer step draws one *global* batch that depends only on (seed, step), whatever
# the world size; rank r takes its slice of rows and splits it into micro-batches. So single, DDP and
# FSDP see the same tokens per step (the parity tests rely on this), and a resumed run continues from
# `step` with nothing else to restore.
from pathlib import Path

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step, row) over the generator's seed space


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

    def rows(self, step: int, rows: range, global_rows: int) -> torch.Tensor:
        g = torch.Generator()
        out = torch.empty(len(rows), self.seq_len + 1, dtype=torch.long)
        for i, row in enumerate(rows):
            g.manual_seed(_seed(self.seed, step, row))
            out[i] = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)
        return out  # (rows, T + 1)


class TextTokens:
    # Windows of seq_len + 1 tokens at random offsets of one token stream (bytes by default).
    def __init__(self, tokens: torch.Tensor, vocab_size: int, seq_len: int, seed: int, description: str):
        if tokens.numel() < seq_len + 1:
            raise ValueError(
                f"data has {tokens.numel()} tokens, fewer than trainer.seq_len + 1 = {seq_len + 1}: "
                "point data.path at more text or lower trainer.seq_len"
            )
        self.tokens, self.vocab_size, self.seq_len, self.seed = tokens, vocab_size, seq_len, seed
        self.description = description

    def rows(self, step: int, rows: range, global_rows: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, step))
        # Offsets for the whole global batch, so each row's window is the same at any world size. A window
        # holds seq_len + 1 tokens, so the last valid start is numel - seq_len - 1 (randint's high is exclusive).
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (global_rows,), generator=g)
        idx = starts[rows.start : rows.stop, None] + torch.arange(self.seq_len + 1)
        return self.tokens[idx].long()  # (rows, T + 1)


def read_text(path: str, glob: str, max_bytes: int) -> tuple[bytes, int]:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data.path {str(p)!r} does not exist: point data.path at a text file or directory")
    files = [p] if p.is_file() else sorted(f for f in p.rglob(glob) if f.is_file())
    chunks, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        chunk = f.read_bytes()[: max_bytes - total]
        chunks.append(chunk)
        total += len(chunk)
    if total == 0:
        raise ValueError(f"no text found under data.path {str(p)!r} matching data.glob {glob!r}")
    return b"".join(chunks), len(chunks)  # the files read, not all that matched


def build_data(data_cfg, seq_len: int, seed: int, vocab_size: int):
    if data_cfg.name == "synthetic":
        return SyntheticTokens(vocab_size, seq_len, seed)
    if data_cfg.name != "text":
        raise ValueError(f"unknown data {data_cfg.name!r}: valid options are synthetic, text")
    raw, n_files = read_text(data_cfg.path, data_cfg.glob, data_cfg.max_bytes)
    if data_cfg.tokenizer is None:
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        what = f"{len(raw):,} bytes of {n_files} file(s) under {data_cfg.path}, byte-level tokens"
        return TextTokens(tokens, 256, seq_len, seed, what)
    tok = load_tokenizer(data_cfg.tokenizer)
    ids = tok(raw.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    what = f"{len(ids):,} tokens of {n_files} file(s) under {data_cfg.path}, tokenizer {data_cfg.tokenizer}"
    return TextTokens(torch.tensor(ids, dtype=torch.int32), len(tok), seq_len, seed, what)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not Path(path).expanduser().is_dir():
        raise ValueError(
            f"data.tokenizer {path!r} is not a local directory: give the path of a saved HF tokenizer "
            "(nothing is downloaded at run time), or data.tokenizer=null for byte-level tokens"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def check_text_source(data_cfg, seq_len: int) -> None:
    # Cheap enough for validation: stops at the first files that hold one window's worth of bytes.
    if not data_cfg.path:
        raise ValueError(
            "data=text needs data.path: point data.path at a text file or directory "
            "(data/text.yaml's default is the Python standard library's sources)"
        )
    p = Path(data_cfg.path).expanduser()
    if not p.exists():
        raise ValueError(
            f"data.path {data_cfg.path!r} does not exist: point data.path at a text file or directory"
        )
    files = [p] if p.is_file() else (f for f in p.rglob(data_cfg.glob) if f.is_file())
    # Byte-level: a window is seq_len + 1 bytes. A tokenizer's count is unknown until it has run.
    need = seq_len + 1 if data_cfg.tokenizer is None else 1
    total = 0
    for f in files:
        total += f.stat().st_size
        if min(total, data_cfg.max_bytes) >= need:
            return
    if total == 0:
        raise ValueError(f"no text found under data.path {str(p)!r} matching data.glob {data_cfg.glob!r}")
    raise ValueError(
        f"data.path {str(p)!r} holds {min(total, data_cfg.max_bytes)} bytes (data.max_bytes "
        f"{data_cfg.max_bytes}), fewer than trainer.seq_len + 1 = {need}: point data.path at more text "
        "or lower trainer.seq_len"
    )


def data_vocab_size(data_cfg, seq_len: int = 1) -> int | None:
    # The vocabulary the data needs, checked against the model's before any work starts.
    if data_cfg.name not in ("synthetic", "text"):
        raise ValueError(f"unknown data {data_cfg.name!r}: valid options are synthetic, text")
    if data_cfg.name == "text":
        check_text_source(data_cfg, seq_len)
        return 256 if data_cfg.tokenizer is None else len(load_tokenizer(data_cfg.tokenizer))
    return None


def micro_batches(source, step: int, rank: int, world_size: int, micro_batch_size: int, accum: int):
    # Rank r holds rows [r * per_rank, (r + 1) * per_rank) of the global batch; yields (x, y) per micro-step.
    per_rank = micro_batch_size * accum
    rows = source.rows(step, range(rank * per_rank, (rank + 1) * per_rank), per_rank * world_size)
    for chunk in rows.split(micro_batch_size):
        yield chunk[:, :-1], chunk[:, 1:]  # (micro, T) inputs and next-token targets
