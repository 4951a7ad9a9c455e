# The README's bad-input table, one case per row: each bad input gives one clear message, before any worker
# starts, and damages nothing already saved (the checkpoints the checkpoint rows point at are hashed before
# and after). The distinct ways a bad input reaches the user run through the real CLI (Hydra's composition
# errors, the output dir checked before Hydra, the launcher's GPU count, one of validate()'s checks), with
# exit code 2 and one line on stderr; every other row is one of validate()'s checks, which the CLI reports
# the same way, and is checked in-process.
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commands import export
from launcher.errors import describe_error
from tests.helpers.cli import cli_args, cli_env, finish, start
from tests.helpers.run import REPO, compose_config, train_in_process
from trainer.checks import validate

pytestmark = pytest.mark.slow

# row: (overrides, run dir or None for <tmp>/run, what the message must name[, environment variables to add]).
# {tmp}: the row's own tmp dir,
# {ckpt}: a directory of checkpoints made by the fixture, {file}: a regular file.
CLI_ROWS = {
    # Composition errors, which Hydra would report over several lines (launcher/errors.py condenses them).
    "unknown_option": (
        ["model=nope"],
        None,
        ["model=nope is not an option of model", "choose one of debug, gpt2_124m, gpt2_debug", "llama_20m"],
    ),
    "unknown_key": (
        ["trainer.max_stepz=3"],
        None,
        ["trainer.max_stepz is not a key of trainer", "max_steps"],
    ),
    "wrong_type": (["trainer.max_steps=abc"], None, ["trainer.max_steps=abc", "'abc'", "Integer"]),
    "bad_syntax": (["trainer.max_steps=[1"], None, ["cannot parse the override 'trainer.max_steps=[1'"]),
    # Checked before Hydra makes the run dir, and by the launcher before it validates.
    "output_dir": ([], "{file}/run", ["hydra.run.dir={file}/run", "{file} is a file, not a directory"]),
    "nproc_gpus": (
        ["strategy=ddp", "launcher.nproc_per_node=2", "trainer.device=cuda"],
        None,
        ["launcher.nproc_per_node=2", "no GPU is present (0 GPUs)"],
    ),
    # One of validate()'s checks through the CLI: every row of CHECK_ROWS is reported this way.
    "kv_heads": (["attention.n_kv_heads=3"], None, ["model.n_heads (4)", "K/V head count (3"]),
    # An option of another strategy: Hydra's composition error, condensed.
    "tp_on_ddp": (["strategy=ddp", "strategy.tp=2"], None, ["strategy.tp is not a key of strategy", "bucket_cap_mb"]),
    # A pipeline schedule torch does not have, through the CLI on 2 ranks.
    "pp_schedule": (["strategy=pp", "strategy.pp_schedule=pipedream", "launcher.nproc_per_node=2"], None,
                    ["unknown strategy.pp_schedule 'pipedream'", "gpipe, 1f1b, interleaved_1f1b"]),
    # A pod whose operator's variables contradict the config (trainer/environments.py), before any worker starts.
    "pod_nproc": (
        ["launcher.nproc_per_node=4"],
        None,
        ["launcher.nproc_per_node=4, but the pod's PET_NPROC_PER_NODE=2"],
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "WORLD_SIZE": "4", "RANK": "0", "PET_NNODES": "2",
         "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "2"},
    ),
}  # fmt: skip

