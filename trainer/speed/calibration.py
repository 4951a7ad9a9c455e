# What this machine can actually do, measured once and cached: the time model (trainer/speed/model.py) reads its
# rates from here, and MFU is also reported against the measured matmul peak, on every device (the datasheet's dense
# peak where trainer/peaks.py knows the device, as before, beside it).
# A calibration is of one device kind at one world size (N processes, one per device, all measuring at once, so
# that N ranks sharing a machine's cores or memory bandwidth are measured as they train), keyed by the device's name,
# N, the threads per process and torch's version, in <cache>/calibration/ (SHARDLAB_CACHE_DIR, else
# $XDG_CACHE_HOME/shardlab, else ~/.cache/shardlab):
#   matmul_tflops  {dtype: {n: TFLOP/s}} per rank, n x n @ n x n at n = 256, 1024, 2048 (a model's Linears span
#                  these: the rate of the size nearest a model's matmuls is the one used)
#   attention_tflops  fused causal attention, forward and backward, per dtype
#   copy_gbps      memory bandwidth per rank, a 64 MiB copy (bytes read + written)
#   op_latency_us  the time an operator costs beyond its arithmetic (dispatch, autograd, Python modules), per
#                  operator: a tiny Llama's forward and backward, timed, over its operator count
#   collectives    {group size: {kind: [latency s, s per byte]}}: all_reduce, all_gather, reduce_scatter (the
#                  tensor versions), and send/recv between pairs, at 4 KiB .. 16 MiB, fitted (alpha-beta) per
#                  kind, with every group of that size of the world at once (a 2 x 2 mesh's two pairs together)
#   layout_overhead_s  what each strategy's own machinery costs per block and micro-batch (calibrate.py)
# Every rate is the slowest rank's: all ranks run the same repetitions at once (timed()).
# The measurements are here; trainer/speed/calibrate.py runs them in N processes (`python -m commands.calibrate`,
# about a minute). A training run that finds no matmul peak for its device measures that alone first (well under a
# second) and adds it to the cache.
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.dist import cpu_threads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MATMUL_SIZES = (256, 1024, 2048)
COLLECTIVE_BYTES = (4 * 2**10, 64 * 2**10, 2**20, 16 * 2**20)
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
MIN_TIME_S = 0.15  # each measurement repeats, every rank alike, for at least this long (and 3 times)


def cache_dir() -> Path:
    if env := os.environ.get("SHARDLAB_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardlab"


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} CPUs)"


FORMAT = 1  # the record's layout: a calibration of another format is measured again


def key(device_type: str, world: int) -> dict:
    threads_per = cpu_threads(world) if device_type == "cpu" else None
    return {
        "device": device_name(device_type),
        "count": world,
        "threads": threads_per,
        "torch": torch.__version__,
        "format": FORMAT,
    }


def path_of(k: dict) -> Path:
    name = f"{k['device']}-x{k['count']}-t{k['threads']}-torch{k['torch']}-f{k.get('format')}"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name)
    return cache_dir() / "calibration" / f"{slug.strip('-')}.json"


def load(device_type: str, world: int) -> dict | None:
    try:
        return json.loads(path_of(key(device_type, world)).read_text())
    except (OSError, ValueError):
        return None


