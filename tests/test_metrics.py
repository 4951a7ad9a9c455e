import json
import math
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers import dist as dist_helpers
from trainer.console import ProgressBar, format_summary
from trainer.dist import close_distributed, init_distributed
from trainer.metrics import Metrics, measure_state_bytes
from trainer.peaks import lookup_peak_tflops
from trainer.summary import RunSummary

CPU = torch.device("cpu")


def make_metrics(**kw) -> Metrics:
    args = dict(device=CPU, flops_per_token=6e6, precision="fp32", warmup_steps=0, log_every=1)
    return Metrics(**(args | kw))


def run_steps(m: Metrics, sleeps: list[float], tokens: int = 1000, log: bool = True) -> list[dict]:
    rows = []
    m.start()
    for i, s in enumerate(sleeps, start=1):
        time.sleep(s)
        m.update(i, loss=10.0 / i, grad_norm=1.0, lr=1e-3, tokens=tokens)
        row = m.log(i, final=i == len(sleeps)) if log else None
        if row is not None:
            rows.append(row)
    return rows


def test_warmup_steps_are_excluded_from_throughput():
    m = make_metrics(warmup_steps=2, log_every=2)
    rows = run_steps(m, [0.25, 0.25, 0.02, 0.02, 0.02, 0.02])
    s = m.summary()

    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[0]["tokens_per_s"] is None and rows[0]["mfu"] is None  # interval was all warm-up
    assert rows[0]["step_time_s"] >= 0.25
    assert s.steps == 6 and s.warmup_steps == 2
    assert s.warmup_time_s >= 0.5
    # sleep() bounds each post-warm-up step from below, so 1000 tokens / 0.02 s is an upper bound;
    # had a 0.25 s warm-up step leaked into the median it would sit near 4,000.
    for key in ("tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90"):
        assert 12_000 < getattr(s, key) <= 50_000, key
    assert s.tokens_per_s_p10 <= s.tokens_per_s_median <= s.tokens_per_s_p90
    assert s.tokens_per_s_std >= 0
    assert rows[1]["tokens_per_s"] > 12_000
    assert s.first_loss == 10.0 and s.final_loss == pytest.approx(10.0 / 6)


def test_mfu_none_on_cpu_without_peak_and_arithmetic_with_peak():
    plain = make_metrics()
    row = run_steps(plain, [0.01, 0.01])[-1]
    assert row["mfu"] is None and plain.summary().mfu is None
    assert plain.summary().mfu_peak_source is None

    m = make_metrics(peak_tflops=2.0, world_size=4)
    row = run_steps(m, [0.01, 0.01])[-1]
    tflops = 6e6 * row["tokens_per_s"] / 4 / 1e12
    assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / 4)
    assert row["tflops_per_device"] == pytest.approx(tflops)
    assert row["mfu"] == pytest.approx(tflops / 2.0)
    s = m.summary()
    assert s.mfu == pytest.approx(6e6 * s.tokens_per_s_median / 4 / 1e12 / 2.0)
    assert s.mfu_peak_tflops == 2.0 and s.mfu_peak_source == "user"


@pytest.mark.parametrize(
    "name, precision, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4),
        (
            "NVIDIA H100 80GB HBM3",
            "fp8",
            989.4,
        ),  # fp8's MFU is against the bf16 peak (tests/test_gpu_paths.py)
        ("NVIDIA H100 PCIe", "bf16-true", 756.0),
        ("NVIDIA H100 PCIe", "fp32", 51.0),
        ("NVIDIA H200", "bf16-mixed", 989.4),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA A100-PCIE-40GB", "fp16-mixed", 312.0),
        ("NVIDIA A100-SXM4-40GB", "int8", 312.0),  # against the bf16 peak too
        ("NVIDIA L4", "bf16-mixed", 121.0),
        ("NVIDIA L40S", "bf16-mixed", 362.05),
        ("NVIDIA L40", "bf16-mixed", None),  # not an L4, not an L40S
        ("NVIDIA GeForce RTX 4090", "bf16-mixed", None),
        ("NVIDIA H100", "bf16-mixed", None),  # form factor unknown: no guess
    ],
)
def test_lookup_peak_tflops(name, precision, expected):
    assert lookup_peak_tflops(name, precision) == expected


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="bf16-mixed"):
        lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")
    with pytest.raises(ValueError, match="valid"):
        make_metrics(precision="fp64")


def test_cpu_rows_report_process_peak_rss_and_extras():
    m = make_metrics()
    m.start()
    m.update(1, loss=1.0, grad_norm=0.5, lr=1e-3, tokens=10, data_wait_s=0.1)
    row = m.log(1)
    assert row["peak_rss_gb"] > 0 and row["rss_gb"] > 0
    assert row["peak_rss_gb"] >= row["rss_gb"] * 0.99
    assert not any(k.startswith("mem_") for k in row)
    assert row["data_wait_s"] == 0.1
    assert m.log(2) is None  # nothing happened since the last row
    s = m.summary()
    assert s.memory_kind == "cpu_peak_rss" and s.peak_rss_gb_max == s.peak_rss_gb_min > 0


def test_update_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="start"):
        make_metrics().update(1, loss=1.0, grad_norm=1.0, lr=1.0, tokens=1)


