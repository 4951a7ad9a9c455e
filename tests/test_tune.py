# python -m commands.tune on the CPU: the planner prunes what cannot fit and what only recomputes more, real
# trials measure the rest (each its own worker processes, so one killed by the out-of-memory killer is a
# row), a rerun reuses what finished, then_train trains exactly the winner, the budget stops the search,
# and bad input is one line before any trial.
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from commands import tune as tune_cli
from tests.helpers.cli import cli_env, workers
from tests.helpers.reports import assert_png
from tests.helpers.run import REPO, read_summary

pytestmark = pytest.mark.slow

# 2 precisions x 2 attentions x 2 AC modes on one process, micro-batch 2 of a global batch of 4 (the
# micro-batch's growth: one trial each here; a doubling that stops early is a candidate's own business).
BASE = (
    "model=debug", "data=synthetic", "trainer.device=cpu", "trainer.seq_len=256", "trainer.global_batch_size=4",
    "trainer.max_steps=3", "launcher.nproc_per_node=1", "plan.device=cpu", "tune.precisions=[fp32,bf16-mixed]",
    "tune.attentions=[flash,standard]", "tune.activation_checkpointing=[none,full]", "tune.micro_batch_sizes=[2]",
    "tune.trial_steps=2", "tune.warmup_steps=1", "tune.rounds=2", "tune.margin=1",
)  # fmt: skip
# tune.margin=1: every candidate that fits gets a trial, whatever the time model predicts (its own test is below).


def budget_gb() -> float:
    # Between the planner's peaks of flash and standard attention at micro-batch 2, fp32, no checkpointing:
    # standard attention's (B, H, T, T) scores do not fit, flash does.
    from commands.plan import setup_of
    from launcher.compose import compose_config

    peaks = {
        a: setup_of(compose_config([*BASE, f"attention={a}", "trainer.micro_batch_size=2"])).plan().peak / 1e9
        for a in ("flash", "standard")
    }
    assert peaks["flash"] < peaks["standard"]
    return round((peaks["flash"] * 1.5 + peaks["standard"]) / 2.5 / 0.9, 4)  # / 0.9: tune.headroom


def leanest_gb() -> float:
    from commands.plan import setup_of
    from launcher.compose import compose_config

    return min(
        setup_of(compose_config([*BASE, f"precision={p}", "attention=flash", f"strategy.activation_checkpointing={ac}",
                                 "trainer.micro_batch_size=2"])).plan().peak / 1e9
        for p in ("fp32", "bf16-mixed") for ac in ("none", "full")
    )  # fmt: skip


