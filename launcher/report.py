# The comparison at the end of a -m sweep, rebuilt from what is on disk: one row per job directory
# (summary.json, config.yaml, .hydra/), written to the sweep dir as report.md (the table and how to read
# it), report.csv (raw numbers) and report.png (tokens/s against peak memory, one labelled point per job).
#   python -m launcher.report multirun/2026-11-25/03-29-26
import csv
import itertools
import json
import math
import re
import sys
from pathlib import Path

import yaml

from trainer.config import SCHEMAS

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


def short_reason(error: str, job_dir: Path) -> str:
    # One line a person can act on: OOM says when, anything else is the exception's own first line.
    text = " ".join(str(error).split()) or "unknown error"
    if re.search(r"out of memory|OutOfMemoryError", text, re.IGNORECASE):
        step = _last_logged_step(job_dir)
        return "out of memory" + (f" after step {step}" if step else " before the first logged step")
    if "SIGKILL" in text:
        text += " (often the host's out-of-memory killer)"
    return text if len(text) <= 160 else text[:157] + "..."


def _world_size(config: dict) -> int | None:
    launcher = config.get("launcher") or {}
    try:
        return int(launcher.get("nproc_per_node")) * int(launcher.get("nnodes", 1))
    except (TypeError, ValueError):
        return None  # "auto": known only once the job ran


# summary.json keys a row takes as they are
PASS_THROUGH = (
    "tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90", "tokens_per_s_std", "tokens_per_s_per_device",
    "tflops_per_device", "mfu", "mfu_peak_source", "memory_kind", "final_loss",
)  # fmt: skip


def load_job(job_dir: Path) -> dict:
    summary = _read(job_dir / "summary.json")
    config = _read(job_dir / "config.yaml") or _read(job_dir / ".hydra" / "config.yaml") or {}
    overrides = _read(job_dir / ".hydra" / "overrides.yaml") or []
    hydra = (_read(job_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    choices = dict((summary or {}).get("choices") or {})
    runtime_choices = (hydra.get("runtime") or {}).get("choices") or {}
    choices = choices or {g: str(runtime_choices[g]) for g in SCHEMAS if g in runtime_choices}
    trainer, metrics = config.get("trainer") or {}, config.get("metrics") or {}
    if summary is None:
        summary = {"status": "failed", "error": "no summary.json: still running, or killed before writing it"}
    s = summary
    ok = s.get("status") == "ok"
    reused_from = s.get("reused_from")
    if s.get("memory_kind") == "cuda":
        mem = s.get("mem_reserved_peak_gb_max", s.get("mem_allocated_peak_gb_max"))
    else:
        mem = s.get("peak_rss_gb_max")
    gbs, seq_len = trainer.get("global_batch_size"), trainer.get("seq_len")
    row = {k: s.get(k) for k in PASS_THROUGH}
    return row | {
        "settings": {**choices, **_override_settings(overrides)},
        "world_size": s.get("world_size") or _world_size(config),
        "status": ("reused" if reused_from else "ok") if ok else "failed",
        "reason": "" if ok else short_reason(s.get("error", ""), job_dir),
        "peak_mem_gb": mem,
        "tokens_per_step": s.get("tokens_per_step") or (gbs * seq_len if gbs and seq_len else None),
        "global_batch_size": gbs,
        "seq_len": seq_len,
        "steps": s.get("steps") or trainer.get("max_steps"),
        "warmup_steps": s.get("warmup_steps", metrics.get("warmup_steps")),
        "reused_from": reused_from or "",
        "run_dir": str(reused_from or s.get("run_dir") or job_dir),
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
    "peak_mem_gb": (min, "{:.3f}"),
    "final_loss": (min, "{:.4f}"),
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


def _status(r: dict) -> str:
    if r["status"] == "failed":
        return "failed: " + r["reason"]
    return "ok (reused)" if r["status"] == "reused" else "ok"


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
    head = [("#", 1), *((c, 0) for c in cols), ("world", 1), ("status", 0), ("tokens/s median (p10-p90)", 1)]
    head += [
        ("tokens/s/device", 1),
        ("TFLOP/s/device", 1),
        ("MFU", 1),
        (memory_label(rows), 1),
        ("final loss", 1),
    ]
    head += [("tokens/step", 1)] * unequal + [("run dir", 0)]
    lines = [
        "| " + " | ".join(h for h, _ in head) + " |",
        "|" + "|".join("---:" if r else "---" for _, r in head) + "|",
    ]
    for r in rows:
        tps = _cell(r, "tokens_per_s_median", best)
        if r["tokens_per_s_p10"] is not None:
            tps += f" ({r['tokens_per_s_p10']:,.0f}-{r['tokens_per_s_p90']:,.0f})"
        cells = [str(r["rank"]), *(str(r["settings"].get(k, "-")) for k in cols), str(r["world_size"] or "?")]
        cells += [_status(r), tps, *(_cell(r, c, best) for c in list(BEST)[1:])]
        cells += [f"{r['tokens_per_step']:,}" if r["tokens_per_step"] else "?"] * unequal
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
        f"device; **MFU** {mfu}.",
        f"- **Memory:** {memory_label(rows)}.",
    ]
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
    "world_size", "status", "reason", "tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90",
    "tokens_per_s_std", "tokens_per_s_per_device", "tflops_per_device", "mfu", "peak_mem_gb", "memory_kind",
    "final_loss", "tokens_per_step", "steps", "warmup_steps", "reused_from", "run_dir",
)  # fmt: skip


def write_csv(rows: list[dict], cols: list[str], path: Path) -> None:
    keys = list(dict.fromkeys([*cols, *(k for k in LEAD_KEYS if any(k in r["settings"] for r in rows))]))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", *keys, *CSV_COLUMNS])
        for r in rows:
            values = [r["settings"].get(k, "") for k in keys] + [r[c] for c in CSV_COLUMNS]
            w.writerow([r["rank"], *("" if v is None else v for v in values)])


MARKERS = "osD^vP*Xph<>"
FULL_LABELS = 12  # more jobs than this: full labels for the top 3 and the frontier, "#n" for the rest


def _frontier(rows: list[dict]) -> list[dict]:
    # The jobs no other job beats on both axes: more tokens/s than anything that needs less memory.
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r["peak_mem_gb"], -r["tokens_per_s_median"])):
        if r["tokens_per_s_median"] > best:
            front.append(r)
            best = r["tokens_per_s_median"]
    return front


