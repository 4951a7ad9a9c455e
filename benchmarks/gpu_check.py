# What the CPU cannot measure, in one command on one GPU (H100/H200 class), one table, appended with the date,
# device and torch to benchmarks/RESULTS.md:
#   1 MFU: llama_1b, bf16-mixed, flash, per-block compile, the micro-batch the planner sizes to ~80% of memory
#   2 fp8 against bf16-mixed tokens/s on the same model (both compiled); if fp8 is slower at 1B, a wider shape
#   3 attention memory, flash against standard at T = 2K and 4K, and their growth exponents
#   4 the memory planner against torch.cuda.max_memory_allocated for 8 configs, and reserved - allocated
#   5 ddp and fsdp over nccl (world size 1): the bf16 loss trajectory against single's
#   6 the calibration (trainer/speed/, one GPU): the measured dense matmul peak per dtype against the datasheet's
#   7 the time model against the measured step time of every run above (each run predicts its own, calibrated)
#   8 QLoRA (precision=nf4 finetune=lora) on an 8B-shaped model on one GPU: peak memory against the planner, tokens/s.
#     The new layouts (tp, pp and their meshes) need 2 GPUs or more: not on one.
#     python -m benchmarks.gpu_check              # on the GPU machine (make gpu-check)
#     python -m benchmarks.gpu_check --dry-run    # on a CPU: every step with tiny shapes; RESULTS.md untouched
# Every training run is its own `python train.py` process (its peak memory and its settings its own).
import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from trainer.summary import RunSummary

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


class Runner:
    def __init__(self, tmp: Path, dry: bool, timeout: float):
        self.tmp, self.dry, self.timeout, self.n = tmp, dry, timeout, 0

    def train(self, *overrides: str) -> tuple[RunSummary, list[dict]]:
        # -> (summary.json, metrics.jsonl rows) of one run; a failure is a summary with its error.
        self.n += 1
        run_dir = self.tmp / f"run{self.n}"
        device = "trainer.device=cpu" if self.dry else "trainer.device=cuda"
        cmd = [sys.executable, "train.py", "data=synthetic", device, "trainer.progress_bar=false",
               f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
        began = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=self.timeout)
        print(
            f"  [{time.perf_counter() - began:5.1f} s] {' '.join(overrides)}: exit {proc.returncode}",
            flush=True,
        )
        summary_file, rows_file = run_dir / "summary.json", run_dir / "metrics.jsonl"
        summary = RunSummary.read(summary_file)
        if summary is None or (proc.returncode != 0 and summary.status != "failed"):
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            summary = RunSummary(status="failed", error=lines[-1] if lines else f"exit {proc.returncode}")
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
        return summary, rows


