# Launch to first step: how long a user waits from pressing enter to the first trained step, shardlab's
# `python train.py ... launcher.nproc_per_node=2` against torchrun of a minimal raw loop (benchmarks/raw_loop.py)
# with the same model, token shapes and strategy. Both are started as whole commands, in turn (A B A B ...,
# so the load of a shared machine hits both alike), and timed from the start of the process to the moment
# rank 0 has finished its first optimizer step: shardlab's first row in metrics.jsonl (trainer.log_every=1),
# the raw loop's mark file, both polled every 5 ms.
#   python -m benchmarks.startup                  # ddp and fsdp, 4 rounds each
#   python -m benchmarks.startup --strategy fsdp --rounds 6
# Target: shardlab / raw at most 1.3.
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR")
    return {k: v for k, v in os.environ.items() if k not in drop + ("MASTER_PORT",)}


def _first_step(cmd: list[str], done, timeout: float = 300) -> float:
    # -> seconds from starting cmd until done() is true; the command then runs to its end.
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while not done():
        if proc.poll() is not None or time.perf_counter() - start > timeout:
            proc.kill()
            raise SystemExit(
                f"{' '.join(cmd[:4])} ... ended before its first step:\n{proc.communicate()[1][-3000:]}"
            )
        time.sleep(0.005)
    took = time.perf_counter() - start
    if proc.wait(timeout=timeout) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.communicate()[1][-3000:]}")
    return took


def shardlab(tmp: Path, strategy: str, model: str, n: int) -> float:
    run_dir = tmp / f"shardlab-{strategy}-{n}"
    cmd = [sys.executable, "train.py", f"strategy={strategy}", f"model={model}", "data=synthetic",
           "launcher.nproc_per_node=2", "trainer.max_steps=3", "trainer.seq_len=128",
           "trainer.global_batch_size=8", "trainer.log_every=1", "trainer.progress_bar=false",
           "trainer.device=cpu" if not _cuda() else "trainer.device=cuda", f"hydra.run.dir={run_dir}"]  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    return _first_step(cmd, lambda: metrics.is_file() and metrics.stat().st_size > 0)


def raw(tmp: Path, strategy: str, model: str, n: int) -> float:
    mark = tmp / f"raw-{strategy}-{n}.mark"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd = [
        *torchrun,
        "benchmarks/raw_loop.py",
        f"--strategy={strategy}",
        f"--model={model}",
        f"--mark={mark}",
    ]
    return _first_step(cmd, lambda: mark.is_file() and mark.stat().st_size > 0)


def _cuda() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "fsdp", "both"], default="both")
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--rounds", type=int, default=4)
    opts = ap.parse_args()
    strategies = ["ddp", "fsdp"] if opts.strategy == "both" else [opts.strategy]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw(tmp, strategies[0], opts.model, -1)  # warm-up: the page cache, not a measurement
        for strategy in strategies:
            ours, theirs = [], []
            for n in range(opts.rounds):
                ours.append(shardlab(tmp, strategy, opts.model, n))
                theirs.append(raw(tmp, strategy, opts.model, n))
            per_round = [o / t for o, t in zip(ours, theirs, strict=True)]
            print(f"strategy={strategy} model={opts.model} 2 processes, {opts.rounds} interleaved rounds")
            print("  shardlab launch to first step, s: " + ", ".join(f"{t:.2f}" for t in ours))
            print("  raw loop (torchrun), s:           " + ", ".join(f"{t:.2f}" for t in theirs))
            print(
                f"  median {statistics.median(ours):.2f} s vs {statistics.median(theirs):.2f} s: "
                f"ratio {statistics.median(ours) / statistics.median(theirs):.2f} "
                f"(per round {', '.join(f'{r:.2f}' for r in per_round)}; target <= 1.3)",
                flush=True,
            )


if __name__ == "__main__":
    main()
