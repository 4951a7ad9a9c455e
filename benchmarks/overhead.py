# What does shardlab cost over a minimal hand-written PyTorch loop? Both train the same model with the
# same strategy on the same token batches, in the same processes, one step each in turn: every step of
# shardlab's real loop (trainer.loop.train) is preceded by one step of the raw loop, run from the entry of
# shardlab's train_step. Paired steps are a second apart, so the load of other jobs on a shared machine,
# which drifts over seconds to minutes and made whole-run A/B rounds differ by 5-10% here, hits both alike.
#   shardlab's step i: from the end of raw step i to the start of raw step i+1, i.e. all of its loop body
#                      (train_step, scheduler, metrics, loggers, checkpoint hook, the next step's batches)
#   raw step i:        the raw loop's forward, backward, clip, AdamW step and loss.item()
# Printed: tokens/s of each side (median over steps after warm-up), their ratio, the median of the per-step
# ratios and of each round's. --aa runs the raw loop against itself the same way: the method's own noise.
# Run under torchrun from the repo root:
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

import trainer.loop
from launcher.compose import config_dir, setup_hydra
from models import build_model
from trainer.checks import model_args
from trainer.data import build_data, micro_batches
from trainer.dist import init_distributed


class RawLoop:
    # The loop a user would write by hand: same model, init, wrapper, optimizer, batches; nothing else.
    def __init__(self, cfg, env):
        t = cfg.trainer
        args = model_args(cfg)
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
        self.model, self.env = model, env
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, foreach=True)
        self.data = build_data(cfg.data, t.seq_len, t.seed, args.vocab_size)
        self.micro = t.global_batch_size // env.world_size

    def step(self, step: int) -> None:
        env = self.env
        for x, y in micro_batches(self.data, step, env.rank, env.world_size, self.micro, 1):
            loss = F.cross_entropy(self.model(x).float().flatten(0, 1), y.flatten())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()  # the loop reads its loss each step, as shardlab does


def interleaved_round(cfg, env, run_dir: Path) -> tuple[list[float], list[float]]:
    # -> seconds per step after warm-up: (shardlab's, the raw loop's), paired by step.
    raw = RawLoop(cfg, env)
    enter, after_raw = [], []
    real_train_step = trainer.loop.train_step

    def train_step(*args, **kwargs):
        enter.append(time.perf_counter())
        raw.step(len(enter))
        after_raw.append(time.perf_counter())
        return real_train_step(*args, **kwargs)

    trainer.loop.train_step = train_step  # train() looks the name up at every step
    try:
        trainer.loop.train(cfg, env, run_dir)  # its own step times include the raw steps: not used
    finally:
        trainer.loop.train_step = real_train_step
    w, n = cfg.metrics.warmup_steps, len(enter) - 1  # the last shardlab step has no end mark
    ours = [enter[i + 1] - after_raw[i] for i in range(n)][w:]
    raws = [after_raw[i] - enter[i] for i in range(n)][w:]
    return ours, raws


def aa_round(cfg, env) -> tuple[list[float], list[float]]:
    # The raw loop against a second copy of itself, in the same alternation.
    a, b = RawLoop(cfg, env), RawLoop(cfg, env)
    times_a, times_b = [], []
    for step in range(1, cfg.trainer.max_steps + 1):
        t0 = time.perf_counter()
        b.step(step)
        t1 = time.perf_counter()
        a.step(step)
        times_b.append(t1 - t0)
        times_a.append(time.perf_counter() - t1)
    w = cfg.metrics.warmup_steps
    return times_a[w:], times_b[w:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--rounds", type=int, default=3, help="each with freshly built models")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--aa", action="store_true", help="raw loop against raw loop: the method's noise")
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
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.rounds):
            rounds.append(aa_round(cfg, env) if opts.aa else interleaved_round(cfg, env, Path(tmp) / str(r)))
    if env.rank == 0:
        report(opts, env, cfg.trainer.global_batch_size * cfg.trainer.seq_len, rounds)
    dist.barrier()
    dist.destroy_process_group()


def report(opts, env, tokens: int, rounds: list[tuple[list[float], list[float]]]) -> None:
    name, other = ("raw loop (A)", "raw loop (B)") if opts.aa else ("shardlab", "raw loop")
    ours = [s for o, _ in rounds for s in o]
    raws = [s for _, w in rounds for s in w]
    per_step = sorted(w / o for o, w in zip(ours, raws, strict=True))  # = tokens/s ratio of the pair
    per_round = [statistics.median(w) / statistics.median(o) for o, w in rounds]
    q1, q3 = statistics.quantiles(per_step, n=4)[::2]
    print(f"strategy={opts.strategy} model={opts.model} world={env.world_size} device={env.device.type}")
    print(f"{len(rounds)} rounds x {len(ours) // len(rounds)} measured steps, {tokens} tokens per step")
    print(f"tokens/s, {name}: {tokens / statistics.median(ours):,.0f} (median over steps)")
    print(f"tokens/s, {other}: {tokens / statistics.median(raws):,.0f}")
    print(f"ratio {name} / {other}: {statistics.median(raws) / statistics.median(ours):.3f}")
    print(
        f"median of per-step ratios: {statistics.median(per_step):.3f} (quartiles {q1:.3f}-{q3:.3f}); "
        "per round: " + ", ".join(f"{r:.3f}" for r in per_round)
    )


if __name__ == "__main__":
    main()