def save(record: dict) -> Path:
    path = path_of(record["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- measurements (every rank at once)
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, target_s: float = MIN_TIME_S, min_reps: int = 3) -> float:
    # Seconds per call of fn, every rank calling it the same number of times at once (the count the slowest rank
    # needs for target_s), after one untimed call; the slowest rank's time: N ranks sharing a machine's cores or
    # memory measure what each gets while all work.
    fn()
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    reps = torch.tensor([max(min_reps, min(1000, int(target_s / max(time.perf_counter() - t, 1e-6))))])
    if dist.is_initialized():
        dist.all_reduce(reps, op=dist.ReduceOp.MAX)
        dist.barrier()
    began = time.perf_counter()
    for _ in range(int(reps.item())):
        fn()
    _sync(device)
    elapsed = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item()) / int(reps.item())


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def matmul_tflops(device: torch.device, dtype: str, n: int) -> float:
    # Constant inputs, not random ones: a probe inside a run must not move the global generator. tf32: fp32
    # matmuls on tensor cores (a CPU has none: its fp32 rate).
    torch_dtype = DTYPES["fp32" if dtype == "tf32" else dtype]
    a = torch.full((n, n), 0.5, dtype=torch_dtype, device=device)
    b = torch.full((n, n), 0.25, dtype=torch_dtype, device=device)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32" or before
    try:
        seconds = timed(lambda: torch.mm(a, b), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return 2 * n**3 / seconds / 1e12


def attention_tflops(device: torch.device, dtype: str, shape=(2, 4, 256, 64)) -> float:
    # Fused causal attention (scaled_dot_product_attention), forward and backward, counted as the model's FLOPs count
    # it (the full query x key square: 4 + 8 FLOPs per element of it per head dimension).
    b, h, t, d = shape
    q, k, v = (
        torch.full(shape, 0.1, dtype=DTYPES[dtype], device=device, requires_grad=True) for _ in range(3)
    )

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return 12 * b * h * t * t * d / timed(step, device) / 1e12


def copy_gbps(device: torch.device, nbytes: int = 64 * 2**20) -> float:
    src = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device) / 1e9


MATMULS = {"mm", "addmm", "bmm", "baddbmm"}  # FLOPs 2 m k n (per batch), at the matmul rate of their size
ATTENTION = {  # fused attention kernels: FLOPs per (batch x head x query x key x head_dim), at the attention rate
    "_scaled_dot_product_flash_attention_for_cpu": 4,
    "_scaled_dot_product_flash_attention_for_cpu_backward": 8,
    "_scaled_dot_product_flash_attention": 4,
    "_scaled_dot_product_flash_attention_backward": 8,
    "_scaled_dot_product_efficient_attention": 4,
    "_scaled_dot_product_efficient_attention_backward": 8,
    "_scaled_dot_product_cudnn_attention": 4,
    "_scaled_dot_product_cudnn_attention_backward": 8,
}


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _flat(xs) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(xs) if isinstance(t, torch.Tensor)]


class OpCosts:
    # What fn dispatches, operator by operator (forward and backward alike): how many operators; each matmul's
    # FLOPs and size (n_eff = (m k n)^(1/3), the size its rate is read at); fused attention's FLOPs; and the bytes
    # every other operator reads and writes (views move nothing). On meta tensors: shapes without arithmetic.
    def __init__(self) -> None:
        self.ops = 0
        self.matmuls: list[tuple[float, float]] = []  # (FLOPs, n_eff)
        self.matmul_elements: list[tuple[int, int]] = []  # (its first operand's elements, its second's)
        self.attention_flops = 0.0
        self.bytes = 0.0

    def copy(self) -> "OpCosts":
        out = OpCosts()
        out.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()})
        return out

    def record(self, func, args, kwargs, out) -> None:
        self.ops += 1
        name = func._overloadpacket.__name__
        if func.is_view:
            return
        if name in MATMULS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            self.matmuls.append((2.0 * batch * m * k * n, float(m * k * n) ** (1 / 3)))
            self.matmul_elements.append((a.numel(), b.numel()))
            return
        if name in ATTENTION:
            q, key = args[0], args[1]  # (batch, heads, seq, head_dim); backward: grad_out first, q second
            if name.endswith("_backward"):
                q, key = args[1], args[2]
            b, h, t, d = q.shape
            self.attention_flops += ATTENTION[name] * b * h * t * key.shape[-2] * d  # fwd 2 matmuls, bwd 4
            return
        self.bytes += sum(map(_nbytes, _flat((args, kwargs)))) + sum(map(_nbytes, _flat(out)))


def op_costs(fn, costs: OpCosts | None = None) -> OpCosts:
    # fn's operators recorded into costs (a new OpCosts by default), which fn may copy part-way through.
    from torch.utils._python_dispatch import TorchDispatchMode

    costs = OpCosts() if costs is None else costs

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            costs.record(func, args, kwargs or {}, out)
            return out

    with Record():
        fn()
    return costs


def tiny_args():
    # The tiny Llama the operator cost and the layouts' overheads are measured on (2 layers, width 64, 16 tokens):
    # its arithmetic is negligible, so its time is what its operators cost as operators.
    from models.llama import ModelArgs

    return ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=64)


