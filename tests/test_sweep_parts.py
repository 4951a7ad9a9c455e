# The sweep's pieces without training: every preset's grid validates, the resume key, wandb naming per
# job, and the report built from job directories on disk (md, csv, png).
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf

from launcher import report
from launcher.compose import config_dir, setup_hydra
from launcher.elastic import resolve_nproc
from launcher.sweep import config_key, fill_sweep_logger, swept_keys
from tests.helpers.reports import assert_png, csv_rows, md_rows
from tests.helpers.run import compose_config
from trainer.checks import validate
from trainer.precision import FULL_TRAINING

PRESETS = sorted(p.stem for p in (Path(config_dir()) / "sweep").glob("*.yaml"))


# ---------------------------------------------------------------- presets, composed (no training)
def compose_with_hydra(*overrides: str):
    setup_hydra()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_cell_validates(preset):
    # +sweep=<preset> together with sweep.resume=true; then every cell of its grid passes the checks
    # launcher.main runs before starting workers, at the world size the preset asks for.
    cfg = compose_with_hydra(f"+sweep={preset}", "sweep.resume=true")
    assert cfg.sweep.resume is True and cfg.sweep.resume_dir == "multirun"
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params and all(len(v) > 1 for v in params.values())
    # The precisions preset lists every precision that trains every weight (nf4 freezes its base: finetune=lora);
    # the others compare fp32 with bf16-mixed.
    expected = set(FULL_TRAINING) if preset == "precisions" else {"fp32", "bf16-mixed"}
    assert set(params.get("precision", expected)) == expected
    for cell in itertools.product(*params.values()):
        cell_cfg = compose_config(
            f"+sweep={preset}", *(f"{k}={v}" for k, v in zip(params, cell, strict=True)), tiny=False
        )
        world = resolve_nproc(cell_cfg.launcher.nproc_per_node) * cell_cfg.launcher.nnodes
        if cell_cfg.strategy.name != "single":
            assert world > 1, f"{preset}: {cell} runs a multi-rank strategy on one process"
        validate(cell_cfg, world, "cpu")


def test_cpu_preset_is_sized_for_make_sweep():
    cfg = compose_config("+sweep=cpu", tiny=False)
    params = compose_with_hydra("+sweep=cpu").hydra.sweeper.params
    jobs = 1
    for v in params.values():
        jobs *= len(str(v).split(","))
    assert 8 <= jobs <= 12 and cfg.model.name == "debug" and cfg.data.name == "synthetic"
    assert cfg.launcher.nproc_per_node == "2" and cfg.trainer.max_steps <= 30 and cfg.trainer.seq_len <= 64


# ---------------------------------------------------------------- the pieces, in-process
def test_config_key_ignores_where_and_how_a_job_runs():
    base = OmegaConf.to_container(compose_config("strategy=ddp"), resolve=True)
    moved = json.loads(json.dumps(base))
    moved.update(run_dir="/elsewhere", choices={}, sweep={"resume": True, "resume_dir": "x"})
    moved["launcher"]["nproc_per_node"] = "4"
    moved["logger"]["name"] = "wandb"
    moved["trainer"]["progress_bar"] = not moved["trainer"]["progress_bar"]
    assert config_key(moved) == config_key(base)
    moved["optim"]["lr"] = 1e-3
    assert config_key(moved) != config_key(base)


def test_fill_sweep_logger_keeps_what_the_user_set(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    multirun = {
        "hydra": {
            "sweeper": {"params": {"strategy": "ddp,fsdp"}},
            "overrides": {"task": ["+sweep=cpu", "precision=fp32,bf16-mixed", "strategy=ddp"]},
        }
    }
    (sweep_dir / "multirun.yaml").write_text(json.dumps(multirun))  # JSON is YAML
    assert swept_keys(sweep_dir) == {
        "precision"
    }  # the command line's strategy=ddp replaced the preset's axis
    hc = SimpleNamespace(
        mode=RunMode.MULTIRUN,
        sweep=SimpleNamespace(dir=str(sweep_dir)),
        overrides=SimpleNamespace(task=["strategy=ddp", "precision=bf16-mixed", "+sweep=cpu"]),
        job=SimpleNamespace(override_dirname="unused", num=1),
    )
    cfg = compose_config("logger=wandb", "strategy=ddp", "precision=bf16-mixed")
    fill_sweep_logger(cfg, hc)
    assert cfg.logger.group == str(sweep_dir) and cfg.logger.run_name == "precision=bf16-mixed"
    assert "strategy=ddp" in cfg.logger.tags and "precision=bf16-mixed" in cfg.logger.tags

    cfg = compose_config("logger=wandb", "logger.group=mine", "logger.run_name=me", "logger.tags=[a]")
    fill_sweep_logger(cfg, hc)
    assert (cfg.logger.group, cfg.logger.run_name, list(cfg.logger.tags)) == ("mine", "me", ["a"])
    hc.mode = RunMode.RUN
    cfg = compose_config("logger=wandb")
    fill_sweep_logger(cfg, hc)  # a single run is left alone
    assert cfg.logger.group is None and cfg.logger.run_name is None


def fake_job(job_dir: Path, summary: dict | None, overrides: list[str], batch=8, seq_len=64, steps=None):
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    config = {
        "trainer": {"global_batch_size": batch, "seq_len": seq_len, "max_steps": 20},
        "metrics": {"warmup_steps": 3},
    }
    (job_dir / "config.yaml").write_text(json.dumps(config))
    if steps:
        (job_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))
    if summary is not None:
        (job_dir / "summary.json").write_text(json.dumps({"run_dir": str(job_dir), **summary}))


