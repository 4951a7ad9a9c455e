# What the integrity digests cost (trainer/integrity.py), side by side in one run:
#   python -m benchmarks.checkpoint_digest [--gb 1] [--rounds 5] [--dir /tmp]
# 1. A checkpoint of about --gb GB saved as a run saves it (trainer/checkpoint.save: a model of 4096 x 4096 Linears
#    and its AdamW state, 12 bytes a parameter; DCP's files synced to disk, then every file's digest recorded), and
#    the digest pass alone over the same files; its share of the save is the cost (target: under 5%).
# 2. The verify that a resume or an export runs over that checkpoint.
# 3. data=tokens' read-through of a token file of --gb GB (digest and largest id, in one pass).
# Medians over the rounds.
import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer import checkpoint, checkpoint_io, integrity
from trainer.data import verify_tokens


def model_and_optimizer(gb: float):
    # 12 bytes a parameter in the checkpoint: the fp32 weight and AdamW's two moments, after one step.
    n = max(1, round(gb * 2**30 / (12 * 4096 * 4096)))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(4096, 4096, bias=False) for _ in range(n)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4096)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description="what the integrity digests cost")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (a real disk, not tmpfs)")
    opts = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shardlab-digest-", dir=opts.dir))
    model, optimizer, scheduler = model_and_optimizer(opts.gb)
    times: dict[str, list[float]] = {"save": [], "digest": [], "verify": []}
    try:
        for r in range(opts.rounds):
            runs = root / f"round{r}"
            times["save"].append(
                timed(lambda d=runs: checkpoint.save(d, 1, model, optimizer, scheduler, 1, {}))
            )
            saved = checkpoint.step_dir(runs, 1)
            size = sum(f.stat().st_size for f in saved.iterdir()) / 2**30
            names = [f.name for f in saved.iterdir() if f.name != integrity.MANIFEST]
            times["digest"].append(timed(lambda d=saved, n=names: integrity.record(d, n)))
            checkpoint_io._verified.clear()  # verify reads it through, as a new process would
            times["verify"].append(timed(lambda d=saved: checkpoint_io.verify(d)))
            shutil.rmtree(runs)
        tokens = root / "tokens"
        tokens.mkdir()
        ids = np.random.default_rng(0).integers(0, 50_000, size=int(opts.gb * 2**30) // 2, dtype=np.uint16)
        ids.tofile(tokens / "train.bin")
        recorded = integrity.record(tokens, ["train.bin"])
        token_times = [
            timed(lambda: verify_tokens(tokens, recorded, np.uint16, 50_000, "")) for _ in range(opts.rounds)
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    share = med["digest"] / (med["save"] - med["digest"])
    print(
        f"checkpoint of {size:.2f} GB (model + AdamW state, one process, files synced), median of {opts.rounds} rounds:"
    )
    print(f"  trainer.checkpoint.save, digests included   {med['save']:7.3f} s")
    print(
        f"  the digest pass alone                       {med['digest']:7.3f} s  = {share:.1%} of the save without it (target < 5%)"
    )
    print(
        f"  verify on resume or export                  {med['verify']:7.3f} s  ({size / med['verify']:.2f} GB/s)"
    )
    tok = statistics.median(token_times)
    print(
        f"token file of {opts.gb:.2f} GB, digest + largest id in one pass: {tok:.3f} s ({opts.gb / tok:.2f} GB/s)"
    )


if __name__ == "__main__":
    main()