CHECK_ROWS = {
    "added_key": (["+trainer.max_step=3"], 1, ["trainer.max_step is not a key of trainer", "max_steps"]),
    "dim_heads": (["model.n_heads=3"], 1, ["model.dim (128)", "model.n_heads (3)"]),
    "seq_len": (["trainer.seq_len=1024"], 1, ["trainer.seq_len (1024)", "model.max_seq_len = 512"]),
    # No GPU here: trainer.device=cuda is what this machine cannot run (the fp8 capability rule for a GPU
    # older than 8.9 is checked below, as if on an A100).
    "precision": (["precision=fp8", "trainer.device=cuda"], 1, ["trainer.device=cuda", "no CUDA GPU"]),
    "hsdp_shard": (
        ["strategy=hsdp", "strategy.shard_size=3", "trainer.global_batch_size=4"],
        2,
        ["strategy.shard_size=3", "does not divide the world size 2"],
    ),
    "static_graph_accum": (
        [
            "strategy=ddp",
            "strategy.static_graph=true",
            "trainer.global_batch_size=4",
            "trainer.micro_batch_size=1",
        ],
        2,
        ["strategy.static_graph=true", "gradient accumulation (2 micro-batches of 1 per rank)"],
    ),
    "bucket_size": (
        ["strategy=ddp", "strategy.bucket_cap_mb=-1"],
        2,
        ["strategy.bucket_cap_mb must be at least 1"],
    ),
    "data_path": (
        ["data=text", "data.path={tmp}/no-such-dir"],
        1,
        ["data.path", "no-such-dir", "does not exist"],
    ),
    "checkpoint_dir": (
        ["checkpoint=periodic", "checkpoint.dir={file}/ckpt"],
        1,
        ["checkpoint directory {file}/ckpt cannot be created", "{file} is a file", "checkpoint.dir"],
    ),
    "corrupt_checkpoint": (
        ["checkpoint.resume={ckpt}/corrupt"],
        1,
        ["checkpoint {ckpt}/corrupt cannot be read", "UnpicklingError"],
    ),
    "truncated_checkpoint": (
        ["checkpoint.resume={ckpt}/truncated"],
        1,
        ["checkpoint {ckpt}/truncated is incomplete", "__0_0.distcp is 4096 bytes, short of the"],
    ),
    "incompatible_model": (
        ["checkpoint.resume={ckpt}/good", "model.dim=64"],
        1,
        [
            "checkpoint {ckpt}/good does not match this model",
            "tok_embeddings.weight is [256, 128] there, [256, 64] here",
        ],
    ),
    # Checkpoint settings that would otherwise fail late or silently.
    "missing_checkpoint": (
        ["checkpoint.resume={tmp}/no-such-checkpoint"],
        1,
        ["checkpoint.resume=", "no-such-checkpoint", "is not a checkpoint"],
    ),
    "checkpoint_at_max_steps": (
        ["checkpoint.resume={ckpt}/good"],
        1,
        ["checkpoint {ckpt}/good is already at step 3", "trainer.max_steps=3"],
    ),
    "restarts_without_checkpoints": (
        ["strategy=ddp", "trainer.global_batch_size=4", "launcher.max_restarts=1"],
        2,
        ["launcher.max_restarts=1", "checkpoint.every_n_steps=0", "checkpoint=periodic"],
    ),
    "on_nonfinite": (["trainer.on_nonfinite=ignore"], 1, ["trainer.on_nonfinite", "'ignore'", "error, skip"]),
    # Tensor parallelism: a degree the world, a node or the model cannot take, or a combination it cannot run.
    "tp_world": (["strategy=tp", "strategy.tp=4"], 2, ["strategy.tp=4 does not divide the world size 2"]),
    "tp_heads": (["strategy=fsdp_tp", "strategy.tp=3", "trainer.global_batch_size=2"], 6,
                 ["strategy.tp=3 does not divide model.n_heads (query heads) (4)"]),
    "tp_kv_heads": (["strategy=tp", "attention=mqa"], 2, ["strategy.tp=2 does not divide the K/V head count (1)"]),
    "tp_groups": (["strategy=tp", "strategy.tp=2", "trainer.global_batch_size=4"], 4,
                  ["strategy=tp is one tensor-parallel group", "use strategy=fsdp_tp"]),
    "tp_no_plan": (["strategy=tp", "model=gpt2_debug"], 2, ["cannot split this model", "GPT-2 fuses q, k and v"]),
    "tp_hf_sp": (["strategy=tp", "model=hf_llama_debug"], 2, ["strategy.sequence_parallel=true with model=hf"]),
    "tp_int8": (["strategy=tp", "precision=int8"], 2, ["precision=int8 with strategy=tp", "aten._int_mm"]),
    "tp_compile": (["strategy=tp", "strategy.compile=true"], 2, ["strategy=tp with strategy.compile=true fails"]),
    "tp_compile_ac": (
        ["strategy=fsdp_tp", "strategy.compile=true", "strategy.activation_checkpointing=full",
         "trainer.global_batch_size=4"],
        4,
        ["strategy.compile=true and strategy.activation_checkpointing=full fails"],
    ),
    # Pipeline parallelism (the debug model has 5 blocks): stages the model cannot fill, a split that is not the
    # model's, micro-batches the schedule cannot use, a model it cannot split, what its schedules cannot run.
    "pp_stages": (["strategy=pp", "strategy.pp=2", "strategy.pp_schedule=interleaved_1f1b", "strategy.pp_stages_per_rank=3",
                   "trainer.global_batch_size=4"], 2, ["makes 6 stages, more than the model's 5 blocks"]),
    "pp_split": (["strategy=pp", "strategy.pp_split=[3,3]"], 2, ["strategy.pp_split=[3, 3]", "summing to 5"]),
    "pp_micro": (["strategy=pp", "trainer.global_batch_size=2", "trainer.micro_batch_size=2"], 2,
                 ["strategy.pp_schedule=1f1b needs at least 2 micro-batches (one per stage rank), got 1"]),
    "pp_rounds": (["strategy=pp", "strategy.pp_schedule=interleaved_1f1b", "strategy.pp_stages_per_rank=2",
                   "trainer.global_batch_size=5"], 2, ["divides into rounds of 2 (a multiple of 2)", "got 5"]),
    "pp_microbatches": (["strategy=pp", "trainer.micro_batch_size=2", "strategy.pp_microbatches=4"], 2,
                        ["strategy.pp_microbatches=4 but the batch layout makes", "set trainer.micro_batch_size="]),
    "pp_per_rank": (["strategy=pp", "strategy.pp_schedule=zbv"], 2,
                    ["strategy.pp_schedule=zbv runs 2 stage(s) per rank, not 1", "strategy.pp_stages_per_rank=2"]),
    "pp_world": (["strategy=pp", "strategy.pp=3"], 2, ["strategy.pp=3 does not divide the world size 2"]),
    "pp_gpt2": (["strategy=pp", "model=gpt2_debug"], 2, ["cannot split this model into stages", "(tied)"]),
    "pp_hf": (["strategy=pp", "model=hf_llama_debug"], 2, ["cannot split this model into stages", "renumber its blocks"]),
    "pp_tied": (["strategy=pp", "model.tie_embeddings=true"], 2, ["model.tie_embeddings=true with pipeline parallelism"]),
    "pp_fp16": (["strategy=pp", "precision=fp16-mixed"], 2, ["precision=fp16-mixed with strategy=pp", "bf16-mixed"]),
}  # fmt: skip
PARALLEL = 8  # CLI processes at once: each fails before training


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # A real 3-step checkpoint (model=debug, as every row trains), a copy whose .metadata is garbage and one
    # whose shard file was cut short.
    root = tmp_path_factory.mktemp("checkpoints")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_in_process(compose_config("checkpoint=periodic", "checkpoint.every_n_steps=3"), root / "run")
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(root / "run" / "checkpoints" / "step_00000003", root / "good")
    shutil.copytree(root / "good", root / "corrupt")
    (root / "corrupt" / ".metadata").write_bytes(b"\x0bnot a pickle" * 100)
    shutil.copytree(root / "good", root / "truncated")
    with open(root / "truncated" / "__0_0.distcp", "r+b") as f:
        f.truncate(4096)
    return root


