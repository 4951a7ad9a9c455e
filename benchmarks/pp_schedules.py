# Pipeline schedules side by side with fsdp and fsdp_tp on 4 ranks (gloo on this CPU; nccl on GPUs), the same
# global batch for every layout:
#   python -m benchmarks.pp_schedules [--model llama_20m] [--steps 8] [--rounds 2]
# The pipelines are 2 stage ranks x 2 FSDP ranks (strategy=pp, 4 micro-batches of one sequence per data-parallel
# rank): gpipe, 1f1b, interleaved_1f1b (3 stages per rank) and zbv (2 per rank, in a V).
# 1. Speed, bubble and memory: `python train.py ... launcher.nproc_per_node=4` per layout, rounds interleaved;
#    tokens/s the median over rounds of each run's median; the bubble as measured by the run (1 - the stages'
#    compute time / the step's wall time, over every rank; summary.json's pipeline) beside the schedule's
#    arithmetic; each stage's peak RSS (the maximum over its ranks and rounds).
# 2. Bytes and per-stage memory: `torchrun --nproc_per_node=4 -m benchmarks.pp_schedules --count` builds each
#    layout with the loop's own build_parallel_model and counts one training step: the collectives' bytes as
#    benchmarks/tp_comm.py counts them (CommDebugMode), and the pipeline's point-to-point bytes (each
#    torch.distributed.P2POp that sends, as torch's schedules create them), summed over the 4 ranks. Beside
#    them, the arithmetic of the activations at the stage boundaries that cross ranks: per micro-batch, the
#    residual stream (E x D fp32) forward and its gradient backward. Each rank's step is also measured by
#    MemTracker and set against the planner's plan of its stages (not under the zero-bubble schedule: its split
#    backward, autograd.grad on stage inputs, defeats MemTracker's module hooks in torch 2.13).
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from benchmarks.tp_comm import KINDS, byte_counter, common
from benchmarks.tp_comm import arithmetic as collective_arithmetic

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {
    "fsdp": ("strategy=fsdp",),
    "fsdp_tp": ("strategy=fsdp_tp", "strategy.tp=2"),
    "pp gpipe": ("strategy=pp", "strategy.pp_schedule=gpipe"),
    "pp 1f1b": ("strategy=pp", "strategy.pp_schedule=1f1b"),
    "pp interleaved_1f1b": ("strategy=pp", "strategy.pp_schedule=interleaved_1f1b", "strategy.pp_stages_per_rank=3"),
    "pp zbv": ("strategy=pp", "strategy.pp_schedule=zbv", "strategy.pp_stages_per_rank=2"),
}  # fmt: skip


def timed_runs(opts, tmp: Path) -> dict[str, list]:
    from trainer.summary import RunSummary

    runs = defaultdict(list)
    for r in range(opts.rounds):
        for name, over in LAYOUTS.items():
            run_dir = tmp / f"{name.replace(' ', '-')}-{r}"
            cmd = [sys.executable, "train.py", *common(opts), *over, "launcher.nproc_per_node=4",
                   f"trainer.max_steps={opts.steps}", "metrics.warmup_steps=2", f"hydra.run.dir={run_dir}"]  # fmt: skip
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            summary = RunSummary.read(run_dir)
            if proc.returncode or summary is None or not summary.ok:
                raise SystemExit(f"{name}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            runs[name].append(summary)
            print(f"  round {r} {name}: {summary.tokens_per_s_median:,.0f} tok/s", flush=True)
    return runs


def count(opts) -> None:
    # In each of 4 torchrun ranks: a warm-up step, then one counted step, and one measured by MemTracker.
    import torch
    import torch.distributed as dist

    from trainer.dist import close_distributed, init_distributed

    sent = defaultdict(int)
    p2p_init = dist.P2POp.__init__

    def counted_p2p(self, op, tensor, *args, **kwargs):  # every point-to-point op torch's schedules create
        if op is dist.isend:
            sent["p2p"] += tensor.numel() * tensor.element_size()
        p2p_init(self, op, tensor, *args, **kwargs)

    dist.P2POp.__init__ = counted_p2p

    torch.set_num_threads(1)
    env = init_distributed("cpu", need_group=True)
    found = {name: _layout_row(opts, over, env, sent) for name, over in LAYOUTS.items()}
    if env.is_rank0:
        print("COUNTED " + json.dumps(found), flush=True)
    dist.barrier()
    close_distributed(env)


def _layout_row(opts, over, env, sent: dict) -> dict:
    # One layout in this rank: a warm-up step, a counted step (bytes summed over the ranks), and, for the
    # pipelines MemTracker can follow, a step measured against the planner's plan of this rank's stages.
    import torch
    import torch.distributed as dist

    from strategies import get_strategy
    from tests.helpers.run import compose_config
    from trainer.checks import model_args, run_dims
    from trainer.config import batch_layout
    from trainer.data import build_data, micro_batches
    from trainer.loop import build_parallel_model, train_step
    from trainer.memory import spec_from_config
    from trainer.memory.measure import measure_step
    from trainer.memory.pipeline import plan_stage
    from trainer.optim import build_optimizer
    from trainer.precision import build_precision

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

    def step(n):
        batches = list(micro_batches(data, n, dims.dp_rank, dims.dp_size, micro, accum))
        return lambda: train_step(model, optimizer, batches, precision, env, strategy, accum, 1.0)

    step(1)()
    sent.clear()
    with byte_counter(sent, module_hooks=not strategy.pipelined):
        step(2)()
    totals = torch.tensor([float(sent[k]) for k in ("p2p", *KINDS)], dtype=torch.float64)
    dist.all_reduce(totals)  # summed over the ranks
    row = {"bytes": dict(zip(("p2p", *KINDS), totals.tolist(), strict=True)), "micro": micro, "accum": accum,
           "tp": dims.tp, "dp_shard": dims.dp_shard, "pp": dims.pp}  # fmt: skip
    if strategy.pipelined and cfg.strategy.pp_schedule != "zbv":
        measured, _ = measure_step(model, optimizer, step(3), fsdp=True)
        spec = spec_from_config(cfg.strategy, cfg.trainer, "fp32", cfg.optim, dims, "cpu")
        plan = plan_stage(args, spec, dims.coords()["pp"])
        pair = torch.tensor([float(measured["peak_bytes"]), plan.peak], dtype=torch.float64)
        gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(env.world_size)]
        dist.all_gather(gathered, pair)
        row["memtracker_vs_plan"] = [t.tolist() for t in gathered]  # by world rank
    return row