def sized_micro_batch(model: str, seq_len: int, memory_bytes: float, share: float, overrides: tuple) -> int:
    # The largest power-of-two micro-batch whose planned peak is at most `share` of the device's memory.
    from commands.plan import setup_of
    from launcher.compose import compose_config

    micro = 1
    while micro < 1024:
        cfg = compose_config([f"model={model}", f"trainer.seq_len={seq_len}", f"trainer.global_batch_size={2 * micro}",
                              "trainer.device=cuda", *overrides])  # fmt: skip
        if setup_of(cfg).plan().peak > share * memory_bytes:
            break
        micro *= 2
    return max(1, micro // 2)


def check_mfu_and_fp8(run: Runner, shape: dict, memory: float | None) -> list[tuple]:
    model, seq, steps, warmup = shape["model"], shape["seq_len"], shape["steps"], shape["warmup"]
    common = (f"model={model}", "attention=flash", "strategy.compile=true", f"trainer.seq_len={seq}",
              f"trainer.max_steps={steps}", f"metrics.warmup_steps={warmup}", f"trainer.log_every={steps}",
              "eval.at_end=false", *shape["extra"])  # fmt: skip
    micro = shape["micro"] or sized_micro_batch(
        model, seq, memory, 0.8, ("precision=bf16-mixed", *common[1:3])
    )
    batch = (f"trainer.global_batch_size={micro}", f"trainer.micro_batch_size={micro}")
    bf16, _ = run.train("precision=bf16-mixed", *common, *batch)
    fp8, _ = run.train("precision=fp8", *common, *batch)
    rows = [("1 MFU", f"{model} bf16-mixed flash compiled, micro-batch {micro} x {seq}",
             _fmt(bf16.tokens_per_s_median, ",.0f", " tok/s") + ", " + _fmt(bf16.tflops_per_device, ".1f", " TFLOP/s")
             + ", MFU " + _fmt(bf16.mfu, ".1%"), ">= 50%", _met(bf16.mfu, lambda v: v >= 0.5), bf16)]  # fmt: skip
    ratio = _ratio(fp8.tokens_per_s_median, bf16.tokens_per_s_median)
    rows.append(("2 fp8 vs bf16", f"{model}, the same micro-batch, both compiled", f"{_fmt(ratio, '.2f')}x (fp8 MFU vs bf16 peak "
                 f"{_fmt(fp8.mfu, '.1%')}, vs fp8 peak {_fmt(fp8.mfu_low_precision, '.1%')})", ">= 1.0",
                 _met(ratio, lambda v: v >= 1.0), fp8))  # fmt: skip
    if ratio is not None and ratio < 1.0 and shape["wider"]:
        wide = (*shape["wider"], f"trainer.seq_len={seq}", f"trainer.max_steps={steps}", f"metrics.warmup_steps={warmup}",
                "attention=flash", "strategy.compile=true", "eval.at_end=false", "trainer.global_batch_size=4",
                "trainer.micro_batch_size=4")  # fmt: skip
        wb, _ = run.train("precision=bf16-mixed", *wide)
        wf, _ = run.train("precision=fp8", *wide)
        r = _ratio(wf.tokens_per_s_median, wb.tokens_per_s_median)
        rows.append(
            (
                "2b fp8 vs bf16, wider",
                " ".join(shape["wider"]),
                f"{_fmt(r, '.2f')}x",
                "> 1.0",
                _met(r, lambda v: v > 1.0),
                wf,
            )
        )
    return rows


def check_attention(dry: bool) -> list[tuple]:
    # GPU: forward + backward of one attention call (bf16, batch 4, 32 heads of 64), the peak memory above its
    # inputs. Dry run: what autograd keeps of one call on the CPU (benchmarks/attention_memory.py's measure).
    from benchmarks.attention_memory import MODEL, kernel_saved_bytes
    from models.attention import get_attention

    lengths = (256, 512) if dry else (2048, 4096)
    used = {}
    for kernel in ("standard", "flash"):
        for t in lengths:
            if dry:
                used[kernel, t] = kernel_saved_bytes(kernel, MODEL.n_heads, t, torch.float32)
                continue
            q, k, v = (
                torch.randn(4, 32, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3)
            )
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            get_attention(kernel)(q, k, v, causal=True).float().sum().backward()
            torch.cuda.synchronize()
            used[kernel, t] = torch.cuda.max_memory_allocated() - base
            del q, k, v
    rows = []
    for t in lengths:
        ratio = used["standard", t] / used["flash", t]
        goal = 10 if t == lengths[0] else 20
        what = "bytes autograd keeps (CPU)" if dry else "peak memory above inputs, B 4, 32 heads x 64"
        rows.append((f"3 attention T={t}", f"standard / flash {what}",
                     f"{ratio:.1f}x ({used['standard', t] / GB:.3f} vs {used['flash', t] / GB:.3f} GB)", f">= {goal}x",
                     _met(ratio, lambda v, g=goal: v >= g), None))  # fmt: skip
    for kernel in ("standard", "flash"):
        e = math.log(used[kernel, lengths[1]] / used[kernel, lengths[0]]) / math.log(lengths[1] / lengths[0])
        want = 2 if kernel == "standard" else 1
        rows.append((f"3 growth exponent, {kernel}", f"log memory / log T, T {lengths[0]} -> {lengths[1]}", f"{e:.2f}",
                     f"~{want}", _met(e, lambda v, w=want: abs(v - w) < 0.35), None))  # fmt: skip
    return rows


PLANNER_CONFIGS = {
    "single fp32": ("strategy=single", "precision=fp32"),
    "single bf16-mixed": ("strategy=single", "precision=bf16-mixed"),
    "single bf16-true": ("strategy=single", "precision=bf16-true"),
    "single bf16-mixed AC full": (
        "strategy=single",
        "precision=bf16-mixed",
        "strategy.activation_checkpointing=full",
    ),
    "single bf16-mixed GQA": ("strategy=single", "precision=bf16-mixed", "attention=gqa"),
    "fsdp fp32": ("strategy=fsdp", "precision=fp32"),
    "fsdp bf16-mixed": ("strategy=fsdp", "precision=bf16-mixed"),
    "fsdp bf16-mixed AC full": (
        "strategy=fsdp",
        "precision=bf16-mixed",
        "strategy.activation_checkpointing=full",
    ),
}


def check_planner(run: Runner, shape: dict) -> list[tuple]:
    rows = []
    for name, overrides in PLANNER_CONFIGS.items():
        s, _ = run.train(f"model={shape['planner_model']}", "attention=flash" if "GQA" not in name else "attention=gqa",
                         *overrides, f"trainer.seq_len={shape['seq_len']}", "trainer.global_batch_size=4",
                         "trainer.max_steps=4", "metrics.warmup_steps=1", "trainer.log_every=4", "eval.at_end=false")  # fmt: skip
        measured = s.mem_allocated_peak_gb_max or s.peak_rss_gb_max
        predicted = s.memory_predicted_peak_gb
        ratio = _ratio(predicted, measured)
        gap = (
            None
            if s.mem_reserved_peak_gb_max is None
            else s.mem_reserved_peak_gb_max - s.mem_allocated_peak_gb_max
        )
        kind = "CUDA allocated" if s.mem_allocated_peak_gb_max is not None else "CPU peak RSS (dry run)"
        rows.append((f"4 planner, {name}", f"predicted {_fmt(predicted, '.3f')} / {kind} {_fmt(measured, '.3f')} GB; "
                     f"reserved - allocated {_fmt(gap, '.3f')} GB", _fmt(ratio, ".3f"), "0.85-1.15",
                     _met(ratio, lambda v: 0.85 <= v <= 1.15) if not run.dry else "n/a (CPU)", s))  # fmt: skip
    return rows


def check_nccl(run: Runner, shape: dict) -> list[tuple]:
    common = (f"model={shape['planner_model']}", "precision=bf16-mixed", "attention=flash", f"trainer.seq_len={shape['seq_len']}",
              "trainer.global_batch_size=4", "trainer.max_steps=10", "trainer.log_every=1", "metrics.warmup_steps=1",
              "optim.lr=1e-3", "eval.at_end=false")  # fmt: skip
    single = [r["loss"] for r in run.train("strategy=single", *common)[1]]
    rows = []
    for strategy in ("ddp", "fsdp"):
        losses = [r["loss"] for r in run.train(f"strategy={strategy}", *common)[1]]
        worst = (
            max((abs(a - b) / abs(b) for a, b in zip(losses, single, strict=True)), default=None)
            if losses
            else None
        )
        rows.append((f"5 {strategy} vs single", "bf16 loss trajectory, 10 steps, world size 1" + ("" if run.dry else ", nccl"),
                     f"max relative difference {_fmt(worst, '.1e')}", "<= 1e-2 (bf16)", _met(worst, lambda v: v <= 1e-2), None))  # fmt: skip
    return rows


def check_calibration(dry: bool) -> list[tuple]:
    # Before the runs: with this device's calibration cached, every run predicts its own step time (check 7).
    from trainer.peaks import lookup_peak_tflops
    from trainer.speed import calibration
    from trainer.speed.calibrate import calibrate

    device = "cpu" if dry else "cuda"
    began = time.perf_counter()
    record = calibrate(device, 1)
    took = time.perf_counter() - began
    name = "cpu" if dry else torch.cuda.get_device_name()
    rows = []
    for dtype, precision in (
        ("bf16", "bf16-mixed"),
        ("fp16", "fp16-mixed"),
        ("tf32", "tf32"),
        ("fp32", "fp32"),
    ):
        rates = record["matmul_tflops"].get(dtype)
        if not rates:
            continue
        measured = max(rates.values())
        sheet = None if dry else lookup_peak_tflops(name, precision)
        ratio = _ratio(measured, sheet)
        rows.append((f"6 calibration {dtype}", f"measured dense matmul peak {_fmt(measured, '.4g')} TFLOP/s (n = 256..2048) "
                     f"against the datasheet's {_fmt(sheet, 'g')}; calibration {took:.0f} s, {calibration.path_of(record['key']).name}",
                     _fmt(ratio, ".0%"), "reported", "n/a", None))  # fmt: skip
    return rows


def check_time_model(summaries: list[tuple[str, RunSummary]]) -> list[tuple]:
    rows = []
    for name, s in summaries:
        ratio = _ratio(s.step_time_s_predicted, s.step_time_s_median)
        rows.append((f"7 time model, {name}", f"predicted {_fmt(s.step_time_s_predicted, '.4f')} s / measured "
                     f"{_fmt(s.step_time_s_median, '.4f')} s per step", _fmt(ratio, ".2f"), "0.5-2.0",
                     _met(ratio, lambda v: 0.5 <= v <= 2.0), None))  # fmt: skip
    return rows


def check_qlora(run: Runner, shape: dict) -> list[tuple]:
    s, _ = run.train(f"model={shape['qlora_model']}", *shape["qlora_extra"], "precision=nf4", "finetune=lora", "attention=flash",
                     f"trainer.seq_len={shape['seq_len']}", "trainer.global_batch_size=1", "trainer.max_steps=6",
                     "metrics.warmup_steps=2", "trainer.log_every=6", "eval.at_end=false")  # fmt: skip
    measured = s.mem_allocated_peak_gb_max or s.peak_rss_gb_max
    ratio = _ratio(s.memory_predicted_peak_gb, measured)
    return [(f"8 QLoRA {shape['qlora_model']}", f"nf4 base + LoRA, micro-batch 1 x {shape['seq_len']}: "
             f"{_fmt(s.tokens_per_s_median, ',.0f', ' tok/s')}, peak {_fmt(measured, '.2f')} GB, planner "
             f"{_fmt(s.memory_predicted_peak_gb, '.2f')} GB", f"planner / measured {_fmt(ratio, '.3f')}", "0.85-1.15",
             _met(ratio, lambda v: 0.85 <= v <= 1.15) if not run.dry else "n/a (CPU)", s)]  # fmt: skip


def _fmt(v, spec: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def _ratio(a, b):
    return a / b if a is not None and b else None


def _met(value, test) -> str:
    return "n/a" if value is None else ("yes" if test(value) else "NO")


SHAPES = {
    # The real check: llama_1b at 2048 tokens; planner configs on llama_160m (8 quick runs).
    "gpu": dict(
        model="llama_1b",
        seq_len=2048,
        steps=30,
        warmup=10,
        micro=None,
        extra=(),
        planner_model="llama_160m",
        wider=("model=llama3_8b", "model.n_layers=4"),
        qlora_model="llama3_8b",
        qlora_extra=(),
    ),  # fmt: skip
    # --dry-run: every step on a CPU in a few minutes.
    "dry": dict(
        model="debug",
        seq_len=64,
        steps=4,
        warmup=1,
        micro=2,
        extra=(),
        planner_model="debug",
        wider=("model=debug",),
        qlora_model="debug",
        qlora_extra=(
            "model.dim=256",
        ),  # NF4 stores weights in blocks of 16384: debug's width 128 leaves none whole
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; prints, writes nothing")
    ap.add_argument("--timeout", type=float, default=600)
    opts = ap.parse_args()
    if not opts.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU: run on a GPU machine, or --dry-run to try every step here", file=sys.stderr)
        return 2
    shape = SHAPES["dry" if opts.dry_run else "gpu"]
    device = "cpu (dry run)" if opts.dry_run else torch.cuda.get_device_name()
    memory = None if opts.dry_run else float(torch.cuda.get_device_properties(0).total_memory)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(Path(tmp), opts.dry_run, opts.timeout)
        rows = check_calibration(opts.dry_run)
        rows += check_mfu_and_fp8(run, shape, memory)
        rows += check_attention(opts.dry_run)
        rows += check_planner(run, shape)
        rows += check_nccl(run, shape)
        rows += check_qlora(run, shape)
        ran = [(r[0], r[5]) for r in rows if r[5] is not None and r[5].step_time_s_predicted]
        rows += check_time_model(ran)
    took = time.perf_counter() - began
    table = ["| check | what | result | goal | met |", "|---|---|---|---|---|"]
    table += [f"| {c} | {w} | {r} | {g} | {m} |" for c, w, r, g, m, _ in rows]
    failed = [f"{c}: {s.error}" for c, *_, s in rows if s and s.status == "failed"]
    head = f"## {date.today()} {device}, torch {torch.__version__} (CUDA {torch.version.cuda}), {took / 60:.1f} min"
    text = "\n".join([head, "", *table, *(f"- failed: {f}" for f in failed), ""])
    print("\n" + text)
    if not opts.dry_run:
        results = REPO / "benchmarks" / "RESULTS.md"
        if not results.exists():
            results.write_text(
                "# GPU results\n\nAppended by `make gpu-check` (benchmarks/gpu_check.py), newest last.\n\n"
            )
        with open(results, "a") as f:
            f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