@pytest.fixture(scope="module")
def failures(tmp_path_factory, ckpt, afile):
    # {row: (tmp, exit code, stdout, stderr, checkpoint digest before, after)}
    before = _digest(ckpt)
    results, running = {}, []
    for row, (overrides, run_dir, _, *env) in CLI_ROWS.items():
        tmp = tmp_path_factory.mktemp(row)
        fill = {"tmp": tmp, "ckpt": ckpt, "file": afile}
        args = cli_args(
            tmp, *(o.format(**fill) for o in overrides), run_dir=run_dir.format(**fill) if run_dir else None
        )
        running.append((row, tmp, start(args, env={**cli_env(), **(env[0] if env else {})})))
        if len(running) == PARALLEL:
            row, tmp, proc = running.pop(0)
            results[row] = (tmp, *finish(proc))
    for row, tmp, proc in running:
        results[row] = (tmp, *finish(proc))
    return results, before, _digest(ckpt), afile, ckpt


@pytest.fixture(scope="module")
def afile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("file") / "afile"
    path.write_text("a regular file where a directory is expected\n")
    return path


@pytest.mark.parametrize("row", CLI_ROWS)
def test_one_clear_line_before_any_worker_starts(failures, row):
    results, before, after, afile, ckpt = failures
    tmp, code, out, err = results[row]
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardlab: error: "), err
    for name in CLI_ROWS[row][2]:
        assert name.format(tmp=tmp, ckpt=ckpt, file=afile) in lines[0], lines[0]
    # The launcher says "run directory" only once the checks passed and workers are about to start.
    assert "run directory" not in out, out
    assert not (tmp / "run" / "metrics.jsonl").exists()
    assert not (tmp / "run" / "checkpoints").exists()
    # Nothing already saved is damaged: the checkpoints (good, corrupt, truncated) are byte-identical.
    assert after == before
    assert afile.read_text() == "a regular file where a directory is expected\n"


