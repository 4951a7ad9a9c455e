"""What a person watching the terminal sees: a progress bar while training, a table at the end."""

from __future__ import annotations

from tqdm import tqdm

from trainer.summary import RunSummary

_NA_MFU = "n/a (no datasheet peak for this device; set metrics.peak_tflops)"


def _num(x, fmt: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, fmt)


class ProgressBar:
    def __init__(self, total_steps: int, enabled: bool, initial: int = 0):
        # initial: a resumed run's bar starts at the step it resumed from
        self._bar = tqdm(
            total=total_steps, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )
        self._val: float | None = None
        self.enabled = enabled

    def write(self, line: str) -> None:
        # A line above the bar, where it would otherwise be drawn over (or printed anyway, with no bar).
        if self.enabled:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def update(self, step: int, row: dict | None = None) -> None:
        # Follow the step number rather than counting calls, so a resumed run starts where it was.
        self._bar.update(max(0, step - self._bar.n))
        if row is None:
            return
        if row.get("val_loss") is not None:  # the latest validation, shown from then on
            self._val = row["val_loss"]
        postfix = {"loss": _num(row.get("loss"), ".4f"), "tok/s": _num(row.get("tokens_per_s"))}
        if self._val is not None:
            postfix["val"] = _num(self._val, ".4f")
        if row.get("mem_reserved_peak_gb") is not None:
            postfix["mem"] = f"{row['mem_reserved_peak_gb']:.1f}GB"
        elif row.get("peak_rss_gb") is not None:
            postfix["rss_peak"] = f"{row['peak_rss_gb']:.1f}GB"
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _range(s: RunSummary, key: str, fmt: str, unit: str = "") -> str | None:
    hi, lo = getattr(s, f"{key}_max"), getattr(s, f"{key}_min")
    if hi is None:
        return None
    if lo is None or (s.world_size or 1) == 1:
        return f"{hi:{fmt}}{unit}"
    return f"{lo:{fmt}}{unit} - {hi:{fmt}}{unit} across ranks"


def _memory_lines(s: RunSummary) -> list[tuple[str, str]]:
    if s.memory_kind == "cuda":
        lines = [
            ("peak mem allocated (CUDA)", _range(s, "mem_allocated_peak_gb", ".2f", " GB")),
            ("peak mem reserved (CUDA)", _range(s, "mem_reserved_peak_gb", ".2f", " GB")),
            ("peak reserved % of capacity", _range(s, "mem_peak_pct", ".1f", "%")),
        ]
    else:
        lines = [("peak RSS (CPU, whole process)", _range(s, "peak_rss_gb", ".2f", " GB"))]
    return [(k, v) for k, v in lines if v is not None]


def _throughput_lines(s: RunSummary) -> list[tuple[str, str]]:
    med = s.tokens_per_s_median
    if med is None:
        return [("tokens/s (global)", f"n/a ({s.throughput_note or 'no steps after warm-up'})")]
    spread = f"p10 {_num(s.tokens_per_s_p10)} / p90 {_num(s.tokens_per_s_p90)}"
    if s.tokens_per_s_std is not None:
        spread += f", std {_num(s.tokens_per_s_std)}"
    tflops = s.tflops_per_device or 0.0  # CPU runs reach well under 1 TFLOP/s
    if s.mfu is None:
        mfu_text = _NA_MFU
    else:
        mfu_text = f"{100 * s.mfu:.1f}% of {s.mfu_peak_tflops:g} TFLOP/s ({s.mfu_peak_source})"
    lines = [
        ("tokens/s (global, median)", f"{_num(med)}  ({spread})"),
        ("tokens/s per device", _num(s.tokens_per_s_per_device)),
        ("TFLOP/s per device", _num(s.tflops_per_device, ".2f" if tflops >= 1 else ".3g")),
        ("MFU", mfu_text),
    ]
    if s.mfu_low_precision is not None:  # fp8 / int8: against their own tensor cores' peak too
        low = f"{100 * s.mfu_low_precision:.1f}% of {s.mfu_low_precision_peak_tflops:g} TFLOP/s"
        lines.append(("MFU vs the fp8/int8 peak", low))
    if s.mfu_measured is not None:  # against this machine's measured matmul peak, on every device
        measured = f"{100 * s.mfu_measured:.1f}% of {s.mfu_measured_peak_tflops:.3g} TFLOP/s ({s.mfu_measured_source})"
        lines.append(("MFU vs measured peak", measured))
    if s.step_time_s_predicted is not None:
        lines.append(
            (
                "step time (predicted)",
                f"{s.step_time_s_predicted:.4f} s, {_num(s.tokens_per_s_predicted)} tokens/s",
            )
        )
    return lines


def format_summary(s: RunSummary) -> str:
    world = s.world_size or 1
    device = (s.device_name or "?") + (f" x {world}" if world > 1 else "")
    lines: list[tuple[str, str]] = [("device", device)]
    if s.precision:
        lines.append(("precision", s.precision))
    steps = f"{s.steps or 0}"
    if s.warmup_steps:
        steps += f" ({s.warmup_steps} warm-up steps excluded, {s.warmup_time_s or 0.0:.2f} s)"
    lines.append(("steps", steps))
    lines += _throughput_lines(s)
    if s.step_time_s_median is not None:
        per_rank = _range(s, "step_time_s_median", ".4f", " s")
        lines.append(("step time (median)", per_rank or f"{s.step_time_s_median:.4f} s"))
    if s.pipeline:
        p, bubble = s.pipeline, s.pipeline["bubble_fraction"]
        measured = f" ({bubble['measured']:.3f} measured)" if "measured" in bubble else ""
        lines.append(("pipeline", f"{p['schedule']}, {len(p['stages'])} stage ranks x {len(p['stages'][0])} stage(s), "
                      f"{p['microbatches']} micro-batches; bubble {bubble['arithmetic']:.3f} by the schedule{measured}"))  # fmt: skip
    lines += _memory_lines(s)
    if s.first_loss is not None:
        lines.append(("first loss", f"{s.first_loss:.4f}"))
    if s.final_loss is not None:
        lines.append(("final loss", f"{s.final_loss:.4f}"))
    if s.nonfinite_skipped_steps:
        lines.append(
            (
                "non-finite loss",
                f"at {s.nonfinite_skipped_steps} step(s), skipped (trainer.on_nonfinite=skip)",
            )
        )
    if s.val_loss is not None:
        best = f"; best {s.best_val_loss:.4f} at step {s.best_val_step}" if s.evals > 1 else ""
        lines.append(
            ("validation loss", f"{s.val_loss:.4f} (ppl {s.val_ppl:.2f}) at step {s.val_step}{best}")
        )
        lines.append(
            ("evaluation time", f"{s.eval_time_s:.2f} s over {s.evals} evaluation(s), not in tokens/s")
        )
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in lines)
