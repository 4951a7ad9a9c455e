# Full fine-tuning against LoRA and QLoRA, side by side in one run, on a Hugging Face Llama-like model built and saved
# here (about 162 M parameters: hidden 768, 12 layers, MLP 3072, vocabulary 32000; nothing downloaded):
#   python -m benchmarks.finetune_memory [--steps 6] [--seq-len 128] [--batch 4]
# Each of full (bf16-mixed: fp32 weights, mixed-precision compute), LoRA (a frozen bf16 base, fp32 adapters of rank
# 8 on every block Linear) and QLoRA (the base's block Linears in NF4) trains under single and under fsdp on 2 ranks
# (`python train.py model=hf ...`, one process each). From each run's summary.json: the state bytes per rank
# (parameters, gradients, optimizer state, as measured from the tensors), the peak RSS (max over ranks) and tokens/s;
# beside them the arithmetic: 16 bytes a parameter for full mixed-precision training; for LoRA 2 a base parameter
# and 16 an adapter's; for QLoRA 0.516 a block-Linear weight (4 bits, an int8 scale per 64, a bf16 factor per 256
# of those), 2 for the rest of the base (embeddings, norms, head), 16 an adapter's; each divided by the FSDP ranks.
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, max_position_embeddings=1024)  # fmt: skip
MODES = {
    "full": ("finetune=full", "precision=bf16-mixed"),
    "lora": ("finetune=lora", "precision=bf16-true"),
    "qlora": ("finetune=lora", "precision=nf4"),
}
NF4_BYTES = 0.5 + 1 / 64 + 2 / (64 * 256)


def counts() -> dict[str, int]:
    # Parameters of the base (block Linears apart) and of the adapters (rank 8 on the 7 Linears of each block).
    h, f, n, v = (
        SHAPE["hidden_size"],
        SHAPE["intermediate_size"],
        SHAPE["num_hidden_layers"],
        SHAPE["vocab_size"],
    )
    linears = n * (4 * h * h + 3 * h * f)
    other = 2 * v * h + n * 2 * h + h  # embeddings and head, the norms
    adapters = n * 8 * (4 * (h + h) + 3 * (h + f))
    return {"linears": linears, "other": other, "adapters": adapters}


def arithmetic(mode: str, shards: int) -> float:
    c = counts()
    if mode == "full":
        return 16 * (c["linears"] + c["other"]) / shards
    base = NF4_BYTES * c["linears"] if mode == "qlora" else 2 * c["linears"]
    return (base + 2 * c["other"] + 16 * c["adapters"]) / shards


def main() -> None:
    ap = argparse.ArgumentParser(description="full fine-tuning, LoRA and QLoRA side by side")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    opts = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(tempfile.mkdtemp(prefix="shardlab-finetune-"))
    base = root / "base"
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(base)
    c = counts()
    print(f"base: {c['linears'] + c['other']:,} parameters ({c['linears']:,} in the blocks' Linears), adapters "
          f"{c['adapters']:,}; {opts.steps} steps of {opts.batch} x {opts.seq_len} tokens", flush=True)  # fmt: skip
    rows = []
    for strategy, nproc in (("single", 1), ("fsdp", 2)):
        for mode, over in MODES.items():
            run = root / f"{mode}-{strategy}"
            args = [sys.executable, "train.py", "model=hf", f"model.name_or_path={base}", *over, f"strategy={strategy}",
                    f"launcher.nproc_per_node={nproc}", "data=text", f"trainer.max_steps={opts.steps}",
                    f"trainer.seq_len={opts.seq_len}", f"trainer.global_batch_size={opts.batch}", "metrics.warmup_steps=2",
                    "eval.at_end=false", "trainer.progress_bar=false", "optim.lr=1e-4", f"hydra.run.dir={run}"]  # fmt: skip
            proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  {mode} {strategy}: failed: {proc.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            s = json.loads((run / "summary.json").read_text())
            state = s["state_bytes_per_rank"]
            rows.append((mode, strategy, nproc, s, state))
            print(f"  {mode} {strategy}: {s['tokens_per_s_median']:,.0f} tokens/s", flush=True)
    print("\n| mode | strategy | tokens/s | peak RSS GB (max over ranks) | state MB per rank: params / grads / optimizer "
          "| total | arithmetic | measured / arithmetic | state bytes per base parameter |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    n_base = c["linears"] + c["other"]
    for mode, strategy, nproc, s, state in rows:
        want = arithmetic(mode, nproc)
        total = state["params_bytes"] + state["grads_bytes"] + state["optim_state_bytes"]
        print(f"| {mode} | {strategy} | {s['tokens_per_s_median']:,.0f} | {s['peak_rss_gb_max']:.2f} | "
              f"{state['params_bytes'] / 1e6:,.1f} / {state['grads_bytes'] / 1e6:,.1f} / {state['optim_state_bytes'] / 1e6:,.1f} "
              f"| {total / 1e6:,.1f} | {want / 1e6:,.1f} | {total / want:.3f} | {total * nproc / n_base:.3f} |")  # fmt: skip
    # The NF4 base's bytes per quantized weight, from the two runs: LoRA and QLoRA hold the same parameters but for
    # the block Linears, 2 bytes each in LoRA (bf16) and NF4's in QLoRA.
    held = {(mode, strategy): state["params_bytes"] * nproc for mode, strategy, nproc, _, state in rows}
    for strategy in ("single", "fsdp"):
        if ("lora", strategy) in held and ("qlora", strategy) in held:
            nf4 = 2 - (held["lora", strategy] - held["qlora", strategy]) / c["linears"]
            print(f"\nQLoRA, {strategy}: {nf4:.4f} bytes per block-Linear weight (arithmetic {NF4_BYTES:.4f}); "
                  f"its parameters, adapters included, {held['qlora', strategy] / n_base:.3f} bytes per base parameter")  # fmt: skip


if __name__ == "__main__":
    main()
