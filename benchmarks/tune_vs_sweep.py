# Does the tune find what the exhaustive sweep finds, for less? On this CPU: 16 candidates (ddp, fsdp x fp32,
# bf16-mixed x flash, standard x no / full activation checkpointing) at micro-batches 2, 4 and 8, 2 processes,
# and a memory budget that prunes some (the planner's peak of ddp + fp32 + standard attention at micro-batch
# 2, less 10%). The sweep runs all 48 (candidate, micro-batch) jobs with `python train.py -m`, as a user
# without a tune would; the tune runs `python -m commands.tune` on the same space and budget. Printed: both
# wall times, the sweep's best, and the tune's winner as the sweep measured it: the winner must be within 5%
# of the sweep's best (or within its step-to-step noise), in at most 40% of the sweep's time.
#   python -m benchmarks.tune_vs_sweep
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = ["model=debug", "data=synthetic", "trainer.device=cpu", "trainer.seq_len=256", "trainer.global_batch_size=16",
        "launcher.nproc_per_node=2", "plan.device=cpu", "eval.at_end=false"]  # fmt: skip
AXES = {"strategy": ["ddp", "fsdp"], "precision": ["fp32", "bf16-mixed"], "attention": ["flash", "standard"],
        "strategy.activation_checkpointing": ["none", "full"], "trainer.micro_batch_size": ["2", "4", "8"]}  # fmt: skip
STEPS, WARMUP = 12, 2  # the sweep's jobs: as long as the tune's last round


def budget_gb() -> float:
    from commands.plan import setup_of
    from launcher.compose import compose_config

    cfg = compose_config(
        [*BASE, "strategy=ddp", "precision=fp32", "attention=standard", "trainer.micro_batch_size=2"]
    )
    return setup_of(cfg).plan().peak / 1e9 * 0.9


def timed(cmd: list[str]) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # a sweep with failed jobs exits 1 and still writes its report
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - began


def key(row: dict) -> tuple:
    return tuple(
        str(row[k]) for k in ("strategy", "precision", "attention", "activation_checkpointing", "micro")
    )


def main() -> None:
    limit = budget_gb()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sweep = [sys.executable, "train.py", "-m", *BASE, f"trainer.max_steps={WARMUP + STEPS}",
                 f"metrics.warmup_steps={WARMUP}", "trainer.log_every=100", "trainer.progress_bar=false",
                 *(f"{k}={','.join(v)}" for k, v in AXES.items()), f"hydra.sweep.dir={tmp / 'sweep'}"]  # fmt: skip
        sweep_s = timed(sweep)
        with open(tmp / "sweep" / "report.csv", newline="") as f:
            jobs = {}
            for r in csv.DictReader(f):
                if r["status"] == "ok":
                    r["activation_checkpointing"] = r.get("strategy.activation_checkpointing", "none")
                    r["micro"] = r.get("trainer.micro_batch_size", "")
                    jobs[key(r)] = r
        tune = [sys.executable, "-m", "commands.tune", *BASE, f"plan.device_memory_gb={limit}",
                *(f"tune.{a}=[{','.join(AXES[k])}]" for a, k in (("strategies", "strategy"), ("precisions", "precision"),
                  ("attentions", "attention"), ("activation_checkpointing", "strategy.activation_checkpointing"),
                  ("micro_batch_sizes", "trainer.micro_batch_size"))),
                f"tune.trial_steps={STEPS // 2}", f"tune.warmup_steps={WARMUP}", f"tune.dir={tmp / 'tune'}"]  # fmt: skip
        tune_s = timed(tune)
        with open(tmp / "tune" / "report.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        winner = next(r for r in rows if r["rank"] == "1")
        winner["micro"] = winner["micro_batch"]
        # The best the sweep found within the budget: on a GPU the others would have run out of memory (here
        # nothing stops them, so the sweep measured them too: printed beside it).
        fits = [r for r in jobs.values() if float(r["memory_predicted_peak_gb"]) <= limit]
        overall = max(jobs.values(), key=lambda r: float(r["tokens_per_s_median"]))
        best = max(fits, key=lambda r: float(r["tokens_per_s_median"]))
        ours = jobs.get(key(winner))
        tps = lambda r: float(r["tokens_per_s_median"])  # noqa: E731
        pruned = sum(r["status"] == "pruned" for r in rows)
        print(
            f"space: {len(rows)} candidates x micro-batches 2, 4, 8 = {len(jobs)} sweep jobs that finished; budget {limit:.4f} GB per rank"
        )
        print(f"sweep: {sweep_s:.0f} s; best within the budget {' '.join(key(best))} at {tps(best):,.0f} tokens/s "
              f"(p10-p90 {float(best['tokens_per_s_p10']):,.0f}-{float(best['tokens_per_s_p90']):,.0f}); best of all "
              f"{len(jobs)}, budget ignored: {' '.join(key(overall))} at {tps(overall):,.0f}")  # fmt: skip

        if ours is None:
            print(
                f"tune:  {tune_s:.0f} s ({tune_s / sweep_s:.0%} of the sweep); winner {' '.join(key(winner))}: not among the sweep's finished jobs"
            )
            return
        within_noise = float(ours["tokens_per_s_p90"]) >= float(best["tokens_per_s_p10"])
        print(f"tune:  {tune_s:.0f} s ({tune_s / sweep_s:.0%} of the sweep; target <= 40%), {pruned} candidates pruned; winner "
              f"{' '.join(key(winner))}, which the sweep measured at {tps(ours):,.0f} tokens/s = {tps(ours) / tps(best):.1%} of "
              f"its best (target >= 95%{', or within its noise: yes' if within_noise else ''})")  # fmt: skip


if __name__ == "__main__":
    main()
