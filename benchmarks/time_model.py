# The time model (trainer/speed/model.py) against measured step time, side by side in one run: every strategy on
# this CPU (2 processes; tp, pp and the 2 x 2 meshes on 4), each trained for real with `python train.py` and
# predicted from this machine's calibration (measured first if the cache has none). Printed per config: predicted
# and measured step time (the median after warm-up), their ratio, and then the range of ratios, and whether the
# prediction orders the strategies as the measurements do wherever their measured gap is beyond the noise (the
# p10-p90 ranges of tokens/s do not overlap).
#   python -m benchmarks.time_model
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = ["model=debug", "data=synthetic", "trainer.device=cpu", "trainer.seq_len=128", "trainer.global_batch_size=8",
        "trainer.max_steps=14", "metrics.warmup_steps=4", "trainer.log_every=100", "trainer.progress_bar=false",
        "eval.at_end=false", "plan.device=cpu"]  # fmt: skip
CONFIGS = {
    "single": (1, ["strategy=single"]),
    "ddp": (2, ["strategy=ddp"]),
    "ddp accum": (2, ["strategy=ddp", "trainer.micro_batch_size=2"]),
    "ddp full AC": (2, ["strategy=ddp", "strategy.activation_checkpointing=full"]),
    "ddp bf16-mixed": (2, ["strategy=ddp", "precision=bf16-mixed"]),
    "fsdp": (2, ["strategy=fsdp"]),
    "fsdp_grad_op": (2, ["strategy=fsdp_grad_op"]),
    "fsdp_offload": (2, ["strategy=fsdp_offload"]),
    "tp": (2, ["strategy=tp"]),
    "pp": (2, ["strategy=pp"]),
    "ddp x4": (4, ["strategy=ddp"]),
    "fsdp x4": (4, ["strategy=fsdp"]),
    "hsdp 2x2": (4, ["strategy=hsdp", "strategy.shard_size=2"]),
    "fsdp_tp 2x2": (4, ["strategy=fsdp_tp"]),
    "pp x4": (4, ["strategy=pp", "model.n_layers=4"]),
}


def predicted(nproc: int, overrides: list[str]):
    from commands.plan import setup_of
    from launcher.compose import compose_config
    from trainer.speed import calibration
    from trainer.speed.calibrate import calibrate
    from trainer.speed.model import predict_setup

    cal = calibration.load("cpu", nproc) or calibrate("cpu", nproc)
    cfg = compose_config([*BASE, *overrides, f"launcher.nproc_per_node={nproc}"])
    return predict_setup(setup_of(cfg), cal)


def measured(nproc: int, overrides: list[str], run_dir: Path) -> dict:
    cmd = [
        sys.executable,
        "train.py",
        *BASE,
        *overrides,
        f"launcher.nproc_per_node={nproc}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (nproc, overrides)) in enumerate(CONFIGS.items()):
            p = predicted(nproc, overrides)
            s = measured(nproc, overrides, Path(tmp) / str(i))
            rows.append((name, nproc, p, s))
    print(f"{'config':16s} {'ranks':>5s} {'predicted s':>11s} {'measured s':>10s} {'ratio':>6s}  terms (s)")
    ratios = []
    for name, nproc, p, s in rows:
        ratio = p.total_s / s["step_time_s_median"]
        ratios.append(ratio)
        terms = ", ".join(f"{k} {v:.4f}" for k, v in p.terms().items() if v)
        print(
            f"{name:16s} {nproc:5d} {p.total_s:11.4f} {s['step_time_s_median']:10.4f} {ratio:6.2f}  {terms}"
        )
    print(f"ratio predicted/measured: min {min(ratios):.2f}, median {sorted(ratios)[len(ratios) // 2]:.2f}, "
          f"max {max(ratios):.2f} over {len(ratios)} configs")  # fmt: skip
    # Rank order, pairwise among configs of one world size, where the measured tokens/s ranges do not overlap.
    agree = disagree = 0
    for i, (_, n1, p1, s1) in enumerate(rows):
        for name2, n2, p2, s2 in rows[i + 1 :]:
            if n1 != n2:
                continue
            if (
                s1["tokens_per_s_p10"] > s2["tokens_per_s_p90"]
                or s2["tokens_per_s_p10"] > s1["tokens_per_s_p90"]
            ):
                faster_measured = s1["tokens_per_s_median"] > s2["tokens_per_s_median"]
                faster_predicted = p1.tokens_per_s > p2.tokens_per_s
                agree += faster_measured == faster_predicted
                disagree += faster_measured != faster_predicted
                if faster_measured != faster_predicted:
                    print(f"  ordered wrongly: {rows[i][0]} ({n1} ranks) against {name2}")
    print(f"pairs beyond noise ordered as measured: {agree} of {agree + disagree}")


if __name__ == "__main__":
    main()
