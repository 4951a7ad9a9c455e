"""What a training run measured: step time, tokens/s, FLOP/s and MFU, peak memory.

One `Metrics` object owns the timers and counters; the loop calls `start()`, then `update(...)` after
every optimizer step and `log(step)` after that, and `summary()` once at the end. With more than one
rank, `log()` (on log steps) and `summary()` are collectives: every rank calls them at the same steps.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as dist

from strategies.base import instance_of
from trainer.environments import current
from trainer.evaluate import perplexity
from trainer.memory import memory_summary
from trainer.peaks import device_key, lookup_peak_tflops
from trainer.precision import peak_class
from trainer.summary import RunSummary

logger = logging.getLogger(__name__)

_GB = 1e9  # keys say `_gb`, so decimal gigabytes


def measure_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    # Bytes held by this rank: a DTensor (FSDP2 shard) counts its local shard only.
    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if instance_of(t, "torch.distributed.tensor", "DTensor") else t
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao's 8-bit states): its real storage
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    params = list(model.parameters())
    out = {
        "params_bytes": sum(nbytes(p) for p in params),
        "grads_bytes": sum(nbytes(p.grad) for p in params if p.grad is not None),
        "optim_state_bytes": sum(
            nbytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
        ),
    }
    out["total"] = sum(out.values())
    return out


def _peak_rss_bytes() -> int:
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
        reserved = torch.cuda.max_memory_reserved(device)
        return {
            "mem_allocated_peak_gb": torch.cuda.max_memory_allocated(device) / _GB,
            "mem_reserved_peak_gb": reserved / _GB,
            # Reserved, not allocated: the caching allocator's reservation is what hits the ceiling.
            "mem_peak_pct": 100.0 * reserved / capacity,
        }
    # ru_maxrss is the peak over the whole process lifetime and cannot be reset per interval.
    return {"peak_rss_gb": _peak_rss_bytes() / _GB, "rss_gb": psutil.Process().memory_info().rss / _GB}


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _as_float(x) -> float | None:
    return None if x is None else float(x)


@dataclass
class _Interval:
    steps: int = 0
    time_s: float = 0.0
    post_warmup_steps: int = 0
    post_warmup_time_s: float = 0.0
    post_warmup_tokens: int = 0


class Metrics:
    def __init__(
        self,
        *,
        device: torch.device,
        flops_per_token: float,
        precision: str,
        warmup_steps: int,
        log_every: int,
        peak_tflops: float | None = None,
        world_size: int = 1,
        rank: int = 0,
        tokens_per_step: int | None = None,
    ):
        peak_class(precision)  # an unknown precision fails here, naming the valid ones
        if warmup_steps < 0 or log_every < 1:
            raise ValueError(f"need warmup_steps >= 0 and log_every >= 1, got {warmup_steps}, {log_every}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be positive or None, got {peak_tflops}")
        self.device = torch.device(device)
        self.flops_per_token = float(flops_per_token)
        self.precision = precision
        self.warmup_steps = warmup_steps
        self.log_every = log_every
        self.world_size = world_size
        self.rank = rank
        is_cuda = self.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(self.device) if is_cuda else "cpu"
        self.peak_tflops, self.peak_source = self._resolve_peak(peak_tflops)
        # fp8 / int8 on a known device: their MFU against the fp8 / int8 peak too, named apart.
        is_known = self.device.type == "cuda" and peak_tflops is None
        self.low_peak_tflops = (
            lookup_peak_tflops(self.device_name, precision, low_precision=True) if is_known else None
        )

        self._last_time: float | None = None
        self._warmup_done = 0
        self._warmup_time_s = 0.0
        # One entry per post-warm-up step; the summary's medians and spread come from these.
        self._step_times: list[float] = []
        self._step_tokens: list[int] = []
        self._interval = _Interval()
        self._last: dict = {}
        self._first_loss: float | None = None
        self._run_memory: dict[str, float] = {}  # CUDA peaks survive the per-interval reset here
        self.tokens_per_step = tokens_per_step
        self._nonfinite = 0  # steps whose loss was NaN/inf (trainer.on_nonfinite=skip: skipped, counted)
        self._state_bytes: dict | None = None  # this rank's, at its first optimizer step
        self._plan = None  # the memory planner's MemoryPlan for this run (None: not a model it plans)
        self._memory: dict | None = None  # metrics.memory_breakdown: the measured step and the prediction
        self._run: RunSummary | None = None  # what the run was (describe_run), completed by summary()
        self._precision = None
        self._evals: list[tuple[int, float]] = []  # (step, validation loss)
        self._eval_time_s = 0.0
        self._eval_row: dict = {}  # the last evaluation, for the next logged row
        # MFU against this machine's measured matmul peak (trainer/speed/calibration.py), on every device; and the
        # time model's prediction of a step, where this machine's calibration covers the run
        self.measured_peak_tflops: float | None = None
        self.measured_peak_source: str | None = None
        self._predicted = None  # trainer/speed/model.py's StepTime

    def describe_run(self, run: RunSummary, precision, plan) -> None:
        # A training run: what it is (run: the loop's record of its layout, data and model), the precision as
        # applied, and the memory planner's MemoryPlan for it (None: a model the planner does not cover). The
        # summary is then that record with what was measured filled in.
        self._run, self._precision, self._plan = run, precision, plan

    def measured_peak(self, tflops: float, source: str) -> None:
        self.measured_peak_tflops, self.measured_peak_source = tflops, source

    def predicted(self, step_time) -> None:
        self._predicted = step_time

    def watch_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # State bytes per rank, measured once, right after the first optimizer step that really stepped (an
        # fp16 step skipped for inf gradients never calls it): parameters, gradients and optimizer state all
        # exist then, before the loop frees the gradients.
        def measure(opt, args, kwargs):
            self._state_bytes = measure_state_bytes(model, optimizer)
            handle.remove()

        handle = optimizer.register_step_post_hook(measure)

    def measure_memory(self, model, optimizer, run_step, step: int, fsdp: bool):
        # metrics.memory_breakdown: this step measured by PyTorch's MemTracker, next to the plan.
        # -> what run_step returned.
        from trainer.memory.measure import measure_breakdown  # imported only when asked for

        self._memory, result = measure_breakdown(
            model, optimizer, run_step, step, fsdp, self.device, self._plan
        )
        return result

    def _resolve_peak(self, user_peak: float | None) -> tuple[float | None, str | None]:
        if user_peak is not None:
            return float(user_peak), "user"
        if self.device.type != "cuda":
            return None, None
        key = device_key(self.device_name)
        peak = lookup_peak_tflops(self.device_name, self.precision)
        if peak is None:
            if self.rank == 0:
                logger.warning(
                    "MFU not reported: no dense peak for %r at %s; set metrics.peak_tflops",
                    self.device_name,
                    self.precision,
                )
            return None, None
        return peak, f"table:{key}"

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # Measuring starts here: building the model (FSDP's full-size temporaries) is not a step's peak.
            torch.cuda.reset_peak_memory_stats(self.device)
        self._last_time = time.perf_counter()

    def update(
        self, step: int, *, loss: float, grad_norm: float, lr: float, tokens: int | None = None, **extra
    ) -> None:
        # tokens: this step's, all ranks (default: the run's tokens per step).
        if self._last_time is None:
            raise RuntimeError("call Metrics.start() before the first update()")
        if self.device.type == "cuda":
            # Kernels run asynchronously: without this we would time the launches, not the work.
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self._last_time = now - self._last_time, now
        tokens = self.tokens_per_step if tokens is None else tokens

        iv = self._interval
        iv.steps += 1
        iv.time_s += dt
        if self._warmup_done < self.warmup_steps:
            # Warm-up steps (compilation, allocator growth, cold caches) are timed but kept apart.
            self._warmup_done += 1
            self._warmup_time_s += dt
        else:
            iv.post_warmup_steps += 1
            iv.post_warmup_time_s += dt
            iv.post_warmup_tokens += tokens
            self._step_times.append(dt)
            self._step_tokens.append(tokens)

        loss = _as_float(loss)
        self._nonfinite += not math.isfinite(loss)
        if self._first_loss is None:
            self._first_loss = loss
        self._last = {"loss": loss, "lr": _as_float(lr), "grad_norm": _as_float(grad_norm), "extra": extra}

    def _throughput(self, tokens_per_s: float | None) -> dict[str, float | None]:
        if tokens_per_s is None:
            return {
                "tokens_per_s": None,
                "tokens_per_s_per_device": None,
                "tflops_per_device": None,
                "mfu": None,
            }
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        out = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.world_size,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
        }
        if self.low_peak_tflops:  # fp8 / int8: beside the bf16-peak MFU, the one against their own peak
            out["mfu_low_precision"] = tflops / self.low_peak_tflops
        if self.measured_peak_tflops:
            out["mfu_measured"] = tflops / self.measured_peak_tflops
        return out

    def _reduce_max_min(self, values: dict[str, float | None]) -> dict[str, float]:
        # None marks "not measured", which is the same on every rank, so dropping those keys keeps
        # the all-reduce the same length everywhere. One MAX over [x, -x] gives both max and min.
        keys = [k for k, v in values.items() if v is not None]
        local = [values[k] for k in keys]
        if self._distributed and keys:
            dev = self.device if self.device.type == "cuda" else torch.device("cpu")
            t = torch.tensor(local + [-v for v in local], dtype=torch.float64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            hi, lo = t[: len(keys)].tolist(), (-t[len(keys) :]).tolist()
        else:
            hi, lo = local, local
        out = {}
        for k, h, low in zip(keys, hi, lo, strict=True):
            out[f"{k}_max"], out[f"{k}_min"] = h, low
        return out

    def _track_run_memory(self, mem: dict[str, float]) -> None:
        for k, v in mem.items():
            if k != "rss_gb":  # current RSS is not a peak
                self._run_memory[k] = max(v, self._run_memory.get(k, v))

    def record_eval(self, step: int, loss: float, seconds: float) -> None:
        # A validation after `step`: its time is kept out of the next step's, so out of training tokens/s.
        self._evals.append((step, loss))
        self._eval_time_s += seconds
        self._eval_row = {"val_loss": loss, "val_ppl": perplexity(loss)}
        if self._last_time is not None:
            self._last_time += seconds

    def log(self, step: int, *, final: bool = False) -> dict | None:
        # A row on log steps, at the end, and after every evaluation.
        iv = self._interval
        if not (final or step % self.log_every == 0 or self._eval_row) or iv.steps == 0:
            return None
        tokens_per_s = iv.post_warmup_tokens / iv.post_warmup_time_s if iv.post_warmup_steps else None
        mem = _memory(self.device)
        row = {
            "step": step,
            "loss": self._last["loss"],
            "lr": self._last["lr"],
            "grad_norm": self._last["grad_norm"],
            "step_time_s": iv.time_s / iv.steps,
            **self._throughput(tokens_per_s),
            **mem,
        }
        if self._distributed:
            row.update(self._reduce_max_min({"step_time_s": row["step_time_s"], **mem}))
        extra = self._last["extra"]
        if clash := extra.keys() & row.keys():
            raise ValueError(f"update() extras {sorted(clash)} clash with metric names; rename them")
        row.update(extra)
        row.update(self._eval_row)
        self._eval_row = {}

        self._track_run_memory(mem)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # each interval reports its own peak
        self._interval = _Interval()
        # Restart the clock after our own collective, so waiting here for a slower rank is not booked
        # as step time and the max/min across ranks shows the real imbalance.
        self._last_time = time.perf_counter()
        return row

    def peak_memory_by_rank(self) -> list[float]:
        # Every rank's peak over the run (CUDA reserved, or the process's peak RSS on the CPU), in rank order: a
        # pipeline's stages differ (a collective: every rank calls it).
        key = "mem_reserved_peak_gb" if self.device.type == "cuda" else "peak_rss_gb"
        mine = self._run_memory.get(key, _memory(self.device)[key])
        if not self._distributed:
            return [mine]
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        out = [torch.zeros((), dtype=torch.float64, device=dev) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor(mine, dtype=torch.float64, device=dev))
        return [float(t) for t in out]

    def summary(self) -> RunSummary:
        times, tokens = self._step_times, self._step_tokens
        rates = [n / t for n, t in zip(tokens, times, strict=True)]
        median_tps = statistics.median(rates) if rates else None
        mem = _memory(self.device)
        self._track_run_memory(mem)
        local = {"step_time_s_median": statistics.median(times) if times else None, **self._run_memory}
        reduced = self._reduce_max_min(local)
        through = self._throughput(median_tps)
        out = {
            "steps": self._warmup_done + len(times),
            "warmup_steps": self._warmup_done,
            "warmup_time_s": self._warmup_time_s,
            "tokens_per_s_median": median_tps,
            "tokens_per_s_p10": _quantile(rates, 0.1) if rates else None,
            "tokens_per_s_p90": _quantile(rates, 0.9) if rates else None,
            "tokens_per_s_std": statistics.stdev(rates) if len(rates) > 1 else None,
            # Total tokens / total time: what a wall clock sees, including slow outlier steps.
            "tokens_per_s_mean": sum(tokens) / sum(times) if times else None,
            "tokens_per_s_per_device": through["tokens_per_s_per_device"],
            "tflops_per_device": through["tflops_per_device"],
            "mfu": through["mfu"],
            "mfu_peak_tflops": self.peak_tflops,
            "mfu_peak_source": self.peak_source,
            "mfu_low_precision": through.get("mfu_low_precision"),
            "mfu_low_precision_peak_tflops": self.low_peak_tflops,
            "mfu_measured": through.get("mfu_measured"),
            "mfu_measured_peak_tflops": self.measured_peak_tflops,
            "mfu_measured_source": self.measured_peak_source,
            "step_time_s_median": local["step_time_s_median"],
            "memory_kind": "cuda" if self.device.type == "cuda" else "cpu_peak_rss",
            **reduced,
            "first_loss": self._first_loss,
            "final_loss": self._last.get("loss"),
            "device_name": self.device_name,
            "world_size": self.world_size,
            "precision": self.precision,
            "flops_per_token": self.flops_per_token,
        }
        if (
            self._predicted is not None
        ):  # the time model at this machine's calibration, beside what was measured
            p = self._predicted
            out |= {"step_time_s_predicted": p.total_s, "tokens_per_s_predicted": p.tokens_per_s}
            out["time_model"] = {k: v for k, v in p.terms().items() if v}
        if (job := current().job_id()) is not None:
            out[current().job_field] = job  # slurm_job_id, ray_run_id
        if self._evals:  # the last validation, and the best with its step
            (step, loss), (best_step, best) = self._evals[-1], min(self._evals, key=lambda e: (e[1], e[0]))
            out |= {"val_loss": loss, "val_ppl": perplexity(loss), "val_step": step, "best_val_loss": best}
            out |= {"best_val_step": best_step, "evals": len(self._evals), "eval_time_s": self._eval_time_s}
        if not rates:  # a run no longer than its warm-up: it ran, and says why it has no throughput
            out["throughput_note"] = (
                f"no step was measured: all {self._warmup_done} steps were warm-up (metrics.warmup_steps="
                f"{self.warmup_steps}); raise trainer.max_steps above it for throughput figures"
            )
        if self._run is None:
            return RunSummary(**out)
        return self._run.replace(**out, **self._run_facts())

    def _run_facts(self) -> dict:
        p = self._precision
        return {
            "state_bytes_per_rank": self._state_bytes,
            "precision_applied": p.describe(),
            "emulated": p.emulated,  # fp8 off CUDA: fp8's numerics, not its speed or memory
            "skipped_steps": p.skipped_steps,  # fp16-mixed: steps skipped for inf/nan gradients; else None
            "nonfinite_skipped_steps": self._nonfinite,  # trainer.on_nonfinite=skip
            "memory_breakdown": self._memory,  # this rank's (rank 0's) measured step and the prediction
            **memory_summary(self._plan, self._memory),
        }
