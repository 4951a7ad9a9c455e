# What does shardlab cost over a minimal hand-written PyTorch loop? Both train the same model with the
# same strategy on the same token batches. Rounds alternate in ABBA order (shardlab, raw, raw, shardlab, ...)
# so machine noise and any first-or-second position effect hit both alike. Each round gives each side's
# median tokens/s over its steps and its p90 (the fast steps: other load on a shared machine only ever
# slows a step, so the fast steps are the least disturbed). Printed: the ratio of the medians of rounds,
# and the median over rounds of the paired (same-round) ratios, of both. Run under torchrun from the root:
#   torchrun --nproc_per_node=2 -m benchmarks.overhead --strategy ddp
#   torchrun --nproc_per_node=2 -m benchmarks.overhead --strategy fsdp
# Target: ratio >= 0.98 (the framework costs under 2%).
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from launcher.compose import config_dir, setup_hydra
from models import build_model
from trainer.checks import resolve_model_args
from trainer.data import build_data, micro_batches
from trainer.dist import init_distributed
from trainer.loop import train
from trainer.metrics import quantile


def shardlab_round(cfg, env, run_dir: Path) -> tuple[float, float]:
    summary = train(cfg, env, run_dir)
    return summary["tokens_per_s_median"], summary["tokens_per_s_p90"]


def raw_round(cfg, env) -> tuple[float, float]:
    # The loop a user would write by hand: same model, init, wrapper, optimizer, batches; nothing else.
    t = cfg.trainer
    args = resolve_model_args(cfg)
    with torch.device("meta" if cfg.strategy.name == "fsdp" else env.device):
        model = build_model(args)
    if cfg.strategy.name == "ddp":
        model.init_weights(t.seed)
        model = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        model.to_empty(device=env.device)
        model.init_weights(t.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, foreach=True)
    data = build_data(cfg.data, t.seq_len, t.seed, args.vocab_size)
    micro = t.global_batch_size // env.world_size
    times = []
    for step in range(1, t.max_steps + 1):
        start = time.perf_counter()
        for x, y in micro_batches(data, step, env.rank, env.world_size, micro, 1):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the loop reads its loss each step, as shardlab does
        times.append(time.perf_counter() - start)
    tokens = t.global_batch_size * t.seq_len
    rates = [tokens / s for s in times[cfg.metrics.warmup_steps :]]
    return statistics.median(rates), quantile(rates, 0.9)  # as trainer.metrics summarises shardlab's steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15)
    opts = ap.parse_args()
    setup_hydra()
    overrides = [
        f"strategy={opts.strategy}",
        f"model={opts.model}",
        "data=synthetic",
        f"trainer.max_steps={opts.steps}",
        "trainer.seq_len=128",
        "trainer.global_batch_size=8",
        "trainer.log_every=10",
        "trainer.progress_bar=false",
        "optim.implementation=foreach",
        "metrics.warmup_steps=3",
    ]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    env = init_distributed("cpu" if not torch.cuda.is_available() else "auto", need_group=True)
    ours, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.rounds):
            if r % 2 == 0:
                ours.append(shardlab_round(cfg, env, Path(tmp) / f"round{r}"))
                raw.append(raw_round(cfg, env))
            else:
                raw.append(raw_round(cfg, env))
                ours.append(shardlab_round(cfg, env, Path(tmp) / f"round{r}"))
    if env.rank == 0:
        print(f"strategy={opts.strategy} model={opts.model} world={env.world_size} device={env.device.type}")
        for i, what in enumerate(("median", "p90")):
            a, b = [r[i] for r in ours], [r[i] for r in raw]
            print(f"{what} tokens/s per round, shardlab: " + ", ".join(f"{x:,.0f}" for x in a))
            print(f"{what} tokens/s per round, raw loop: " + ", ".join(f"{x:,.0f}" for x in b))
            paired = sorted(x / y for x, y in zip(a, b, strict=True))
            print(
                f"{what}: ratio shardlab/raw of the medians of rounds {statistics.median(a) / statistics.median(b):.3f}; "
                f"median of per-round ratios {statistics.median(paired):.3f} "
                f"(range {paired[0]:.3f}-{paired[-1]:.3f})"
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
