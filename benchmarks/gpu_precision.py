# Every precision option on a real device, side by side: each runs as its own `python train.py` (a fresh
# process, so peak memory and process-wide settings such as TF32 are its own), then one table: did it
# train (steps, finite loss), tokens/s and its ratio to fp32, peak memory, bytes per parameter of weights
# and optimizer state. On CUDA fp8 must run for real (not emulated) on compute capability >= 8.9 and be
# refused up front, with the reason, below it. Run from the repo root where a GPU is lent:
#   python -m benchmarks.gpu_precision                       # llama_160m, single GPU
#   python -m benchmarks.gpu_precision --model llama_1b --steps 30 --set trainer.seq_len=2048
#   python -m benchmarks.gpu_precision --device cpu --model llama_20m   # the CPU figures in the README
#   python -m benchmarks.gpu_precision --compile    # bf16-mixed, fp8, fp8-rowwise, int8 also compiled
# Uncompiled, torchao's fp8/int8 scaling runs as many small kernels: --compile adds each of those options
# (and bf16-mixed, their baseline) with per-block torch.compile as rows of their own ("+compile"), which is
# how fp8's speed is meant to be measured.
# Exit status 1 if a run failed that should have run, or fp8 misbehaved.
import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from trainer.precision import FULL_TRAINING
from trainer.summary import RunSummary

REPO = Path(__file__).resolve().parent.parent
# name -> overrides; adamw8bit is an optimizer, measured against fp32 + adamw.
RUNS = {name: (f"precision={name}",) for name in FULL_TRAINING}  # nf4: benchmarks/finetune_memory.py
RUNS["adamw8bit"] = ("precision=fp32", "optim=adamw8bit")
COMPILED = ("bf16-mixed", "fp8", "fp8-rowwise", "int8")  # --compile: these again, compiled


def run_one(name: str, overrides: tuple[str, ...], opts, tmp: Path) -> RunSummary:
    run_dir = tmp / name
    cmd = [
        sys.executable,
        "train.py",
        f"model={opts.model}",
        "data=synthetic",
        f"trainer.device={opts.device}",
        f"trainer.max_steps={opts.steps}",
        f"trainer.global_batch_size={opts.batch}",
        f"trainer.seq_len={opts.seq_len}",
        f"trainer.log_every={opts.steps}",
        "trainer.progress_bar=false",
        f"metrics.warmup_steps={opts.warmup}",
        f"hydra.run.dir={run_dir}",
        *overrides,
        *opts.set,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=opts.timeout)
    summary_file = run_dir / "summary.json"
    summary = RunSummary.read(summary_file)
    if summary is None or (proc.returncode != 0 and summary.status != "failed"):
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        summary = RunSummary(status="failed", error=lines[-1] if lines else f"exit {proc.returncode}")
    return summary


def median_run(runs: list[RunSummary]) -> RunSummary:
    # The run with the median tokens/s stands for the option (a failure anywhere is the result).
    if any(s.status != "ok" for s in runs):
        return next(s for s in runs if s.status != "ok")
    return sorted(runs, key=lambda s: s.tokens_per_s_median or 0.0)[len(runs) // 2]


def memory_gb(s: RunSummary) -> float | None:
    for value in (s.mem_allocated_peak_gb_max, s.peak_rss_gb_max):
        if value is not None:
            return value
    return None


def per_param(s: RunSummary, key: str) -> str:
    state = s.state_bytes_per_rank or {}
    n = s.n_params
    return f"{state[key] / n:.2f}" if n and key in state else "-"


def fp8_verdict(name: str, s: dict, capability) -> str | None:
    # None: fine. On CUDA fp8 must be real on sm89+ and refused with the reason below it.
    if not name.startswith("fp8") or capability is None:
        return None
    if tuple(capability) >= (8, 9):
        if s.status != "ok":
            return f"{name} should run on sm{capability[0]}{capability[1]}: {s.error}"
        return f"{name} ran emulated on a GPU that has fp8" if s.emulated else None
    if s.status == "ok" or "compute capability 8.9" not in str(s.error):
        return f"{name} on sm{capability[0]}{capability[1]} should be refused up front, got {s.status}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--model", default="llama_160m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=1, help="repeat all runs, interleaved; report medians")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--only", nargs="*", default=None, help="a subset of: " + ", ".join(RUNS))
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, key=value")
    ap.add_argument("--compile", action="store_true", help="also " + ", ".join(COMPILED) + " compiled")
    opts = ap.parse_args()
    if opts.compile:
        RUNS.update({f"{n}+compile": (*RUNS[n], "strategy.compile=true") for n in COMPILED})
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: run where a GPU is lent, or pass --device cpu", file=sys.stderr)
        return 2
    capability = torch.cuda.get_device_capability() if opts.device == "cuda" else None
    device = torch.cuda.get_device_name() if capability else "cpu"
    names = opts.only or list(RUNS)
    names += [f"{n}+compile" for n in names if opts.compile and n in COMPILED and opts.only]
    rounds: dict[str, list[RunSummary]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        # Interleaved (fp32, bf16-mixed, ..., fp32, bf16-mixed, ...): machine noise hits every option alike.
        for r in range(opts.rounds):
            for name in names:
                s = run_one(name, RUNS[name], opts, Path(tmp) / f"round{r}")
                rounds[name].append(s)
                print(f"round {r} {name}: {s.status} {s.error or ''}", file=sys.stderr, flush=True)
    results = {name: median_run(runs) for name, runs in rounds.items()}

    base = results["fp32"].tokens_per_s_median if "fp32" in results else None
    print(
        f"\n{device} (capability {capability}), model={opts.model}, batch {opts.batch} x {opts.seq_len}, "
        f"{opts.steps} steps ({opts.warmup} warm-up), median of {opts.rounds} round(s) {' '.join(opts.set)}"
    )
    mem_kind = "peak alloc GB" if capability else "peak RSS GB"
    header = ["run", "status", "steps", "loss first->last", "tokens/s", "vs fp32", mem_kind, "W B/param",
              "opt B/param", "notes"]  # fmt: skip
    rows, problems = [], []
    for name, s in results.items():
        ok = s.status == "ok"
        loss_ok = ok and all(math.isfinite(s.get(k) or math.nan) for k in ("first_loss", "final_loss"))
        tps = s.tokens_per_s_median
        notes = []
        if s.emulated:
            notes.append("emulated")
        if s.skipped_steps:
            notes.append(f"{s['skipped_steps']} skipped")
        if not ok:
            notes.append(str(s.error or "")[:90])
        rows.append([
            name,
            s.status,
            str(s.steps if s.steps is not None else "-"),
            f"{s['first_loss']:.3f}->{s['final_loss']:.3f}" if loss_ok else "-",
            f"{tps:,.0f}" if tps else "-",
            f"{tps / base:.2f}x" if tps and base else "-",
            f"{memory_gb(s):.2f}" if memory_gb(s) is not None else "-",
            per_param(s, "params_bytes"),
            per_param(s, "optim_state_bytes"),
            "; ".join(notes),
        ])  # fmt: skip
        if (verdict := fp8_verdict(name, s, capability)) is not None:
            problems.append(verdict)
        elif not name.startswith("fp8") and not loss_ok:
            problems.append(f"{name}: {s.get('error', 'non-finite loss')}")
        elif name.startswith("fp8") and ok and not loss_ok:
            problems.append(f"{name}: non-finite loss")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for p in problems:
        print(f"PROBLEM: {p}")
    print("all checks passed" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
