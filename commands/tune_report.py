# A tune's report, in its directory: report.md (every candidate, pruned, failed or measured, best first; the
# winner, its margin over the runner-up and whether that margin is within the step-to-step noise; the
# winner's command line and preset), report.csv (the same rows) and report.png (tokens/s against peak
# memory, the sweep report's chart).
import csv
from pathlib import Path

from launcher.report_chart import plot
from trainer.summary import RunSummary

# A candidate's override key -> its report column (strategy.tp only on the strategies that split tensors).
COLUMNS = {
    "strategy": "strategy",
    "precision": "precision",
    "attention": "attention",
    "strategy.activation_checkpointing": "activation_checkpointing",
    "strategy.compile": "compile",
    "strategy.tp": "tp",
    "strategy.pp": "pp",
    "strategy.pp_schedule": "schedule",
    "strategy.pp_stages_per_rank": "stages_per_rank",
    "finetune": "finetune",
}
AXIS_NAMES = tuple(COLUMNS.values())


def rows_of(cands, alive) -> list[dict]:
    rank = {id(c): i for i, c in enumerate(alive)}
    rows = []
    for c in cands:
        best = c.best
        s = best["summary"] if best else RunSummary(status="pending")
        memory = s.mem_reserved_peak_gb_max if s.mem_reserved_peak_gb_max is not None else s.peak_rss_gb_max
        micro = (
            best["micro"]
            if best
            else (c.micro_batches[-1] if c.micro_batches else min(c.predicted_gb, default=None))
        )
        rows.append({
            "settings": {**{n: "-" for n in AXIS_NAMES}, **{COLUMNS[k]: v for k, v in (o.split("=", 1) for o in c.overrides)},
                         "micro_batch": micro},
            "mesh": ",".join(f"{k}={v}" for k, v in c.mesh.items()) or "-",
            "status": "ok" if c.status == "measured" else c.status,
            "reason": c.reason,
            "tokens_per_s_median": s.tokens_per_s_median,
            "tokens_per_s_p10": s.tokens_per_s_p10,
            "tokens_per_s_p90": s.tokens_per_s_p90,
            "mfu": s.mfu,
            "bubble": (s.pipeline or {}).get("bubble_fraction"),
            "peak_mem_gb": memory,
            "predicted_gb": c.predicted_gb.get(micro) if micro is not None else None,
            "predicted_tps": c.predicted_tps.get(micro) if micro is not None else None,
            "trials": len(c.trials),
            "steps": best["steps"] if best else None,
            "world_size": s.world_size,
            "run_dir": best["run_dir"] if best else "",
            "order": (rank.get(id(c), len(alive)), c.status != "measured", -(s.tokens_per_s_median or 0.0)),
        })  # fmt: skip
    rows.sort(key=lambda r: r["order"])
    for i, r in enumerate(rows, 1):
        r["rank"] = i
        r["bubble_arithmetic"] = (r["bubble"] or {}).get("arithmetic")
        r["bubble_measured"] = (r["bubble"] or {}).get("measured")
    return rows


