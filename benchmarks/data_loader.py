# data=tokens on this machine: (1) peak RSS of a training run on a ~1 GB token file against the same run on a
# ~1 MB one (windows are read through numpy.memmap, so the file is never copied into memory: the two peaks
# should be within 100 MB); (2) the loader's tokens/s (one process, memmap, llama_20m's batch shape) beside
# llama_20m's training tokens/s from that run: the loader must be at least 50x faster, so data is never what a
# step waits for. The token files are random uint16 ids with the meta.json commands.prepare writes.
#   python -m benchmarks.data_loader                 # 1 GB and 1 MB, 30 training steps each
#   python -m benchmarks.data_loader --big-mb 200    # a quicker look
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from trainer.data import build_data
from trainer.summary import RunSummary

REPO = Path(__file__).resolve().parent.parent


def write_tokens(root: Path, n_tokens: int, vocab: int = 256) -> Path:
    # train.bin (n_tokens) and val.bin (1%), written in chunks: the writer needs no more memory than the reader.
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    counts = {"train": n_tokens, "val": max(n_tokens // 100, 4096)}
    for split, n in counts.items():
        with open(root / f"{split}.bin", "wb") as f:
            for start in range(0, n, 1 << 24):
                f.write(rng.integers(0, vocab, min(1 << 24, n - start), dtype=np.uint16).tobytes())
    meta = {"tokenizer": "bytes", "vocab_size": vocab, "dtype": "uint16", "eos_id": 0,
            "splits": {s: {"tokens": n, "documents": 1} for s, n in counts.items()}}  # fmt: skip
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def train_run(data_dir: Path, run_dir: Path, steps: int) -> RunSummary:
    cmd = [sys.executable, "train.py", "model=llama_20m", "data=tokens", f"data.path={data_dir}", "trainer.device=cpu",
           f"trainer.max_steps={steps}", "trainer.log_every=10", "trainer.progress_bar=false", "eval.batches=2",
           f"hydra.run.dir={run_dir}"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return RunSummary.read(run_dir)


def loader_tokens_per_s(data_dir: Path, seq_len: int, batch: int, seconds: float = 3.0) -> float:
    cfg = OmegaConf.create({"name": "tokens", "path": str(data_dir)})
    data = build_data(cfg, seq_len, 1234, 256)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        steps += 1
        data.rows(steps, range(batch), batch)
    return steps * batch * seq_len / (time.perf_counter() - start)


def write_apart(root: Path, n_tokens: int) -> Path:
    # In a process of its own: Linux's ru_maxrss, which summary.json's peak RSS reads, carries a parent's RSS
    # into the children it starts (exec keeps the old mm's high-water mark), and writing 1 GB of random tokens
    # would raise this process's.
    subprocess.run(
        [sys.executable, "-m", "benchmarks.data_loader", "--write", str(root), str(n_tokens)],
        cwd=REPO,
        check=True,
    )
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", nargs=2, metavar=("DIR", "TOKENS"), help=argparse.SUPPRESS)
    ap.add_argument("--big-mb", type=int, default=1024)
    ap.add_argument("--small-mb", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=30)
    opts = ap.parse_args()
    if opts.write:
        write_tokens(Path(opts.write[0]), int(opts.write[1]))
        return
    defaults = OmegaConf.load(REPO / "conf" / "trainer" / "default.yaml")  # llama_20m trains at these
    seq_len, batch = defaults.get("seq_len", 256), defaults.get("global_batch_size", 8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for name, mb in (("small", opts.small_mb), ("big", opts.big_mb)):
            data_dir = write_apart(tmp / name, int(mb * 1e6 / 2))
            size = sum(f.stat().st_size for f in data_dir.glob("*.bin")) / 1e6
            runs[name] = (size, train_run(data_dir, tmp / f"run-{name}", opts.steps))
        (small_mb, small), (big_mb, big) = runs["small"], runs["big"]
        print(f"peak RSS, llama_20m {opts.steps} steps, 1 process (CPU):")
        print(f"  {small_mb:9.1f} MB token files: {small.peak_rss_gb_max * 1e3:8.1f} MB")
        print(f"  {big_mb:9.1f} MB token files: {big.peak_rss_gb_max * 1e3:8.1f} MB")
        diff = (big.peak_rss_gb_max - small.peak_rss_gb_max) * 1e3
        print(f"  difference {diff:+.1f} MB (target: within 100 MB)")
        loader = loader_tokens_per_s(tmp / "big", seq_len, batch)
        training = big.tokens_per_s_median
        print(f"loader (memmap, batch {batch} x {seq_len}): {loader:,.0f} tokens/s; llama_20m training: "
              f"{training:,.0f} tokens/s; ratio {loader / training:,.0f}x (target: at least 50x)")  # fmt: skip


if __name__ == "__main__":
    main()
