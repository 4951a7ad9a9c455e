# fsdp, tp and fsdp_tp side by side on 4 ranks (gloo on this CPU; the same script on GPUs runs nccl):
#   python -m benchmarks.tp_comm [--model llama_20m] [--steps 8] [--rounds 2]
# 1. Speed and memory: `python train.py strategy=<layout> launcher.nproc_per_node=4 ...` for each layout in turn,
#    rounds interleaved (machine noise hits each alike); tokens/s is the median over rounds of each run's median,
#    peak RSS (CPU) or CUDA reserved the maximum over ranks, from each run's summary.json.
# 2. Communication: `torchrun --nproc_per_node=4 -m benchmarks.tp_comm --count` builds each layout with the
#    loop's own build_parallel_model and counts one training step (train_step) under torch's CommDebugMode,
#    extended to add up the bytes of each collective's full-size tensor (an all-gather's output, a
#    reduce-scatter's input, an all-reduce's buffer). Beside it, the arithmetic (fp32, P = the model's bytes,
#    P_b = its blocks', E = micro-batch x seq_len tokens per rank, D = dim, L = blocks, V = vocabulary):
#      FSDP full shard: all-gathers P in forward and P_b again in backward, reduce-scatters P of gradients
#      TP (sequence parallel), per block: forward all-gathers the residual stream before attention and the MLP
#        and reduce-scatters after wo and w2, backward the reverse (8 E D); the embedding's reduce-scatter and
#        the head's all-gather, each in both directions (4 E D); every rank computes the embedding's whole
#        gradient from the gathered gradient of its output, with no collective of its own
#      FSDP x TP: the TP terms within each pair (E per data-parallel rank), FSDP's on P / tp over the pairs
#    On the CPU TP is slower than FSDP; the point is that the figures are right, and run unchanged on GPUs.
import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {
    "fsdp": ("strategy=fsdp",),
    "tp": ("strategy=tp",),
    "fsdp_tp": ("strategy=fsdp_tp", "strategy.tp=2"),
}
KINDS = ("all_gather", "reduce_scatter", "all_reduce")


def common(opts) -> list[str]:
    return [f"model={opts.model}", "data=synthetic", "precision=fp32", "attention=flash", f"trainer.seq_len={opts.seq_len}",
            f"trainer.global_batch_size={opts.batch}", "trainer.progress_bar=false", "eval.at_end=false"]  # fmt: skip