def tiny_step(device: torch.device):
    from models import build_model

    with torch.device(device):
        model = build_model(tiny_args())
    tokens = torch.zeros(1, 16, dtype=torch.long, device=device)

    def step():
        model(tokens).float().mean().backward()

    return step


def op_latency_us(device: torch.device) -> tuple[float, int]:
    # -> (the time per operator of the tiny Llama's forward and backward, its operator count)
    step = tiny_step(device)
    ops = op_costs(step).ops
    return timed(step, device) / ops * 1e6, ops


def _groups(world: int, size: int) -> list[list[int]]:
    return [list(range(start, start + size)) for start in range(0, world, size)]


def collective_points(
    device: torch.device, size: int, rank: int, world: int
) -> dict[str, list[tuple[int, float]]]:
    # Every group of `size` consecutive ranks measures at once; -> {kind: [(bytes, seconds)]} of this rank's group.
    groups = [dist.new_group(g) for g in _groups(world, size)]  # every rank makes every group, in order
    group = groups[rank // size]
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in KINDS}
    peer = rank - 1 if (rank % size) % 2 else rank + 1  # pairs within the group: 0-1, 2-3, ...
    for nbytes in COLLECTIVE_BYTES:
        n = nbytes // 4
        full = torch.zeros(n, dtype=torch.float32, device=device)
        part = torch.zeros(n // size, dtype=torch.float32, device=device)

        def send_recv(full=full):
            if peer >= world or peer // size != rank // size:  # an odd group's last rank has no pair
                return
            ops = [dist.P2POp(dist.isend, full, peer), dist.P2POp(dist.irecv, torch.empty_like(full), peer)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()

        fns = {  # all_gather_single / reduce_scatter_single: torch 2.13's names for FSDP2's tensor forms
            "all_reduce": lambda full=full: dist.all_reduce(full, group=group),
            "all_gather": lambda full=full, part=part: dist.all_gather_single(full, part, group=group),
            "reduce_scatter": lambda full=full, part=part: dist.reduce_scatter_single(
                part, full, group=group
            ),
            "send_recv": send_recv,
        }
        for kind, fn in fns.items():
            _barrier()
            out[kind].append((nbytes, _agreed_time(fn, device, 15 if nbytes <= 2**20 else 5)))
    return out


def _agreed_time(fn, device: torch.device, reps: int = 15) -> float:
    # A collective's time: the median of `reps` calls, each timed on every rank, the slowest rank's median.
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    seconds = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds.item())


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    # t = alpha + bytes x beta: beta from the two largest sizes (bandwidth-bound), alpha from the smallest
    # (latency-bound), each clamped at 0. A least-squares line would let the largest size's time set the latency.
    (b0, t0), *_, (b1, t1), (b2, t2) = sorted(points)
    beta = max(0.0, (t2 - t1) / (b2 - b1)) if b2 > b1 else 0.0
    return max(0.0, t0 - beta * b0), beta


def dtypes_for(device_type: str) -> tuple[str, ...]:
    return ("fp32", "tf32", "bf16", "fp16") if device_type == "cuda" else ("fp32", "bf16")


def run_matmul_peak(device: torch.device, dtype: str, world: int) -> tuple[float, str]:
    # Inside a run, every rank at once: the measured dense matmul peak per rank for `dtype` (the largest size's
    # rate), from the cache or, where it has none, a probe of one size now (added to the cache by rank 0). Rank 0
    # decides which, for all: a rank that looked later could find what rank 0 has just saved, and skip the probe
    # the others wait in.
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    found = load(device.type, world) if not distributed or dist.get_rank() == 0 else None
    if distributed:
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    rates = (found or {}).get("matmul_tflops", {}).get(dtype)
    if rates:
        return max(rates.values()), "calibration"
    n = MATMUL_SIZES[-1] if device.type == "cuda" else MATMUL_SIZES[1]
    rate = matmul_tflops(device, dtype, n)  # the same on every rank: timed() agrees on the slowest's time
    if not distributed or dist.get_rank() == 0:
        record = found or {"key": key(device.type, world), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        record.setdefault("matmul_tflops", {})[dtype] = {str(n): rate}
        save(record)
    return rate, "probe"
