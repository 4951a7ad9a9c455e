# A minimal hand-written training loop, started by torchrun: what benchmarks/startup.py compares shardlab's
# launch-to-first-step against. The same model (models.build_model) and the same token shapes, DDP or FSDP2
# over gloo/nccl; no config system, no checks, no metrics. After its first optimizer step rank 0 appends
# the time to --mark, then it trains the remaining steps and exits.
#   torchrun --nproc_per_node=2 benchmarks/raw_loop.py --strategy ddp --model llama_20m --mark /tmp/mark
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script by torchrun
from models import build_model, build_model_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--mark", required=True)
    opts = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    args = build_model_args(opts.model)
    if opts.strategy == "ddp":
        model = build_model(args).to(device)
        model.init_weights(0)
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        with torch.device("meta"):
            model = build_model(args)
        for block in model.layers:
            fully_shard(block)
        fully_shard(model, reshard_after_forward=False)
        model.to_empty(device=device)
        model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    per_rank = opts.global_batch // world
    for step in range(1, opts.steps + 1):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, args.vocab_size, (opts.global_batch, opts.seq_len + 1), generator=g)
        x = tokens[rank * per_rank : (rank + 1) * per_rank].to(device)
        loss = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step == 1 and rank == 0:
            with open(opts.mark, "a") as f:
                f.write(f"{time.time()}\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