def timed_runs(opts, tmp: Path) -> dict[str, list]:
    from trainer.summary import RunSummary

    runs = defaultdict(list)
    for r in range(opts.rounds):
        for name, over in LAYOUTS.items():
            run_dir = tmp / f"{name}-{r}"
            cmd = [sys.executable, "train.py", *common(opts), *over, "launcher.nproc_per_node=4",
                   f"trainer.max_steps={opts.steps}", "metrics.warmup_steps=2", f"hydra.run.dir={run_dir}"]  # fmt: skip
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            summary = RunSummary.read(run_dir)
            if proc.returncode or summary is None or not summary.ok:
                raise SystemExit(f"{name}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            runs[name].append(summary)
            print(f"  round {r} {name}: {summary.tokens_per_s_median:,.0f} tok/s", flush=True)
    return runs


def byte_counter(sink: dict, module_hooks: bool = True):
    # CommDebugMode's counts, and the bytes of each collective's full-size tensor added into sink[kind] (an
    # all-gather's output, a reduce-scatter's input, an all-reduce's buffer). module_hooks=False: a plain
    # TorchDispatchMode, which sees the same c10d ops, for pipelines (CommDebugMode's module tracker loses its
    # place when a schedule calls each stage once per micro-batch).
    import torch
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Plain(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class ByteCounter(CommDebugMode if module_hooks else Plain):
        def __init__(self):
            super().__init__()
            self.bytes = sink

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            name = (
                getattr(func, "__name__", str(func))
                .replace("allgather", "all_gather")
                .replace("allreduce", "all_reduce")
            )
            kind = next((k for k in KINDS if k in name), None)
            if out is not NotImplemented and kind and "c10d" in getattr(func, "namespace", ""):
                leaves = [
                    t
                    for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                    if isinstance(t, torch.Tensor)
                ]
                self.bytes[kind] += max(t.numel() * t.element_size() for t in leaves)
            return out  # fmt: skip

    return ByteCounter()


def count(opts) -> None:
    # In each of 4 torchrun ranks: one warm-up step, then one counted step, per layout.
    import torch
    import torch.distributed as dist

    from strategies import get_strategy
    from tests.helpers.run import compose_config
    from trainer.checks import model_args, run_dims
    from trainer.config import batch_layout
    from trainer.data import build_data, micro_batches
    from trainer.dist import close_distributed, init_distributed
    from trainer.loop import build_parallel_model, train_step
    from trainer.optim import build_optimizer
    from trainer.precision import build_precision

    torch.set_num_threads(1)
    env = init_distributed("cpu", need_group=True)
    found = {}
    for name, over in LAYOUTS.items():
        cfg = compose_config(*common(opts), *over, tiny=False)
        strategy = get_strategy(cfg.strategy.name)
        dims = run_dims(cfg.strategy, env.world_size, env.per_node, env.rank)
        args = model_args(cfg)
        model, precision = build_parallel_model(
            args, cfg.strategy, dims, env.device, 0, build_precision("fp32", env.device)
        )
        optimizer = build_optimizer(model, cfg.optim, env.device)
        micro, accum = batch_layout(cfg.trainer, dims)
        data = build_data(cfg.data, cfg.trainer.seq_len, 0, args.vocab_size)

        for n in (1, 2):  # a warm-up step (the optimizer's state exists from then on), then the counted one
            batches = micro_batches(data, n, dims.dp_rank, dims.dp_size, micro, accum)
            with byte_counter(defaultdict(int)) if n == 2 else contextlib.nullcontext() as counter:
                train_step(model, optimizer, batches, precision, env, strategy, accum, 1.0)
        found[name] = {"bytes": dict(counter.bytes), "counts": {str(k): v for k, v in counter.get_comm_counts().items()},
                       "micro": micro, "tp": dims.tp, "dp_shard": dims.dp_shard}  # fmt: skip
    if env.is_rank0:
        print("COUNTED " + json.dumps(found), flush=True)
    dist.barrier()
    close_distributed(env)


def arithmetic(opts, name: str, found: dict) -> dict[str, float]:
    from models import build_model_args, param_shapes

    args = build_model_args(opts.model, {}, {"impl": "flash"})
    shapes = param_shapes(args)
    block = 4 * sum(math.prod(s) for s in shapes.block.values()) * args.n_layers
    whole = 4 * sum(math.prod(s) for s in shapes.root.values()) + block
    e, d, n_layers = found["micro"] * opts.seq_len, args.dim, args.n_layers
    tp = found["tp"]
    out = dict.fromkeys(KINDS, 0.0)
    if name != "tp":  # FSDP over the data-parallel ranks, on 1/tp of the parameters
        out["all_gather"] += (whole + block) / tp
        out["reduce_scatter"] += whole / tp
    if tp > 1:  # sequence-parallel TP: 4 E D per block each way, the root's 2 E D each way
        out["all_gather"] += 4 * (4 * n_layers + 2) * e * d
        out["reduce_scatter"] += 4 * (4 * n_layers + 2) * e * d
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tp_comm")
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="global batch, sequences per step")
    ap.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.count:
        return count(opts)
    with tempfile.TemporaryDirectory() as tmp:
        runs = timed_runs(opts, Path(tmp))
    counted = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "-m", "benchmarks.tp_comm", "--count",
         f"--model={opts.model}", f"--seq-len={opts.seq_len}", f"--batch={opts.batch}"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    line = next((x for x in counted.stdout.splitlines() if x.startswith("COUNTED ")), None)
    if line is None:
        raise SystemExit(f"counting failed: {counted.stderr.strip().splitlines()[-3:]}")
    found = json.loads(line.removeprefix("COUNTED "))
    print(
        f"\n{opts.model}, 4 ranks, global batch {opts.batch} x {opts.seq_len}, fp32, {opts.rounds} rounds of {opts.steps} steps"
    )
    print("| layout | tokens/s | peak memory GB (max over ranks) | collective MB/step, measured (all-gather / reduce-scatter / all-reduce) | arithmetic | measured / arithmetic |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in LAYOUTS:
        s = runs[name]
        tps = statistics.median(r.tokens_per_s_median for r in s)
        mem = max((r.peak_rss_gb_max or r.mem_reserved_peak_gb_max or 0.0) for r in s)
        got, want = found[name]["bytes"], arithmetic(opts, name, found[name])
        measured = " / ".join(f"{got.get(k, 0) / 1e6:,.1f}" for k in KINDS)
        expected = " / ".join(f"{want[k] / 1e6:,.1f}" for k in KINDS)
        ratio = sum(got.values()) / sum(want.values())
        print(f"| {name} | {tps:,.0f} | {mem:.2f} | {measured} | {expected} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
