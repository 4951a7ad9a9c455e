# The sweep's and tune's chart: tokens/s against peak memory, one labelled point per job or candidate (matplotlib,
# PNG).
import itertools
import math
import textwrap
from pathlib import Path

from trainer.config import SCHEMAS

MARKERS = "osD^vP*Xph<>"
FULL_LABELS = 12  # more jobs than this: full labels for the top 3 and the frontier, "#n" for the rest


def status_text(r: dict) -> str:
    # A report row's status as the table and the chart's "not plotted" box say it (a tune's rows are also
    # pruned or pending, with their reason).
    status = "ok (reused)" if r["status"] == "reused" else r["status"]
    return (
        f"{status}: {r['reason']}" if r.get("reason") else status
    )  # an ok row's reason: a note (non-finite steps)


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


def plot(
    rows: list[dict],
    cols: list[str],
    path: Path,
    title: str,
    mem_label: str,
    unequal: bool,
    noun: str = "jobs",
) -> None:
    # noun: what a row is (a sweep's jobs, a tune's candidates).
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
    # Both axes from zero: memories 0.365 and 0.385 GB are the same memory, and must look it.
    right = max((r["peak_mem_gb"] for r in done), default=1.0)
    ax.set_xlim(0, 1.3 * right)
    top = max((r["tokens_per_s_p90"] or r["tokens_per_s_median"] for r in done), default=1.0)
    ax.set_ylim(0, 1.15 * top)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set(xlabel=mem_label, ylabel="tokens/s, global (median after warm-up; bars p10-p90)")
    ax.grid(alpha=0.3)
    if left_out := [r for r in rows if r not in done]:
        # Wrapped to a width the axes always hold, anchored at their lower right: never past the figure's edge.
        lines = [
            "\n  ".join(
                textwrap.wrap(f"{_label(r, cols)}: {status_text(r)}", 72, max_lines=2, placeholder=" ...")
            )
            for r in left_out[:6]
        ]
        lines += [f"+{len(left_out) - 6} more"] if len(left_out) > 6 else []
        ax.text(0.99, 0.02, "not plotted:\n" + "\n".join(lines), transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7.5, color="firebrick", bbox={"fc": "white", "ec": "firebrick", "alpha": 0.85})  # fmt: skip
    sizes = "/".join(str(n) for n in sorted({r["world_size"] for r in done if r["world_size"]})) or "?"
    work = "UNEQUAL tokens/step: not like for like" if unequal else "equal tokens/step"
    fig.suptitle(f"tokens/s against peak memory: {title}", fontsize=11)
    subtitle = (
        f"{len(done)} of {len(rows)} {noun} plotted; world size {sizes}; {work}; up and to the left is better"
    )
    ax.set_title(subtitle + "; #n = rank in report.md", fontsize=9, color="firebrick" if unequal else "black")
    fig.draw_without_rendering()  # lay the axes out first, so labels are kept inside their final frame
    _repel(ax, labels, canvas.get_renderer())
    fig.savefig(path)
