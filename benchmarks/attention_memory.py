# How much activation memory does attention cost as sequences grow? Standard attention keeps the (B, H, T, T)
# softmax for backward, so its memory grows with T^2; flash attention keeps the output and a (B, H, T)
# logsumexp, so it grows with T; GQA (4 query heads per K/V head) also shrinks the K/V projections. Measured
# on CPU at T = 512 ... 4096, two ways:
#   kernel: the bytes autograd keeps for backward inside the attention function alone (saved-tensor hooks),
#           beyond its q, k, v inputs;
#   model:  a small Llama's activations saved for backward over one training step, by PyTorch's MemTracker
#           (trainer/memory/measure.py), next to the planner's prediction (trainer/memory/plan.py).
# Prints the bytes, the standard / flash ratios and each variant's growth exponent (the slope of log bytes
# against log T: ~2 for standard, ~1 for flash), and draws them, log-log, into a PNG.
#   python -m benchmarks.attention_memory [--precision bf16-mixed] [--out benchmarks/attention_memory.png]
import argparse
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from models import build_model
from models.attention import get_attention
from models.llama import ModelArgs
from trainer.memory import PlanSpec, plan_memory
from trainer.memory.measure import measure_step
from trainer.precision import build_precision

SEQ_LENS = (512, 1024, 2048, 4096)
# name -> (kernel, K/V heads as a fraction of the query heads)
VARIANTS = {"standard": ("standard", 1), "flash": ("flash", 1), "gqa": ("flash", 4)}
# Small enough for a CPU at T = 4096, wide enough in heads that attention is most of a block's memory.
MODEL = ModelArgs(dim=256, n_layers=2, n_heads=8, vocab_size=256, multiple_of=256, max_seq_len=max(SEQ_LENS))


def kernel_saved_bytes(kernel: str, n_kv_heads: int, t: int, dtype: torch.dtype) -> int:
    # Unique storages autograd keeps for backward in one call of the attention function, inputs excluded.
    h, hd = MODEL.n_heads, MODEL.head_dim
    q = torch.randn(1, h, t, hd, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, n_kv_heads, t, hd, dtype=dtype, requires_grad=True) for _ in range(2))
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    kept: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in inputs:
            kept[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = get_attention(kernel)(q, k, v, causal=True)
    out.sum().backward()
    return sum(kept.values())


def model_activation_bytes(kernel: str, kv_div: int, t: int, precision: str) -> tuple[int, float]:
    # -> (measured, predicted) bytes saved for backward by a whole training step of MODEL at batch 1.
    args = dataclasses.replace(MODEL, attention=kernel, n_kv_heads=MODEL.n_heads // kv_div)
    torch.manual_seed(0)
    model = build_model(args)
    model.init_weights(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # stateless: only activations vary
    prec = build_precision(precision, torch.device("cpu"))
    tokens = torch.randint(0, args.vocab_size, (1, t + 1))

    def step():
        with prec.context():
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    measured, _ = measure_step(model, opt, step, fsdp=False)
    plan = plan_memory(args, PlanSpec(precision=precision, micro_batch=1, seq_len=t, device="cpu"))
    return measured["activations_bytes"], plan.activations


def exponent(ts, values) -> float:
    # Least-squares slope of log(value) on log(T).
    xs, ys = [math.log(t) for t in ts], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def run(precision: str) -> dict:
    dtype = torch.bfloat16 if precision != "fp32" else torch.float32
    results = {name: {"kernel": [], "model": [], "predicted": []} for name in VARIANTS}
    for t in SEQ_LENS:
        for name, (kernel, kv_div) in VARIANTS.items():
            results[name]["kernel"].append(kernel_saved_bytes(kernel, MODEL.n_heads // kv_div, t, dtype))
            measured, predicted = model_activation_bytes(kernel, kv_div, t, precision)
            results[name]["model"].append(measured)
            results[name]["predicted"].append(predicted)
            print(
                f"  T={t:5d} {name:9s} kernel {results[name]['kernel'][-1] / 1e6:9.2f} MB   "
                f"model {measured / 1e6:9.2f} MB (planner {predicted / 1e6:9.2f} MB)",
                flush=True,
            )
    return results


def report(results: dict, precision: str) -> str:
    lines = [
        f"\nactivation memory, {precision}, batch 1, {MODEL.n_heads} heads of {MODEL.head_dim}, dim {MODEL.dim}, "
        f"{MODEL.n_layers} blocks; MB",
    ]
    for what in ("kernel", "model"):
        head = f"{'T':>6s}" + "".join(f"{n:>12s}" for n in VARIANTS) + f"{'std/flash':>12s}{'flash/gqa':>12s}"
        lines += [
            "",
            f"{what}: "
            + (
                "kept by the attention function for backward"
                if what == "kernel"
                else "saved for backward by one training step (MemTracker)"
            ),
            head,
        ]
        for i, t in enumerate(SEQ_LENS):
            row = [results[n][what][i] for n in VARIANTS]
            lines.append(
                f"{t:6d}"
                + "".join(f"{v / 1e6:12.2f}" for v in row)
                + f"{row[0] / row[1]:12.2f}{row[1] / row[2]:12.2f}"
            )
        last = {n: math.log2(results[n][what][-1] / results[n][what][-2]) for n in VARIANTS}
        lines.append(
            f"growth exponent over the last doubling ({SEQ_LENS[-2]} -> {SEQ_LENS[-1]}): "
            + ", ".join(f"{n} {k:.2f}" for n, k in last.items())
        )
        lines.append(
            "growth exponent (slope of log bytes on log T): "
            + ", ".join(f"{n} {exponent(SEQ_LENS, results[n][what]):.2f}" for n in VARIANTS)
        )
    worst = max(
        abs(p / m - 1)
        for n in VARIANTS
        for p, m in zip(results[n]["predicted"], results[n]["model"], strict=True)
    )
    lines.append(f"planner vs MemTracker (model activations): largest difference {worst:.1%}")
    return "\n".join(lines)


def chart(results: dict, precision: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, what, title in zip(
        axes, ("kernel", "model"), ("attention function", "whole training step"), strict=True
    ):
        for name, color in zip(VARIANTS, ("tab:red", "tab:blue", "tab:green"), strict=True):
            values = [v / 1e6 for v in results[name][what]]
            k = exponent(SEQ_LENS, results[name][what])
            ax.plot(SEQ_LENS, values, "o-", color=color, label=f"{name} (measured, T^{k:.2f})")
            if what == "model":
                predicted = [v / 1e6 for v in results[name]["predicted"]]
                label = "planner (trainer/planner.py)" if name == "standard" else None
                ax.plot(SEQ_LENS, predicted, "x", color="black", markersize=9, label=label)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length T",
            ylabel="MB saved for backward",
            title=f"{title}, {precision}",
        )
        ax.set_xticks(SEQ_LENS, [str(t) for t in SEQ_LENS])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"chart: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16-mixed"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/attention_memory.png"))
    a = parser.parse_args()
    print(f"measuring {', '.join(VARIANTS)} at T = {', '.join(map(str, SEQ_LENS))} ({a.precision}, CPU)")
    results = run(a.precision)
    print(report(results, a.precision))
    chart(results, a.precision, a.out)


if __name__ == "__main__":
    main()