def boundary_bytes(opts, name: str, row: dict) -> float:
    # The activations crossing ranks in one step, summed over the ranks: per micro-batch and boundary between
    # stages on different ranks, E x D fp32 forward and as much backward, in each data-parallel replica.
    from models import build_model_args

    if not row["pp"] > 1:
        return 0.0
    args = build_model_args(opts.model, {}, {"impl": "flash"})
    pp = row["pp"]
    per_rank = dict(o.split("=") for o in LAYOUTS[name] if "=" in o).get("strategy.pp_stages_per_rank", "1")
    stages = pp * int(per_rank)
    crossing = 2 * (pp - 1) if "zbv" in name else stages - 1  # ZBV: rank pp - 1 holds stages pp - 1 and pp
    e = row["micro"] * opts.seq_len
    return 2 * crossing * row["accum"] * e * args.dim * 4 * row["dp_shard"]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pp_schedules")
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="global batch, sequences per step")
    ap.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.count:
        return count(opts)
    with tempfile.TemporaryDirectory() as tmp:
        runs = timed_runs(opts, Path(tmp))
    counted = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "-m", "benchmarks.pp_schedules", "--count",
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
    print("| layout | tokens/s | bubble measured (arithmetic) | peak RSS GB by stage | MemTracker peak / plan by stage | p2p MB/step measured (arithmetic) | collective MB/step (all-gather / reduce-scatter / all-reduce) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in LAYOUTS:
        s, row = runs[name], found[name]
        tps = statistics.median(r.tokens_per_s_median for r in s)
        got = row["bytes"]
        collectives = " / ".join(f"{got[k] / 1e6:,.1f}" for k in KINDS)
        if row["pp"] == 1:
            want = collective_arithmetic(opts, name, row)
            expected = sum(want.values()) * 4  # tp_comm's arithmetic is per rank
            collectives += f" (arithmetic {expected / 1e6:,.1f} summed over ranks)"
            mem = max((r.peak_rss_gb_max or r.mem_reserved_peak_gb_max or 0.0) for r in s)
            print(f"| {name} | {tps:,.0f} | - | {mem:.2f} (all ranks) | - | - | {collectives} |")
            continue
        bubble = [r.pipeline["bubble_fraction"] for r in s]
        measured = statistics.median(b["measured"] for b in bubble)
        by_rank = [max(col) for col in zip(*(r.pipeline["peak_memory_gb_by_rank"] for r in s), strict=True)]
        stages = defaultdict(list)  # pipeline rank -> its ranks' figures (ranks are (pp, shard) row-major)
        for rank, gb in enumerate(by_rank):
            stages[rank // row["dp_shard"]].append(gb)
        rss = ", ".join(f"{max(v):.2f}" for _, v in sorted(stages.items()))
        ratio = "-"
        if "memtracker_vs_plan" in row:
            per_stage = defaultdict(list)
            for rank, (m, p) in enumerate(row["memtracker_vs_plan"]):
                per_stage[rank // row["dp_shard"]].append(p / m)
            ratio = ", ".join(f"{statistics.mean(v):.3f}" for _, v in sorted(per_stage.items()))
        p2p = f"{got['p2p'] / 1e6:,.1f} ({boundary_bytes(opts, name, row) / 1e6:,.1f})"
        print(
            f"| {name} | {tps:,.0f} | {measured:.3f} ({bubble[0]['arithmetic']:.3f}) | {rss} | {ratio} | {p2p} | {collectives} |"
        )


if __name__ == "__main__":
    main()