def _num(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def verdict(rows: list[dict]) -> list[str]:
    done = [r for r in rows if r["status"] == "ok"]
    if not done:
        return ["No candidate finished a trial."]
    top = done[0]
    lines = [
        f"**Winner:** #1 {_name(top)} at {top['tokens_per_s_median']:,.0f} tokens/s (median of {top['steps']} measured steps)."
    ]
    if len(done) > 1:
        second = done[1]
        margin = top["tokens_per_s_median"] / second["tokens_per_s_median"] - 1
        noise = (
            top["tokens_per_s_p10"] is not None
            and second["tokens_per_s_p90"] is not None
            and (top["tokens_per_s_p10"] <= second["tokens_per_s_p90"])
        )
        lines.append(f"Margin over #2 ({_name(second)}): {margin:+.1%}" + (
            ", within noise (their p10-p90 step ranges overlap)." if noise else ", beyond the step-to-step noise."))  # fmt: skip
    return lines


def _name(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["settings"].items() if v != "-")


def _bubble(b: dict | None) -> str:
    # A pipeline's bubble fraction: by its schedule's arithmetic, and as measured in the trial (CPU runs).
    if not b:
        return "-"
    measured = f" ({b['measured']:.2f})" if "measured" in b else ""
    return f"{b['arithmetic']:.2f}{measured}"


def write_report(root: Path, cands, alive, command: str, preset, seconds: float, trials, cfg) -> str:
    rows = rows_of(cands, alive)
    counts = {
        s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "pruned", "pending", "predicted")
    }
    head = ["#", *AXIS_NAMES, "mesh", "micro-batch", "status", "tokens/s median (p10-p90)", "predicted tokens/s", "MFU", "bubble (measured)", "predicted peak GB/rank",
            "measured peak GB", "trials", "reason"]  # fmt: skip
    lines = [
        f"# Tune report: {root}",
        "",
        f"{len(rows)} candidates: {counts['ok']} measured, {counts['failed']} failed, {counts['pruned']} pruned before any "
        f"trial, {counts['predicted']} not tried (predicted too slow), {counts['pending']} not reached; {trials.ran} trials run, {trials.reused} reused from an earlier tune, "
        f"{seconds / 60:.1f} min.",
        "",
        *verdict(rows),
        "",
        *(
            [
                f"Train with it: `{command}`",
                f"or: `python train.py --config-dir {root} +tuned=winner` ({preset})",
                "",
            ]
            if command
            else []
        ),
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in rows:
        tps = _num(r["tokens_per_s_median"], ",.0f")
        if r["tokens_per_s_p10"] is not None:
            tps += f" ({r['tokens_per_s_p10']:,.0f}-{r['tokens_per_s_p90']:,.0f})"
        cells = [str(r["rank"]), *(str(r["settings"][k]) for k in AXIS_NAMES), r["mesh"], str(r["settings"]["micro_batch"] or "-"),
                 r["status"], tps, _num(r["predicted_tps"], ",.0f"), _num(r["mfu"], ".1%"), _bubble(r["bubble"]), _num(r["predicted_gb"], ".3f"), _num(r["peak_mem_gb"], ".3f"),
                 str(r["trials"]), r["reason"].replace("|", "\\|")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## How to read it",
        "",
        f"- **pruned**: never tried: the pre-launch checks refused it, or the memory planner's peak exceeded the memory "
        f"less tune.headroom={cfg.tune.headroom} at every micro-batch.",
        f"- **Trials**: {cfg.tune.warmup_steps} warm-up steps kept out, then {cfg.tune.trial_steps} measured steps, at the "
        "largest micro-batch the planner lets fit (halved after a failure); the better half goes on with twice the "
        f"steps, for tune.rounds={cfg.tune.rounds} rounds. Tokens/s is the median over a trial's measured steps.",
        f"- **predicted**: the time model's tokens/s (trainer/speed/model.py, at this machine's calibration). First "
        f"trials go only to the candidates predicted within tune.margin={cfg.tune.margin} of the best, the margin "
        "widened by the model's error on those trials; **predicted** rows were not tried.",
        "",
        "![tokens/s against peak memory](report.png)",
        "",
    ]
    text = "\n".join(lines)
    (root / "report.md").write_text(text)
    with open(root / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = ["tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90", "predicted_tps", "mfu", "bubble_arithmetic", "bubble_measured", "predicted_gb", "peak_mem_gb", "trials", "steps", "reason", "run_dir"]  # fmt: skip
        w.writerow(["rank", *AXIS_NAMES, "mesh", "micro_batch", "status", *keys])
        for r in rows:
            w.writerow([r["rank"], *(r["settings"][k] for k in AXIS_NAMES), r["mesh"], r["settings"]["micro_batch"], r["status"],
                        *("" if r[k] is None else r[k] for k in keys)])  # fmt: skip
    memory = "peak memory, GB (max over ranks)"
    # The axes the candidates differ in name them (two that differ only in checkpointing carry different labels).
    varied = [k for k in (*AXIS_NAMES, "micro_batch") if len({str(r["settings"].get(k)) for r in rows}) > 1]
    plot(rows, varied or list(AXIS_NAMES[:3]), root / "report.png", str(root), memory, False, "candidates")
    return text
