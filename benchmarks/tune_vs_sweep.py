# Does the tune find what the exhaustive sweep finds, for less, now that the time model decides which candidates get
# trials? On this CPU, 4 processes: 84 candidates = 7 layouts (ddp, fsdp, fsdp_grad_op, hsdp, fsdp_tp and hsdp_tp with
# tensor parallelism over 2, pp over 2 stages with 1F1B) x 3 precisions (fp32, bf16-mixed, bf16-true) x 2 attentions
# (flash, standard) x activation checkpointing none / full, at micro-batch 2. The sweep runs all 84 with
# `python train.py -m`, as a user without a tune would; the tune runs `python -m commands.tune` on the same space
# (its default tune.margin). Both share this machine's calibration (measured first if the cache has none, and not
# counted in either's time). Printed: both wall times and their ratio (goal: the tune at most 15% of the sweep), the
# sweep's best and the tune's winner as the sweep measured it (goal: within 5%, or within the sweep's noise), the
# time model's error over every sweep job (each run predicts its own step time), and whether the model's top 3 holds
# the sweep's best.
#   python -m benchmarks.tune_vs_sweep
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NPROC = 4
BASE = ["model=debug", "data=synthetic", "trainer.device=cpu", "trainer.seq_len=128", "trainer.global_batch_size=8",
        f"launcher.nproc_per_node={NPROC}", "plan.device=cpu", "plan.device_memory_gb=100", "eval.at_end=false",
        "trainer.micro_batch_size=2"]  # fmt: skip
LAYOUTS = ["ddp", "fsdp", "fsdp_grad_op", "hsdp", "fsdp_tp", "hsdp_tp", "pp"]
AXES = {"precision": ["fp32", "bf16-mixed", "bf16-true"], "attention": ["flash", "standard"],
        "strategy.activation_checkpointing": ["none", "full"]}  # fmt: skip
STEPS, WARMUP = 8, 2  # the sweep's jobs: as long as the tune's last round


def timed(cmd: list[str]) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # a sweep with failed jobs exits 1 and still writes its report
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - began


def key(row: dict) -> tuple:
    ac = row.get("strategy.activation_checkpointing") or row.get("activation_checkpointing") or "none"
    return row["strategy"], row["precision"], row["attention"], ac


def tps(row: dict) -> float:
    return float(row["tokens_per_s_median"])


def main() -> None:
    from trainer.speed import calibration
    from trainer.speed.calibrate import calibrate

    if calibration.load("cpu", NPROC) is None:
        calibrate("cpu", NPROC)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sweep = [sys.executable, "train.py", "-m", *BASE, f"trainer.max_steps={WARMUP + STEPS}",
                 f"metrics.warmup_steps={WARMUP}", "trainer.log_every=100", "trainer.progress_bar=false",
                 f"strategy={','.join(LAYOUTS)}", *(f"{k}={','.join(v)}" for k, v in AXES.items()),
                 f"hydra.sweep.dir={tmp / 'sweep'}"]  # fmt: skip
        sweep_s = timed(sweep)
        with open(tmp / "sweep" / "report.csv", newline="") as f:
            jobs = {key(r): r for r in csv.DictReader(f) if r["status"] == "ok"}
        tune = [sys.executable, "-m", "commands.tune", *BASE, f"tune.strategies=[{','.join(LAYOUTS)}]",
                *(f"tune.{a}=[{','.join(AXES[k])}]" for a, k in (("precisions", "precision"), ("attentions", "attention"),
                  ("activation_checkpointing", "strategy.activation_checkpointing"))),
                "tune.tp=[2]", "tune.pp=[2]", "tune.pp_schedules=[1f1b]", "tune.micro_batch_sizes=[2]",
                f"tune.trial_steps={STEPS // 2}", f"tune.warmup_steps={WARMUP}", f"tune.dir={tmp / 'tune'}"]  # fmt: skip
        tune_s = timed(tune)
        with open(tmp / "tune" / "report.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    winner = next(r for r in rows if r["rank"] == "1")
    best = max(jobs.values(), key=tps)
    ours = jobs.get(key(winner))
    status = {
        s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "pruned", "predicted", "pending")
    }
    print(f"space: {len(rows)} candidates ({status}); the sweep finished {len(jobs)} of them")
    print(f"sweep: {sweep_s:.0f} s; best {' '.join(key(best))} at {tps(best):,.0f} tokens/s "
          f"(p10-p90 {float(best['tokens_per_s_p10']):,.0f}-{float(best['tokens_per_s_p90']):,.0f})")  # fmt: skip
    within = ours is not None and float(ours["tokens_per_s_p90"]) >= float(best["tokens_per_s_p10"])
    measured = (
        f"{tps(ours):,.0f} tokens/s = {tps(ours) / tps(best):.1%} of its best" if ours else "not measured"
    )
    print(f"tune:  {tune_s:.0f} s = {tune_s / sweep_s:.0%} of the sweep (goal <= 15%); winner {' '.join(key(winner))}, "
          f"which the sweep measured at {measured} (goal >= 95%{', or within its noise: yes' if within else ''})")  # fmt: skip
    errors = {
        k: float(r["tokens_per_s_predicted"]) / tps(r) - 1
        for k, r in jobs.items()
        if r["tokens_per_s_predicted"]
    }
    worst = sorted(errors.items(), key=lambda x: -abs(x[1]))[:5]
    print(f"time model over the sweep's {len(errors)} jobs: error median {statistics.median(map(abs, errors.values())):.0%}, "
          f"worst {abs(worst[0][1]):.0%}; the 5 worst (predicted/measured - 1): "
          + "; ".join(f"{' '.join(k)} {e:+.0%}" for k, e in worst))  # fmt: skip
    ranked = sorted((r for r in rows if r["predicted_tps"]), key=lambda r: -float(r["predicted_tps"]))
    top3 = [key(r) for r in ranked[:3]]
    print(f"the model's top 3: {top3}; holds the sweep's best: {key(best) in top3}")


if __name__ == "__main__":
    main()