def ok_summary(tps: float, mem: float, loss: float, tokens_per_step: int = 512) -> dict:
    return {
        "status": "ok", "steps": 20, "warmup_steps": 3, "world_size": 2, "tokens_per_step": tokens_per_step,
        "tokens_per_s_median": tps, "tokens_per_s_p10": tps * 0.9, "tokens_per_s_p90": tps * 1.1,
        "tokens_per_s_per_device": tps / 2, "tflops_per_device": tps * 1e-6, "mfu": None,
        "memory_kind": "cpu_peak_rss", "peak_rss_gb_max": mem, "final_loss": loss,
    }  # fmt: skip


def test_report_from_disk_flags_unequal_work_and_names_failures(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # job 0 skipped steps for a non-finite loss (trainer.on_nonfinite=skip) and still ended well: its row says so
    fake_job(
        sweep / "0", {**ok_summary(1000.0, 0.5, 5.0), "nonfinite_skipped_steps": 2}, ["trainer.seq_len=64"]
    )
    fake_job(sweep / "1", ok_summary(3000.0, 0.9, 4.9, 1024), ["trainer.seq_len=128"], seq_len=128)
    oom = {
        "status": "failed",
        "error": "rank 1 failed (exit code 1): torch.OutOfMemoryError: CUDA out of memory.",
    }
    fake_job(sweep / "2", oom, ["trainer.seq_len=4096"], seq_len=4096, steps=[10, 12])
    fake_job(sweep / "10", None, ["trainer.seq_len=256"], seq_len=256)  # killed before any summary

    assert report.main([str(sweep)]) == 0
    assert "report of 4 jobs (2 failed)" in capsys.readouterr().out
    rows = csv_rows(sweep)
    assert [r["trainer.seq_len"] for r in rows] == ["128", "64", "4096", "256"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert rows[1]["reason"] == "non-finite loss at 2 step(s), skipped"
    assert rows[2]["reason"] == "out of memory after step 12"
    assert rows[3]["reason"].startswith("no summary.json")
    md = (sweep / "report.md").read_text()
    assert "**Unequal work:**" in md.split("| #")[0]  # above the table, not in a footnote
    assert "(512, 1,024, 2,048, 32,768)" in md and "| tokens/step |" in md
    assert "MemTracker" not in md  # no job measured its step: neither the column nor its note
    table = md_rows(sweep)
    assert "**3,000**" in table[0] and "**4.9000**" in table[0] and "**0.500**" in table[1]  # best per column
    assert "ok: non-finite loss at 2 step(s), skipped" in table[1]
    assert "failed: out of memory after step 12" in table[2]
    assert_png(sweep / "report.png")
    assert report.main([str(tmp_path / "nothing")]) == 2


def test_report_marks_emulated_precisions(tmp_path):
    # fp8 off CUDA runs fp8's numerics in high precision: its row must not read as fp8's speed.
    sweep = tmp_path / "sweep"
    fp8 = {**ok_summary(1000.0, 0.5, 5.0), "choices": {"precision": "fp8"}, "emulated": True}
    fp32 = {**ok_summary(3000.0, 0.5, 5.0), "choices": {"precision": "fp32"}, "emulated": False}
    fake_job(sweep / "0", fp8, ["precision=fp8"])
    fake_job(sweep / "1", fp32, ["precision=fp32"])
    assert report.main([str(sweep)]) == 0
    assert [r["precision"] for r in csv_rows(sweep)] == ["fp32", "fp8 (emulated)"]
    assert "| fp8 (emulated) |" in (sweep / "report.md").read_text()