def run_tune(*overrides: str, kill_first_trial: bool = False) -> tuple[int, str, str]:
    args = [sys.executable, "-m", "commands.tune", *BASE, *overrides]
    proc = subprocess.Popen(
        args, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if kill_first_trial:  # what the kernel's out-of-memory killer does to a trial's worker
        threading.Thread(target=_kill_first_worker, args=(proc,), daemon=True).start()
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _kill_first_worker(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = workers(proc.pid)
        if found:
            time.sleep(0.5)
            found[0].send_signal(signal.SIGKILL)
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    # -> (tune dir, the first run's (exit code, stdout, stderr, report rows), the rerun's, with then_train).
    root = tmp_path_factory.mktemp("tune") / "t"
    limit = budget_gb()
    first = run_tune(f"tune.dir={root}", f"plan.device_memory_gb={limit}", kill_first_trial=True)
    first_rows = rows(root) if (root / "report.csv").exists() else []
    again = run_tune(f"tune.dir={root}", f"plan.device_memory_gb={limit}", "tune.then_train=true")
    return root, (*first, first_rows), again


def rows(root: Path) -> list[dict]:
    import csv

    with open(root / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_planner_prunes_before_any_trial(tuned):
    root, (code, out, err, found), _ = tuned
    assert code == 0, err[-3000:]
    assert len(found) == 8
    standard = [r for r in found if r["attention"] == "standard" and r["activation_checkpointing"] == "none"]
    assert all(r["status"] == "pruned" and "predicted peak" in r["reason"] for r in standard), standard
    dominated = [r for r in found if r["attention"] == "flash" and r["activation_checkpointing"] == "full"]
    assert all(r["status"] == "pruned" and r["reason"].startswith("dominated") for r in dominated), dominated
    pruned = {
        (r["precision"], r["attention"], r["activation_checkpointing"])
        for r in found
        if r["status"] == "pruned"
    }
    for trial in (root / "trials").iterdir():  # no trial of a pruned candidate was ever started
        over = json.loads((trial / "overrides.json").read_text())
        get = dict(o.split("=", 1) for o in over)
        assert (get["precision"], get["attention"], get["strategy.activation_checkpointing"]) not in pruned


def test_a_killed_trial_is_a_row_and_the_tune_goes_on(tuned):
    root, (code, out, err, found), _ = tuned
    failed = [r for r in found if r["status"] == "failed"]
    assert len(failed) == 1 and "SIGKILL" in failed[0]["reason"], found
    measured = [r for r in found if r["status"] == "ok"]
    assert measured and float(measured[0]["tokens_per_s_median"]) > 0
    assert "**Winner:** #1" in out and "Train with it: `python train.py " in out
    assert_png(root / "report.png")
    # Each trial says which candidate it is, of how many, and where the tune stands, and then its result in a line
    # (no summary table per trial).
    tried = sum(r["status"] != "pruned" for r in found)
    assert re.search(rf"shardlab: trial 1, candidate 1 of {tried}: strategy=\S+ precision=\S+ .*, micro-batch \d+, "
                     r"\d+ steps \(\d+ s into the tune\)", out), out  # fmt: skip
    assert re.search(r"shardlab: trial \d+, candidate \d+ of \d+: [\d,]+ tokens/s", out), out
    assert "tokens/s (global, median)" not in out


def test_a_rerun_reuses_its_trials_and_then_train_trains_exactly_the_winner(tuned):
    root, _, (code, out, err) = tuned
    assert code == 0, err[-3000:]
    md = (root / "report.md").read_text()
    assert " trials run, " in md and "reused from an earlier tune" in md
    winner = next(r for r in rows(root) if r["rank"] == "1")
    summary = read_summary(root / "train")
    assert summary.status == "ok" and summary.steps == 3  # the user's trainer.max_steps
    choices = summary.choices
    assert (choices["precision"], choices["attention"]) == (winner["precision"], winner["attention"])
    assert summary.micro_batch_size == int(winner["micro_batch"])
    assert summary.strategy_applied["activation_checkpointing"] == winner["activation_checkpointing"]


def test_the_budget_stops_the_search(tmp_path):
    tune_cli.main(
        [*BASE, f"tune.dir={tmp_path / 't'}", "tune.budget_minutes=0.01"]
    )  # 0.6 s: one trial at most
    found = rows(tmp_path / "t")
    assert any(r["status"] == "pending" for r in found), found  # not reached within the budget
    assert sum(r["status"] in ("ok", "failed") for r in found) <= 1


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["tune.attentions=[]"], ["tune.attentions is empty"]),
        (["tune.precisions=[fp4]"], ["tune.precisions holds 'fp4'", "precision", "bf16-mixed"]),
        (["LEANEST"], ["no candidate fits", "the planner's cheapest change that fits"]),
    ],
)
def test_bad_input_is_one_line_before_any_trial(overrides, names, tmp_path, capsys):
    if overrides == ["LEANEST"]:  # just under the leanest candidate's predicted peak: nothing fits as it is
        overrides = [f"plan.device_memory_gb={leanest_gb() * 0.95 / 0.9:.6f}"]
    with pytest.raises(SystemExit) as exit_:
        tune_cli.main([*BASE, f"tune.dir={tmp_path / 't'}", *overrides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardlab: error: "), err
    for name in names:
        assert name in err[0]
    assert not (tmp_path / "t").exists()


def test_tensor_parallel_degrees_are_an_axis_with_each_rows_mesh():
    # On 4 ranks the tp strategies are tried at every degree that divides a node's ranks and the model (debug:
    # 4 heads, 1 K/V head under MQA: none), each candidate with its mesh; no trial runs here.
    from launcher.compose import compose_config

    base = ["model=debug", "data=synthetic", "trainer.device=cpu", "trainer.global_batch_size=4",
            "launcher.nproc_per_node=4", "plan.device=cpu", "tune.precisions=[fp32]", "tune.attentions=[sdpa]",
            "tune.activation_checkpointing=[none]", "tune.strategies=[fsdp,tp,fsdp_tp]"]  # fmt: skip
    cfg = compose_config(base)
    assert tune_cli.tp_degrees(cfg, 4) == [2, 4]
    assert tune_cli.tp_degrees(compose_config([*base, "attention=mqa"]), 4) == []
    cands = tune_cli.plan_candidates(base, cfg, 4, "cpu", None)
    found = {
        (o := dict(x.split("=", 1) for x in c.overrides))["strategy"] + o.get("strategy.tp", ""): c
        for c in cands
    }
    assert sorted(found) == ["fsdp", "fsdp_tp2", "fsdp_tp4", "tp2", "tp4"]
    assert found["fsdp_tp2"].mesh == {"shard": 2, "tp": 2} and found["tp4"].mesh == {"tp": 4}
    assert found["fsdp"].status == "pending" and found["tp4"].status == "pending"
    # tp on 4 ranks at degree 2 would leave two groups: pruned with the check's reason
    assert (
        found["tp2"].status == "pruned" and "strategy=tp is one tensor-parallel group" in found["tp2"].reason
    )


def test_pipeline_degrees_and_schedules_are_axes():
    # strategy=pp in tune.strategies: each pipeline degree that divides the world and leaves each stage a block,
    # times each schedule (the interleaved and zero-bubble ones with 2 stages per rank); the checks prune what a
    # schedule cannot run (8 stages of a 4-block model), the planner each candidate's micro-batches. No trial.
    from launcher.compose import compose_config

    base = ["model=debug", "model.n_layers=4", "data=synthetic", "trainer.device=cpu", "trainer.global_batch_size=4",
            "launcher.nproc_per_node=4", "plan.device=cpu", "tune.precisions=[fp32]", "tune.attentions=[sdpa]",
            "tune.activation_checkpointing=[none]", "tune.strategies=[pp]", "tune.pp_schedules=[1f1b,zbv]"]  # fmt: skip
    cands = tune_cli.plan_candidates(base, compose_config(base), 4, "cpu", None)
    over = [dict(x.split("=", 1) for x in c.overrides) for c in cands]
    found = {(o["strategy.pp"], o["strategy.pp_schedule"]): c for c, o in zip(cands, over, strict=True)}
    assert sorted(found) == [("2", "1f1b"), ("2", "zbv"), ("4", "1f1b"), ("4", "zbv")]
    assert "strategy.pp_stages_per_rank=2" in found[("2", "zbv")].overrides
    assert (
        found[("2", "1f1b")].mesh == {"pp": 2, "shard": 2, "tp": 1}
        and found[("2", "1f1b")].status == "pending"
    )
    # 1f1b at pp=4 needs 4 micro-batches of the 4 sequences: micro-batch 1 only
    assert found[("4", "1f1b")].micro_batches == [1] and set(found[("4", "1f1b")].predicted_gb) == {1}
    assert found[("4", "zbv")].status == "pruned" and "makes 8 stages" in found[("4", "zbv")].reason
    with pytest.raises(ValueError, match="tune.pp_schedules holds 'pipedream'"):
        tune_cli.pp_layouts(compose_config([*base, "tune.pp_schedules=[pipedream]"]), 4)


def test_fine_tuning_is_an_axis_and_nf4_needs_adapters():
    # tune.finetunes=[full,lora] x tune.precisions=[fp32,nf4]: full in nf4 is pruned by the check (a frozen 4-bit
    # model has nothing to train), the others planned with the adapters' memory. No trial.
    from launcher.compose import compose_config

    base = ["model=debug", "model.dim=256", "model.multiple_of=128", "data=synthetic", "trainer.device=cpu",
            "trainer.global_batch_size=4", "plan.device=cpu", "tune.precisions=[fp32,nf4]", "tune.attentions=[sdpa]",
            "tune.activation_checkpointing=[none]", "tune.finetunes=[full,lora]"]  # fmt: skip
    cands = tune_cli.plan_candidates(base, compose_config(base), 1, "cpu", None)
    found = {
        (dict(o.split("=", 1) for o in c.overrides)["finetune"], c.overrides[1].split("=")[1]): c
        for c in cands
    }
    assert sorted(found) == [("full", "fp32"), ("full", "nf4"), ("lora", "fp32"), ("lora", "nf4")]
    assert (
        found[("full", "nf4")].status == "pruned" and "nothing would train" in found[("full", "nf4")].reason
    )
    assert all(found[k].status == "pending" for k in (("full", "fp32"), ("lora", "fp32"), ("lora", "nf4")))
    full, lora, qlora = (
        min(found[k].predicted_gb.values()) for k in (("full", "fp32"), ("lora", "fp32"), ("lora", "nf4"))
    )
    assert qlora < lora < full


def test_trials_go_only_to_candidates_predicted_within_the_margin(tmp_path):
    # ddp and tp on 2 processes: the time model (at this machine's calibration, measured here on first use) predicts
    # tp several times slower on the CPU, beyond tune.margin, so only ddp is tried; tp's row gives its prediction.
    root = tmp_path / "t"
    over = [o for o in BASE if not o.startswith(("tune.margin", "launcher.nproc_per_node", "tune.precisions",
                                                  "tune.attentions", "tune.activation_checkpointing"))]  # fmt: skip
    args = [sys.executable, "-m", "commands.tune", *over, "launcher.nproc_per_node=2", "tune.strategies=[ddp,tp]",
            "tune.precisions=[fp32]", "tune.attentions=[flash]", "tune.activation_checkpointing=[none]",
            "tune.margin=0.15", "tune.rounds=1", f"tune.dir={root}"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by = {r["strategy"]: r for r in rows(root)}
    assert by["ddp"]["status"] == "ok" and by["tp"]["status"] == "predicted", by
    ddp_predicted, tp_predicted = float(by["ddp"]["predicted_tps"]), float(by["tp"]["predicted_tps"])
    print(f"predicted tokens/s: ddp {ddp_predicted:,.0f} (measured {float(by['ddp']['tokens_per_s_median']):,.0f}), "
          f"tp {tp_predicted:,.0f} (not tried)")  # fmt: skip
    assert tp_predicted < 0.85 * ddp_predicted
    assert (
        by["tp"]["reason"].startswith("not tried: predicted ")
        and "beyond tune.margin 15%" in by["tp"]["reason"]
    )
    assert [t.name for t in (root / "trials").iterdir()] and all(
        "strategy=tp" not in (t / "overrides.json").read_text() for t in (root / "trials").iterdir()
    )
    report = (root / "report.md").read_text()
    assert "| predicted tokens/s |" in report and "1 not tried (predicted too slow)" in report