@pytest.mark.parametrize("row", CHECK_ROWS)
def test_checks_name_the_fix_and_touch_nothing(ckpt, afile, tmp_path, row):
    overrides, world, names = CHECK_ROWS[row]
    fill = {"tmp": tmp_path, "ckpt": ckpt, "file": afile}
    before = _digest(ckpt)
    with pytest.raises(ValueError) as info:
        validate(compose_config(*(o.format(**fill) for o in overrides)), world, "cpu")
    line = describe_error(info.value)  # what the CLI prints after "shardlab: error: "
    assert "\n" not in line
    for name in names:
        assert name.format(**fill) in line, line
    assert _digest(ckpt) == before and list(tmp_path.iterdir()) == []
    assert afile.read_text() == "a regular file where a directory is expected\n"


def test_hydra_full_error_still_gives_hydras_traceback(tmp_path):
    # A user who sets HYDRA_FULL_ERROR=1 asked for Hydra's own report with the stack, not our one line.
    proc = subprocess.run(
        [sys.executable, "train.py", "model=nope", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env={**cli_env(), "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "Could not find 'model/nope'" in proc.stderr
    assert "shardlab: error" not in proc.stderr


def test_fp8_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    # The precision rule a GPU machine hits, checked as if this machine had an A100 (capability 8.0, bf16).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with pytest.raises(ValueError, match=r"precision=fp8 needs fp8 tensor cores.*this GPU is 8\.0"):
        validate(compose_config("precision=fp8", "trainer.device=auto"), 1, "cuda", (8, 0))


def test_export_of_a_corrupt_checkpoint_fails_in_one_line(ckpt, tmp_path, capsys):
    # commands.export's command line (its success path runs as a subprocess in tests/test_checkpoint.py).
    with pytest.raises(SystemExit) as exit_:
        export.main([str(ckpt / "corrupt"), str(tmp_path / "m.pt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().startswith(f"shardlab: error: checkpoint {ckpt / 'corrupt'} cannot be read")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()