def _overlap(a, b) -> tuple[float, float]:
    return min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)


def _push(a, b) -> tuple[int, float, int]:
    # -> (axis, distance, sign for a) that separates box a from box b along the axis they overlap least
    ox, oy = _overlap(a, b)
    axis, d = (1, oy) if oy <= ox else (0, ox)
    centre = lambda box: (box.x0 + box.x1, box.y0 + box.y1)[axis]  # noqa: E731
    return axis, d + 1, 1 if centre(a) >= centre(b) else -1


def _repel(ax, labels, renderer, rounds: int = 300) -> None:
    # Move labels off each other and off the markers, inside the axes; a leader line keeps each on its point.
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    per_px = 72 / ax.figure.dpi  # offsets are in points
    frame = ax.get_window_extent(renderer)
    for label in labels:  # a label that would leave the axes on the right goes left of its point
        if Text.get_window_extent(label, renderer).x1 > frame.x1:
            label.set_horizontalalignment("right")
            label.xyann = (-label.xyann[0], label.xyann[1])
    r = 7  # px: about a marker's radius
    markers = [
        Bbox.from_extents(x - r, y - r, x + r, y + r)
        for x, y in (ax.transData.transform(a.xy) for a in labels)
    ]
    for _ in range(rounds):
        boxes = [Text.get_window_extent(a, renderer) for a in labels]
        shift = [[0.0, 0.0] for _ in labels]
        for i, j in itertools.combinations(range(len(labels)), 2):
            if min(_overlap(boxes[i], boxes[j])) > 0:
                axis, d, sign = _push(boxes[i], boxes[j])
                shift[i][axis] += sign * d / 2
                shift[j][axis] -= sign * d / 2
        for i, m in itertools.product(range(len(labels)), markers):
            if min(_overlap(boxes[i], m)) > 0:
                axis, d, sign = _push(boxes[i], m)
                shift[i][axis] += sign * d
        if not any(dx or dy for dx, dy in shift):
            return
        for label, box, (dx, dy) in zip(labels, boxes, shift, strict=True):
            dx = min(max(dx, frame.x0 - box.x0), frame.x1 - box.x1)
            dy = min(max(dy, frame.y0 - box.y0), frame.y1 - box.y1)
            label.xyann = (label.xyann[0] + dx * per_px, label.xyann[1] + dy * per_px)


def _label(r: dict, cols: list[str], full: bool = True) -> str:
    if not full:
        return f"#{r['rank']}"
    # Group options say what they are (ddp/fp32/flash); other keys need their name (n_heads=3).
    values = [
        str(r["settings"].get(k, "-")) if k in SCHEMAS else f"{k.split('.')[-1]}={r['settings'].get(k, '-')}"
        for k in cols
    ]
    return f"#{r['rank']} " + "/".join(values)


def _styles(done: list[dict], key: str | None, palette) -> dict:
    values = sorted({r["settings"].get(key) for r in done}, key=str)  # the same colours in every report
    return {v: palette[i % len(palette)] for i, v in enumerate(values)}


