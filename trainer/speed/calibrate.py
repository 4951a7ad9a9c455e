# A calibration run (`python -m commands.calibrate`, and plan / tune where the cache has none): N processes, one per
# device, each measuring at once what trainer/speed/calibration.py measures, and rank 0 saving the record. Beside the
# rates it measures what each layout costs beyond them, by running it: a tiny Llama (calibration.tiny_args) under
# the real strategy over the world's ranks, one step timed, less what the time model predicts for that step from the
# rates alone: per block and micro-batch, what DDP's reducer, FSDP's hooks, copies and casts, and DTensor's dispatch
# add (on a CPU they are as large as the arithmetic of a small model).
import json
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.dist import cpu_threads
from trainer.speed.calibration import (
    KINDS,
    MATMUL_SIZES,
    attention_tflops,
    collective_points,
    copy_gbps,
    dtypes_for,
    fit,
    key,
    matmul_tflops,
    op_latency_us,
    save,
    timed,
    tiny_args,
)


def layout_overheads(device: torch.device, world: int, record: dict) -> dict[str, float]:
    # For every strategy, in its default options over the world's ranks: seconds per block (of a rank's share of
    # them) and micro-batch that its real step of the tiny Llama (2 micro-batches, AdamW) takes beyond what the time
    # model predicts for it without any overhead.
    from omegaconf import OmegaConf

    from models import parallel_plan
    from strategies import STRATEGIES
    from trainer.loop import build_parallel_model
    from trainer.memory import PlanSpec, plan_for_run
    from trainer.precision import build_precision
    from trainer.speed.model import model_costs, overhead_units, predict

    tiny, accum = tiny_args(), 2
    tokens = torch.zeros(1, 16, dtype=torch.long, device=device)
    costs = model_costs(tiny, 1, 16)
    bare = {**record, "layout_overhead_s": {}}
    out = {}
    for name, strategy in STRATEGIES.items():
        if not strategy.needs_group:
            continue
        cfg = OmegaConf.structured(strategy.schema)
        cfg.name = name
        try:
            dims = strategy.dims(cfg, world, world, dist.get_rank())
            strategy.check(cfg, dims, 1, accum, tiny, parallel_plan(tiny))
        except ValueError:  # a layout this world size cannot make (e.g. a 2 x 2 mesh of 2 ranks)
            continue
        model, precision = build_parallel_model(tiny, cfg, dims, device, 0, build_precision("fp32", device))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batches = [(tokens, tokens)] * accum

        def step(strategy=strategy, model=model, precision=precision, optimizer=optimizer, batches=batches):
            strategy.forward_backward(model, batches, accum, precision, device)
            optimizer.step()
            optimizer.zero_grad()

        measured = timed(step, device)
        spec = PlanSpec(strategy=name, dims=dims, micro_batch=1, seq_len=16, grad_accum=accum, device=device.type,
                        **strategy.plan_options(cfg))  # fmt: skip
        predicted = predict(tiny, spec, plan_for_run(tiny, spec), bare, costs).total_s
        out[name] = max(0.0, (measured - predicted) / overhead_units(tiny, spec))
        del model, optimizer
    return out


def measure(device: torch.device, rank: int, world: int) -> dict:
    # Every rank at once (inside a process group of `world` ranks, or alone): rank 0's record, each rate the slowest
    # rank's. On a CPU, with the threads per process the workers use (and this process's own after).
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(world))
    try:
        return _measure(device, rank, world)
    finally:
        torch.set_num_threads(before)


def _measure(device: torch.device, rank: int, world: int) -> dict:
    record: dict = {"key": key(device.type, world), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    rates: dict = {}
    for dtype in dtypes_for(device.type):
        for n in MATMUL_SIZES:
            rates.setdefault(dtype, {})[str(n)] = matmul_tflops(device, dtype, n)
    record["matmul_tflops"] = rates
    record["attention_tflops"] = {}
    for dtype in (d for d in dtypes_for(device.type) if d != "tf32"):
        record["attention_tflops"][dtype] = attention_tflops(device, dtype)
    record["copy_gbps"] = copy_gbps(device)
    latency, ops = op_latency_us(device)
    record["op_latency_us"], record["tiny_ops"] = latency, ops
    record["collectives"] = {}
    for size in [s for s in range(2, world + 1) if world % s == 0]:
        points = collective_points(device, size, rank, world)
        record["collectives"][str(size)] = {k: {"fit": fit(points[k]), "points": points[k]} for k in KINDS}
    record["layout_overhead_s"] = layout_overheads(device, world, record) if world > 1 else {}
    return record


def _worker(rank: int, world: int, port: int, device_type: str, out: str) -> None:
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo", store=store, rank=rank, world_size=world
    )
    try:
        record = measure(device, rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def calibrate(device_type: str, world: int) -> dict:
    # Measures with `world` processes (one per device), saves and returns the record.
    if world == 1:
        record = measure(torch.device("cuda" if device_type == "cuda" else "cpu"), 0, 1)
    else:
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "record.json")
            mp.start_processes(
                _worker, args=(world, port, device_type, out), nprocs=world, start_method="spawn"
            )
            record = json.loads(Path(out).read_text())
    save(record)
    return record
