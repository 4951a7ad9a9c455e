# The comparison at the end of a -m sweep, rebuilt from what is on disk: one row per job directory
# (summary.json, config.yaml, .hydra/), written to the sweep dir as report.md (the table and how to read
# it), report.csv (raw numbers) and report.png (tokens/s against peak memory, one labelled point per job).
#   python -m launcher.report multirun/2026-11-25/03-29-26
import csv
import json
import math
import sys
from pathlib import Path

import yaml

from launcher.errors import short_reason
from launcher.report_chart import plot, status_text
from trainer.config import SCHEMAS
from trainer.summary import FAILED, RunSummary

# Shown first when they vary, in this order; any other group or key that varies follows.
LEAD_KEYS = ("strategy", "precision", "attention", "model")
NOT_SETTINGS = ("hydra", "sweep")  # keys of overrides that say how to run, not what runs
REPORT_FILES = ("report.md", "report.csv", "report.png")


def _read(path: Path):
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def _natural(path: Path) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts]


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs |= {p.parent for p in sweep_dir.rglob("summary.json")}
    dirs.discard(sweep_dir)
    return sorted(dirs, key=lambda d: _natural(d.relative_to(sweep_dir)))


def _override_settings(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        key = key.lstrip("+~")
        if sep and key.split(".")[0].split("@")[0] not in NOT_SETTINGS:
            out[key] = value
    return out


def _last_logged_step(job_dir: Path) -> int | None:
    try:
        lines = (job_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None
    steps = [json.loads(line).get("step") for line in lines if line.strip()]
    return steps[-1] if steps else None


def _world_size(config: dict) -> int | None:
    launcher = config.get("launcher") or {}
    try:
        return int(launcher.get("nproc_per_node")) * int(launcher.get("nnodes", 1))
    except (TypeError, ValueError):
        return None  # "auto": known only once the job ran


# summary.json keys a row takes as they are
PASS_THROUGH = (
    "tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90", "tokens_per_s_std", "tokens_per_s_per_device",
    "tflops_per_device", "mfu", "mfu_peak_source", "memory_kind", "final_loss", "val_loss",
    "memory_predicted_peak_gb", "memory_measured_peak_gb", "memory_peak_ratio", "slurm_job_id", "ray_run_id",
    "mfu_measured", "mfu_measured_peak_tflops", "tokens_per_s_predicted", "step_time_s_predicted",
)  # fmt: skip
# Predicted (trainer/planner.py, every run) and, with metrics.memory_breakdown=true, measured (PyTorch's
# MemTracker, one step) peak memory per rank.
MEMORY_COLUMNS = [("predicted peak GB/rank", 1), ("MemTracker peak GB/rank", 1), ("predicted/measured", 1)]


def memory_columns(rows: list[dict]) -> int:
    # How many of MEMORY_COLUMNS the report shows: none, the prediction, or all three.
    if any(r.get("memory_measured_peak_gb") is not None for r in rows):
        return 3
    return 1 if any(r.get("memory_predicted_peak_gb") is not None for r in rows) else 0


def _memory_cells(r: dict, n: int) -> list[str]:
    values = (r.get("memory_predicted_peak_gb"), r.get("memory_measured_peak_gb"), r.get("memory_peak_ratio"))
    return ["n/a" if v is None else f"{v:.3f}" for v in values[:n]]


def nonfinite_note(s: RunSummary) -> str:
    # An ok run that skipped steps for a non-finite loss (trainer.on_nonfinite=skip) says so in its row.
    return (
        f"non-finite loss at {s.nonfinite_skipped_steps} step(s), skipped"
        if s.nonfinite_skipped_steps
        else ""
    )


def load_job(job_dir: Path) -> dict:
    s = RunSummary.read(job_dir / "summary.json") or RunSummary(
        status=FAILED, error="no summary.json: still running, or killed before writing it"
    )
    config = _read(job_dir / "config.yaml") or _read(job_dir / ".hydra" / "config.yaml") or {}
    overrides = _read(job_dir / ".hydra" / "overrides.yaml") or []
    hydra = (_read(job_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    choices = dict(s.choices or {})
    runtime_choices = (hydra.get("runtime") or {}).get("choices") or {}
    choices = choices or {g: str(runtime_choices[g]) for g in SCHEMAS if g in runtime_choices}
    trainer, metrics = config.get("trainer") or {}, config.get("metrics") or {}
    ok, reused_from = s.ok, s.reused_from
    if s.memory_kind == "cuda":
        mem = (
            s.mem_reserved_peak_gb_max
            if s.mem_reserved_peak_gb_max is not None
            else s.mem_allocated_peak_gb_max
        )
    else:
        mem = s.peak_rss_gb_max
    gbs, seq_len = trainer.get("global_batch_size"), trainer.get("seq_len")
    row = {k: getattr(s, k) for k in PASS_THROUGH}
    settings = {**choices, **_override_settings(overrides)}
    if s.emulated and "precision" in settings:  # fp8 off CUDA: fp8's numerics, not its speed
        settings["precision"] = f"{settings['precision']} (emulated)"
    return row | {
        "settings": settings,
        "world_size": s.world_size or _world_size(config),
        "tp": ((s.strategy_applied or {}).get("mesh") or {}).get("tp", 1),  # the tensor-parallel degree
        "status": ("reused" if reused_from else "ok") if ok else "failed",
        "reason": short_reason(s.error or "", _last_logged_step(job_dir)) if not ok else nonfinite_note(s),
        "peak_mem_gb": mem,
        "tokens_per_step": s.tokens_per_step or (gbs * seq_len if gbs and seq_len else None),
        "global_batch_size": gbs,
        "seq_len": seq_len,
        "steps": s.steps or trainer.get("max_steps"),
        "warmup_steps": s.warmup_steps if s.warmup_steps is not None else metrics.get("warmup_steps"),
        "reused_from": reused_from or "",
        "run_dir": str(reused_from or s.run_dir or job_dir),
    }


def varied_keys(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    varied = [k for k in keys if len({r["settings"].get(k) for r in rows}) > 1]
    if not varied:  # one job, or all alike: still say what ran
        varied = [k for k in LEAD_KEYS if k in keys]
    return sorted(
        varied, key=lambda k: (LEAD_KEYS.index(k) if k in LEAD_KEYS else len(LEAD_KEYS), keys.index(k))
    )


def sort_rows(rows: list[dict]) -> list[dict]:
    # Best on top: the most tokens/s; a tie goes to less memory; failures last, in job order.
    def key(r):
        tps, mem = r["tokens_per_s_median"], r["peak_mem_gb"]
        return (
            r["status"] == "failed",
            -(tps if tps is not None else -math.inf),
            mem if mem is not None else math.inf,
        )

    rows = sorted(rows, key=key)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


# column -> (pick the best, format)
BEST = {
    "tokens_per_s_median": (max, "{:,.0f}"),
    "tokens_per_s_per_device": (max, "{:,.0f}"),
    "tflops_per_device": (max, "{:.3g}"),
    "mfu": (max, "{:.1%}"),
    "mfu_measured": (max, "{:.1%}"),
    "peak_mem_gb": (min, "{:.3f}"),
    "final_loss": (min, "{:.4f}"),
    "val_loss": (min, "{:.4f}"),
}


def best_values(rows: list[dict]) -> dict:
    done = [r for r in rows if r["status"] != "failed"]
    out = {}
    for col, (pick, _) in BEST.items():
        values = [r[col] for r in done if r[col] is not None]
        out[col] = pick(values) if values else None
    return out


def _cell(row: dict, col: str, best: dict) -> str:
    value = row[col]
    if value is None:
        return "n/a"
    text = BEST[col][1].format(value)
    # Ties as printed are ties: two losses that both read 5.5543 are both the best.
    return f"**{text}**" if text == BEST[col][1].format(best[col]) else text


def memory_label(rows: list[dict]) -> str:
    kinds = {r["memory_kind"] for r in rows if r["memory_kind"]}
    if kinds == {"cuda"}:
        return "peak CUDA memory reserved, GB (max over ranks)"
    if kinds == {"cpu_peak_rss"}:
        return "peak RSS, GB (whole process, max over ranks)"
    return "peak memory, GB (max over ranks)"


def work_notes(rows: list[dict]) -> tuple[str, str, bool]:
    # -> (the equal-work line, the warm-up line, whether tokens per optimizer step differ across jobs)
    per_step = sorted({r["tokens_per_step"] for r in rows if r["tokens_per_step"]})
    steps = sorted({r["steps"] for r in rows if r["steps"]})
    if len(per_step) == 1:
        shape = {(r["global_batch_size"], r["seq_len"]) for r in rows if r["global_batch_size"]}
        how = " (global batch {} x sequence length {})".format(*shape.pop()) if len(shape) == 1 else ""
        each = f", for {steps[0]} steps" if len(steps) == 1 else ""
        work = f"**Equal work:** every job trains on the same {per_step[0]:,} tokens per optimizer step{how}{each}."
    else:
        listed = ", ".join(f"{n:,}" for n in per_step) or "unknown"
        work = (
            f"**Unequal work:** the jobs train on different numbers of tokens per optimizer step ({listed}), "
            "so their tokens/s are not a like-for-like comparison: see the tokens/step column."
        )
    warmup = (
        "/".join(sorted({str(r["warmup_steps"]) for r in rows if r["warmup_steps"] is not None})) or "the"
    )
    warm = (
        f"**Warm-up excluded:** the first {warmup} steps of every job (metrics.warmup_steps) are timed apart and "
        "never enter the throughput figures; tokens/s is the median over the measured steps, p10-p90 across them."
    )
    return work, warm, len(per_step) > 1


def _name(r: dict, cols: list[str]) -> str:
    return f"#{r['rank']} " + ", ".join(f"{k}={r['settings'].get(k, '-')}" for k in cols)


def _headline(rows: list[dict], cols: list[str]) -> list[str]:
    done = [r for r in rows if r["status"] != "failed" and r["tokens_per_s_median"]]
    if not done:
        return ["No job finished: nothing to compare."]
    top, slow = done[0], done[-1]
    line = f"Fastest: {_name(top, cols)} at {top['tokens_per_s_median']:,.0f} tokens/s"
    if len(done) == 1:
        return [line + "."]
    ratio = top["tokens_per_s_median"] / slow["tokens_per_s_median"]
    lines = [f"{line}, {ratio:.2f}x the slowest ({_name(slow, cols)})."]
    if top["tokens_per_s_p10"] is not None:  # step-to-step noise: a close second may not really be slower
        close = [f"#{r['rank']}" for r in done[1:] if (r["tokens_per_s_p90"] or 0) >= top["tokens_per_s_p10"]]
        if len(close) == len(done) - 1 > 1:
            lines.append("Every job's p10-p90 range overlaps #1's: the ranking is within step-to-step noise.")
        elif close:
            lines.append(f"Within #1's step-to-step spread (p10-p90 ranges overlap): {', '.join(close)}.")
    known = [r for r in done if r["peak_mem_gb"] is not None]
    if known:
        lean = min(known, key=lambda r: r["peak_mem_gb"])
        lines.append(f"Least memory: {_name(lean, cols)} at {lean['peak_mem_gb']:.3f} GB.")
    return lines


def _table(rows: list[dict], cols: list[str], unequal: bool) -> list[str]:
    best = best_values(rows)
    mesh = any(r["tp"] > 1 for r in rows)  # a layout with tensor parallelism: say how the world splits
    head = [("#", 1), *((c, 0) for c in cols), ("world", 1), *[("dp x tp", 1)] * mesh, ("status", 0)]
    head += [("tokens/s median (p10-p90)", 1)]
    predicted = any(r["tokens_per_s_predicted"] for r in rows)  # the time model, where calibrated
    head += [("predicted tokens/s", 1)] * predicted
    head += [
        ("tokens/s/device", 1),
        ("TFLOP/s/device", 1),
        ("MFU", 1),
        ("MFU vs measured peak", 1),
        (memory_label(rows), 1),
        *MEMORY_COLUMNS[: memory_columns(rows)],
        ("final loss", 1),
        ("val loss", 1),
    ]
    slurm = any(r["slurm_job_id"] for r in rows)  # run by SLURM (hydra/launcher=submitit_slurm)
    ray = any(r["ray_run_id"] for r in rows)  # run by Ray Train (hydra/launcher=ray)
    head += (
        [("tokens/step", 1)] * unequal
        + [("SLURM job", 0)] * slurm
        + [("Ray run", 0)] * ray
        + [("run dir", 0)]
    )
    lines = [
        "| " + " | ".join(h for h, _ in head) + " |",
        "|" + "|".join("---:" if r else "---" for _, r in head) + "|",
    ]
    for r in rows:
        tps = _cell(r, "tokens_per_s_median", best)
        if r["tokens_per_s_p10"] is not None:
            tps += f" ({r['tokens_per_s_p10']:,.0f}-{r['tokens_per_s_p90']:,.0f})"
        cells = [str(r["rank"]), *(str(r["settings"].get(k, "-")) for k in cols), str(r["world_size"] or "?")]
        cells += [f"{r['world_size'] // r['tp']} x {r['tp']}" if r["world_size"] else "?"] * mesh
        # BEST's columns in order, with the memory columns before the two losses
        cells += [status_text(r), tps]
        cells += [f"{r['tokens_per_s_predicted']:,.0f}" if r["tokens_per_s_predicted"] else "-"] * predicted
        cells += [_cell(r, c, best) for c in list(BEST)[1:-2]]
        cells += _memory_cells(r, memory_columns(rows)) + [
            _cell(r, "final_loss", best),
            _cell(r, "val_loss", best),
        ]
        cells += [f"{r['tokens_per_step']:,}" if r["tokens_per_step"] else "?"] * unequal
        cells += [str(r["slurm_job_id"] or "-")] * slurm
        cells += [str(r["ray_run_id"] or "-")] * ray
        cells.append(f"`{r['run_dir']}`")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def render_markdown(rows: list[dict], cols: list[str], title: str) -> str:
    work, warm, unequal = work_notes(rows)
    failed = sum(r["status"] == "failed" for r in rows)
    reused = sum(r["status"] == "reused" for r in rows)
    count = f"{len(rows)} jobs: {len(rows) - failed} ok" + (
        f" ({reused} reused from earlier runs)" if reused else ""
    )
    sources = sorted({r["mfu_peak_source"] for r in rows if r["mfu"] is not None and r["mfu_peak_source"]})
    mfu = f"against the dense peak ({', '.join(sources)})" if sources else (
        "n/a: no dense peak is known for this device; set metrics.peak_tflops to get it"
    )  # fmt: skip
    notes = [
        f"- {warm}",
        "- **TFLOP/s** = FLOPs per token (6 N_non-embedding + 12 L H d_head T, PaLM appendix B) x tokens/s per "
        f"device; **MFU** {mfu}; **MFU vs measured peak** against the dense matmul rate this machine measured "
        "(python -m commands.calibrate, or a probe at the run's start).",
        f"- **Memory:** {memory_label(rows)}.",
    ]
    if memory_columns(rows):
        notes.append(
            "- **Predicted peak**: the memory planner's peak per rank for the job's config (`python -m "
            "commands.plan`)"
            + (
                "; **MemTracker peak**: one training step measured by PyTorch's MemTracker on rank 0 "
                "(metrics.memory_breakdown=true), tensors only, without the allocator's cache or other process memory."
                if memory_columns(rows) == 3  # only where the table has the column
                else "."
            )
        )
    if reused:
        notes.append(
            "- **Reused** rows (sweep.resume=true) come from an earlier run of the same resolved config; "
            "their run dir is that run's."
        )
    return "\n".join(
        [
            f"# Sweep report: {title}",
            "",
            f"{count}, {failed} failed. Sorted by median tokens/s, best on top; **bold** = best in its column.",
            work,
            "",
            *_headline(rows, cols),
            "",
            *_table(rows, cols, unequal),
            "",
            "## How to read it",
            "",
            *notes,
            "",
            "![tokens/s against peak memory](report.png)",
            "",
        ]
    )


CSV_COLUMNS = (
    "world_size", "tp", "status", "reason", "tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90",
    "tokens_per_s_std", "tokens_per_s_per_device", "tflops_per_device", "mfu", "mfu_measured", "mfu_measured_peak_tflops",
    "tokens_per_s_predicted", "step_time_s_predicted", "peak_mem_gb", "memory_kind",
    "final_loss", "val_loss", "memory_predicted_peak_gb", "memory_measured_peak_gb", "memory_peak_ratio", "tokens_per_step", "steps", "warmup_steps", "reused_from", "slurm_job_id", "ray_run_id", "run_dir",
)  # fmt: skip


def write_csv(rows: list[dict], cols: list[str], path: Path) -> None:
    keys = list(dict.fromkeys([*cols, *(k for k in LEAD_KEYS if any(k in r["settings"] for r in rows))]))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", *keys, *CSV_COLUMNS])
        for r in rows:
            values = [r["settings"].get(k, "") for k in keys] + [r[c] for c in CSV_COLUMNS]
            w.writerow([r["rank"], *("" if v is None else v for v in values)])


def build_report(sweep_dir: Path) -> list[dict]:
    # Writes report.md/.csv/.png into sweep_dir; returns the rows, best first.
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"{sweep_dir} is not a directory: give a sweep's directory (multirun/<date>/<time>)"
        )
    rows = sort_rows([load_job(d) for d in find_job_dirs(sweep_dir)])
    if not rows:
        raise FileNotFoundError(f"no job directories (summary.json or .hydra/) under {sweep_dir}")
    cols = varied_keys(rows)
    title = str(sweep_dir)
    (sweep_dir / "report.md").write_text(render_markdown(rows, cols, title))
    write_csv(rows, cols, sweep_dir / "report.csv")
    plot(rows, cols, sweep_dir / "report.png", title, memory_label(rows), work_notes(rows)[2])
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m launcher.report <sweep dir>   (writes report.md, report.csv, report.png there)"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1:
        print(
            f"shardlab: error: give one sweep directory, got {len(argv)} arguments ({usage})", file=sys.stderr
        )
        return 2
    try:
        rows = build_report(Path(argv[0]))
    except FileNotFoundError as e:
        print(f"shardlab: error: {e}", file=sys.stderr)
        return 2
    print((Path(argv[0]) / "report.md").read_text())
    failed = sum(r["status"] == "failed" for r in rows)
    print(
        f"shardlab: report of {len(rows)} jobs ({failed} failed) in {', '.join(str(Path(argv[0]) / f) for f in REPORT_FILES)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