def _points(ax, done: list[dict], cols: list[str], colors: dict, markers: dict, named: set) -> list:
    # One marker per job (hollow: reused), its p10-p90 bar, and a label; -> the labels
    ckey, mkey = (cols + [None, None])[:2]
    labels = []
    for r in done:
        x, y = r["peak_mem_gb"], r["tokens_per_s_median"]
        c, m = colors[r["settings"].get(ckey)], markers[r["settings"].get(mkey)]
        if r["tokens_per_s_p10"] is not None:
            err = [[y - r["tokens_per_s_p10"]], [r["tokens_per_s_p90"] - y]]
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor=c, alpha=0.45, lw=1, capsize=3, zorder=2)
        face = "none" if r["status"] == "reused" else c
        ax.scatter([x], [y], s=150 if r["rank"] == 1 else 70, marker=m, fc=face, ec=c, lw=1.5, zorder=3)
        label = ax.annotate(
            _label(r, cols, r["rank"] in named), (x, y), xytext=(9, 0), textcoords="offset points", va="center",
            fontsize=8, fontweight="bold" if r["rank"] == 1 else "normal", zorder=4, color=c,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
            arrowprops={"arrowstyle": "-", "color": c, "alpha": 0.6, "lw": 0.6, "shrinkA": 0, "shrinkB": 4},
        )  # fmt: skip
        label.set_in_layout(False)  # kept inside the axes by _repel; must not shrink them
        labels.append(label)
    return labels


def _legend(ax, cols: list[str], colors: dict, markers: dict, front: bool, reused: bool) -> None:
    from matplotlib.lines import Line2D

    ckey, mkey = (cols + [None, None])[:2]
    handles = [
        Line2D([], [], ls="", marker="o", color=c, label=f"{ckey}={v}") for v, c in colors.items() if ckey
    ]
    handles += [
        Line2D([], [], ls="", marker=m, color="0.3", label=f"{mkey}={v}") for v, m in markers.items() if mkey
    ]
    if front:
        handles.append(Line2D([], [], ls="--", color="0.55", label="most tokens/s\nfor its memory"))
    if reused:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="0.3", label="reused earlier run"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)


def plot(rows: list[dict], cols: list[str], path: Path, title: str, mem_label: str, unequal: bool) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    done = [
        r
        for r in rows
        if r["status"] != "failed" and None not in (r["tokens_per_s_median"], r["peak_mem_gb"])
    ]
    fig = Figure(figsize=(12, 7), dpi=110, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = _styles(done, (cols + [None])[0], [f"C{i}" for i in range(10)])
    markers = _styles(done, (cols + [None, None])[1], MARKERS)
    front = _frontier(done)
    named = {r["rank"] for r in done} if len(done) <= FULL_LABELS else {1, 2, 3} | {r["rank"] for r in front}
    labels = _points(ax, done, cols, colors, markers, named)
    if len(front) > 1:
        xs, ys = [r["peak_mem_gb"] for r in front], [r["tokens_per_s_median"] for r in front]
        ax.plot(xs, ys, ls="--", color="0.55", lw=1, zorder=1, drawstyle="steps-post")
    _legend(ax, cols, colors, markers, len(front) > 1, any(r["status"] == "reused" for r in done))
    ax.margins(x=0.25)
    top = max((r["tokens_per_s_p90"] or r["tokens_per_s_median"] for r in done), default=1.0)
    ax.set_ylim(0, 1.15 * top)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set(xlabel=mem_label, ylabel="tokens/s, global (median after warm-up; bars p10-p90)")
    ax.grid(alpha=0.3)
    if left_out := [r for r in rows if r not in done]:
        lines = [f"{_label(r, cols)}: {_status(r)}"[:110] for r in left_out[:6]]
        lines += [f"+{len(left_out) - 6} more"] if len(left_out) > 6 else []
        ax.text(0.99, 0.02, "not plotted:\n" + "\n".join(lines), transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7.5, color="firebrick", bbox={"fc": "white", "ec": "firebrick", "alpha": 0.85})  # fmt: skip
    sizes = "/".join(str(n) for n in sorted({r["world_size"] for r in done if r["world_size"]})) or "?"
    work = "UNEQUAL tokens/step: not like for like" if unequal else "equal tokens/step"
    fig.suptitle(f"tokens/s against peak memory: {title}", fontsize=11)
    subtitle = (
        f"{len(done)} of {len(rows)} jobs plotted; world size {sizes}; {work}; up and to the left is better"
    )
    ax.set_title(subtitle + "; #n = rank in report.md", fontsize=9, color="firebrick" if unequal else "black")
    fig.draw_without_rendering()  # lay the axes out first, so labels are kept inside their final frame
    _repel(ax, labels, canvas.get_renderer())
    fig.savefig(path)


def build_report(sweep_dir: Path) -> list[dict]:
    # Writes report.md/.csv/.png into sweep_dir; returns the rows, best first.
    sweep_dir = Path(sweep_dir)
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
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m launcher.report <sweep dir>   (writes report.md, report.csv, report.png there)"
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