def test_measure_state_bytes_adamw():
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(model.parameters())
    before = measure_state_bytes(model, opt)
    assert before["params_bytes"] == (16 * 8 + 8) * 4
    assert before["grads_bytes"] == 0 and before["optim_state_bytes"] == 0

    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    after = measure_state_bytes(model, opt)
    p = after["params_bytes"]
    assert after["grads_bytes"] == p
    # exp_avg + exp_avg_sq are 2x the parameters; AdamW also keeps a 4-byte `step` per parameter tensor.
    assert after["optim_state_bytes"] == 2 * p + 4 * 2
    assert after["total"] == p + p + after["optim_state_bytes"]


def test_console_format_and_progress_bar():
    m = make_metrics(warmup_steps=1)
    rows = run_steps(m, [0.01, 0.01, 0.01])
    bar = ProgressBar(3, enabled=False)
    for r in rows:
        bar.update(r["step"], r)
    assert "val" not in bar._bar.postfix
    bar.update(3, {**rows[-1], "val_loss": 2.5})
    bar.update(3, rows[-1])  # a later row without one: the last validation stays in the bar
    assert "val=2.5000" in bar._bar.postfix
    bar.close()
    text = format_summary(m.summary())
    assert "n/a (no datasheet peak for this device; set metrics.peak_tflops)" in text
    assert "peak RSS" in text and "1 warm-up steps excluded" in text
    assert "first loss" in text and "final loss" in text
    with_peak = make_metrics(peak_tflops=1.0)
    run_steps(with_peak, [0.01, 0.01])
    assert "(user)" in format_summary(with_peak.summary())


def _distributed_worker(out_dir: str) -> None:
    # In each rank of a 2-process gloo group (tests/helpers/dist.launch).
    torch.set_num_threads(1)
    env = init_distributed("cpu", need_group=True)
    rank = env.rank
    try:
        m = make_metrics(warmup_steps=1, log_every=2, world_size=2, rank=rank)
        dist.barrier()
        # Rank 1 is the straggler; log() itself must not book the wait for it as rank 0's step time.
        rows = run_steps(m, [0.01 if rank == 0 else 0.08] * 5)
        summary = m.summary()

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(torch.nn.Linear(16, 8), mesh=init_device_mesh("cpu", (2,)))
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        state = measure_state_bytes(model, opt)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"rows": rows, "summary": summary.to_json(), "state": state}, f)
    finally:
        close_distributed(env)


@pytest.mark.slow
def test_two_rank_gloo_max_min(tmp_path):
    dist_helpers.launch(_distributed_worker, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rows0, rows1 = results[0]["rows"], results[1]["rows"]
    assert [r["step"] for r in rows0] == [2, 4, 5] == [r["step"] for r in rows1]
    for r0, r1 in zip(rows0, rows1, strict=True):
        assert r0["step_time_s_max"] == r1["step_time_s_max"] >= 0.08
        assert r0["step_time_s_min"] == r1["step_time_s_min"] < 0.06
        assert r0["step_time_s"] < 0.06 and r1["step_time_s"] >= 0.08
        assert r0["peak_rss_gb_max"] >= r0["peak_rss_gb_min"] > 0

    s0, s1 = (RunSummary.from_json(r["summary"]) for r in results)
    assert s0.steps == 5 and s0.warmup_steps == 1
    assert s0.step_time_s_median_max == s1.step_time_s_median_max >= 0.08
    assert s0.step_time_s_median_min == s1.step_time_s_median_min < 0.06
    assert s0.peak_rss_gb_max == s1.peak_rss_gb_max >= s0.peak_rss_gb_min > 0
    assert s0.tokens_per_s_per_device == pytest.approx(s0.tokens_per_s_median / 2)

    # FSDP2 shards: each rank holds half the parameters, gradients and Adam moments.
    full = (16 * 8 + 8) * 4
    for r in results:
        assert r["state"]["params_bytes"] == full // 2
        assert r["state"]["grads_bytes"] == full // 2
        assert r["state"]["optim_state_bytes"] == full + 4 * 2


def test_validation_is_logged_and_its_time_kept_out_of_training_throughput():
    m = make_metrics(log_every=100)
    m.start()
    m.update(1, loss=3.0, grad_norm=1.0, lr=1e-3, tokens=1000)
    time.sleep(0.3)  # an evaluation after step 1
    m.record_eval(1, 2.5, 0.3)
    row = m.log(1)  # a row after every evaluation, log step or not
    assert row["val_loss"] == 2.5 and row["val_ppl"] == pytest.approx(math.exp(2.5))
    time.sleep(0.02)
    m.update(2, loss=2.0, grad_norm=1.0, lr=1e-3, tokens=1000)
    m.record_eval(2, 2.7, 0.0)
    row = m.log(2, final=True)
    assert row["step_time_s"] < 0.2  # step 2 took ~0.02 s, not the 0.3 s of evaluation before it
    s = m.summary()
    assert (s.val_loss, s.val_step, s.best_val_loss, s.best_val_step) == (2.7, 2, 2.5, 1)
    assert s.evals == 2 and s.eval_time_s == pytest.approx(0.3)
    assert s.val_ppl == pytest.approx(math.exp(2.7))
    assert "validation loss" in format_summary(s) and "not in tokens/s" in format_summary(s)
