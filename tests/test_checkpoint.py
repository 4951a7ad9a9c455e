# Checkpoints end to end: exact resume (bit-for-bit, fp32 on CPU) under single, ddp, fsdp and hsdp; a
# checkpoint from 2 fsdp ranks resumed under single and ddp, and a single one under fsdp (DCP reshards);
# pruning; export to one file; loading never runs pickled code; a save killed mid-write; a worker killed
# under launcher.max_restarts; NaN losses. The 2-rank runs share one process group (tests/dist_helpers.py).
import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from commands.export import consolidated_model_state, export
from models import build_model
from tests.helpers import dist as dist_helpers
from tests.helpers.cli import cli_env, start_cli, workers
from tests.helpers.run import REPO, TINY, compose_config, read_rows, read_summary, train_in_process
from trainer import checkpoint, checkpoint_io
from trainer.checks import model_args, validate
from trainer.data import build_data, micro_batches
from trainer.dist import close_distributed, init_distributed
from trainer.loop import NonFiniteLoss, train
from trainer.summary import RunSummary

pytestmark = pytest.mark.slow

STEPS, HALF = 10, 5
# fp32 on real text with warm-up then cosine decay, so the resumed half must pick up the schedule too.
BASE = (
    "precision=fp32",
    "trainer.global_batch_size=4",
    f"trainer.max_steps={STEPS}",
    "optim.lr=3e-3",
    "optim.warmup_steps=3",
)
SAVE = ("checkpoint=periodic", f"checkpoint.every_n_steps={HALF}")
STRATEGIES = {
    "single": ("strategy=single",),
    "ddp": ("strategy=ddp",),
    "fsdp": ("strategy=fsdp",),
    "hsdp": ("strategy=hsdp", "strategy.shard_size=1"),  # 2 replicas of 1 shard: a 2-D mesh
}
# Saved under fsdp on 2 ranks, then exported to Hugging Face format: a native Llama with GQA and tied
# embeddings, GPT-2, and a transformers Llama (model=hf).
EXPORT = ("strategy=fsdp", "trainer.max_steps=2", "checkpoint=periodic", "checkpoint.save_final=true")
EXPORTS = {
    "export-llama": ("model=debug", "attention=gqa", "model.tie_embeddings=true"),
    "export-gpt2": ("model=gpt2_debug",),
    "export-hf": ("model=hf_llama_debug",),
}
RESTART = ("strategy=ddp", "trainer.max_steps=12", "trainer.global_batch_size=4")  # the killed CLI run's
TIMEOUT = 240


def _at(out: Path, name: str, step: int) -> Path:
    return checkpoint.step_dir(out / name / "checkpoints", step)


def _config(corpus: Path, *overrides: str, base: tuple[str, ...] = BASE) -> dict:
    cfg = compose_config("data=text", f"data.path={corpus}", *base, *overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def _train_single(out: Path, name: str, container: dict) -> RunSummary:
    cfg = OmegaConf.create(container)
    cfg.run_dir = str(out / name)
    (out / name).mkdir()
    env = init_distributed("cpu", need_group=False)
    summary = train(cfg, env, out / name, model_args(cfg))
    close_distributed(env)
    return summary


def _jobs(corpus: Path, out: Path, strategy: str) -> list[tuple[str, dict]]:
    # 10 steps saving at 5 and 10 (single: every step, keeping 6, so pruning must leave exactly steps 5-10);
    # steps 6-10 resumed from that step-5 checkpoint in a new run dir. Single also runs 10 steps straight
    # without saving: saving changes nothing (a save is the same under every strategy: DCP's).
    every = ("checkpoint=periodic", "checkpoint.every_n_steps=1", "checkpoint.keep_last=6")
    resume = f"checkpoint.resume={_at(out, f'{strategy}-saved', HALF)}"
    straight = (
        [(f"{strategy}-straight", _config(corpus, *STRATEGIES[strategy]))] if strategy == "single" else []
    )
    return straight + [
        (
            f"{strategy}-saved",
            _config(corpus, *STRATEGIES[strategy], *(every if strategy == "single" else SAVE)),
        ),
        (f"{strategy}-resumed", _config(corpus, *STRATEGIES[strategy], resume)),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus):
    # -> (out, {name: rank 0's summary}): _jobs for each strategy, the cross-strategy resumes and the reference
    # for the killed-worker test. Single runs in this process, the others in one 2-rank group.
    out = tmp_path_factory.mktemp("ckpt")
    from_fsdp = f"checkpoint.resume={_at(out, 'fsdp-saved', HALF)}"
    from_single = f"checkpoint.resume={_at(out, 'single-saved', HALF)}"
    group = [job for s in ("ddp", "fsdp", "hsdp") for job in _jobs(text_corpus, out, s)]
    group += [
        ("ddp-from-fsdp", _config(text_corpus, "strategy=ddp", from_fsdp)),
        ("fsdp-from-single", _config(text_corpus, "strategy=fsdp", from_single)),
        ("restart-reference", OmegaConf.to_container(compose_config(*RESTART), resolve=True)),
    ]
    group += [(name, _config(text_corpus, *EXPORT, *o)) for name, o in EXPORTS.items()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summaries = {name: _train_single(out, name, c) for name, c in _jobs(text_corpus, out, "single")}
        results = dist_helpers.launch(dist_helpers.run_jobs, [("train", n, c) for n, c in group], str(out))
        summaries.update(results[0])
        summaries["single-from-fsdp"] = _train_single(
            out, "single-from-fsdp", _config(text_corpus, from_fsdp)
        )
    finally:
        torch.set_num_threads(threads)
    return out, summaries


def _losses(out: Path, name: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_rows(out / name)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exact_resume(runs, strategy):
    out, summaries = runs
    straight = _losses(out, f"{strategy}-saved")  # the uninterrupted run, saving as it goes
    resumed = _losses(out, f"{strategy}-resumed")
    assert sorted(straight) == list(range(1, STEPS + 1))
    assert straight[1] - straight[STEPS] > 0.3, straight  # the loss moves, so a wrong state would show
    if strategy == "single":
        assert _losses(out, "single-straight") == straight  # saving changes nothing
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    # fp32 on CPU: bit-for-bit, not approximately
    assert resumed == {s: loss for s, loss in straight.items() if s > HALF}
    summary = summaries[f"{strategy}-resumed"]
    assert summary.resumed_from == str(_at(out, f"{strategy}-saved", HALF))
    assert summary.final_loss == straight[STEPS]
    assert [p.name for p in sorted((out / f"{strategy}-saved" / "checkpoints").iterdir())][
        -1
    ] == "step_00000010"


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("single-from-fsdp", "fsdp-resumed"),
        ("ddp-from-fsdp", "fsdp-resumed"),
        ("fsdp-from-single", "single-resumed"),
    ],
)
def test_resharding(runs, name, reference):
    # A checkpoint written as 2 ranks' shards (or by one process) loads under another layout: the next step's
    # loss is what continuing under the saving strategy gives (up to the reduction order).
    out, summaries = runs
    here, there = _losses(out, name), _losses(out, reference)
    assert summaries[name].resumed_from == summaries[reference].resumed_from
    assert summaries[name].world_size == (1 if name.startswith("single") else 2)
    assert here[HALF + 1] == pytest.approx(there[HALF + 1], rel=1e-6, abs=0)
    for step in range(HALF + 1, STEPS + 1):
        assert here[step] == pytest.approx(there[step], rel=1e-5, abs=0), (step, here, there)


def test_fp16_loss_scale_is_checkpointed(tmp_path, text_corpus):
    # fp16-mixed starts at a loss scale of 65536 and halves it on every step whose gradients overflow (the
    # step is skipped). A resumed run goes on at the scale it had reached: started over at 65536 it would skip
    # steps the straight run took, and its losses would part from the straight run's.
    # lr 0.1: large enough that a step overflows (and the scale halves) before the save at step 5.
    fp16 = (*(o for o in BASE if o.split("=")[0] not in ("precision", "optim.lr", "optim.warmup_steps")),)
    fp16 += ("precision=fp16-mixed", "optim.lr=0.1", "optim.warmup_steps=0")
    straight = _train_single(tmp_path, "saved", _config(text_corpus, *SAVE, base=fp16))  # and uninterrupted
    resume = f"checkpoint.resume={_at(tmp_path, 'saved', HALF)}"
    resumed = _train_single(tmp_path, "resumed", _config(text_corpus, resume, base=fp16))
    scale = straight.precision_applied["loss_scale"]
    at_save = checkpoint_io.read_train_state(
        _at(tmp_path, "saved", HALF), {"loss_scale": torch.zeros((), dtype=torch.float64)}
    )
    assert at_save["loss_scale"] < 65536  # the scale had moved before the save
    straight_losses, resumed_losses = _losses(tmp_path, "saved"), _losses(tmp_path, "resumed")
    assert resumed_losses == {s: loss for s, loss in straight_losses.items() if s > HALF}
    assert resumed.precision_applied["loss_scale"] == scale


def test_keep_last_prunes_and_leaves_no_temporaries(runs):
    out, _ = runs
    names = sorted(p.name for p in (out / "single-saved" / "checkpoints").iterdir())
    assert names == [f"step_{s:08d}" for s in range(5, 11)]  # saved every step, keep_last=6


@pytest.mark.parametrize("name", EXPORTS)
def test_hugging_face_export_loads_with_the_same_logits_and_trains_again(runs, tmp_path, text_corpus, name):
    # A checkpoint saved under fsdp on 2 ranks -> a Hugging Face directory that transformers loads with no
    # missing or unexpected keys and the same logits as the native model; then model=hf trains it again,
    # starting at the native checkpoint's loss on the same batch.
    from transformers import AutoModelForCausalLM

    out, _ = runs
    ckpt = _at(out, name, 2)
    target = export(str(ckpt), str(tmp_path / "hf"))
    hf, info = AutoModelForCausalLM.from_pretrained(target, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = OmegaConf.create(_config(text_corpus, *EXPORT, *EXPORTS[name]))
    native = build_model(model_args(cfg))
    native.load_state_dict(consolidated_model_state(ckpt), strict=True)
    data = build_data(cfg.data, cfg.trainer.seq_len, cfg.trainer.seed, native.args.vocab_size)
    ((x, y),) = micro_batches(data, 1, 0, 1, cfg.trainer.global_batch_size, 1)
    with torch.no_grad():
        ours = native(x)
        torch.testing.assert_close(hf.eval()(input_ids=x).logits, ours, atol=1e-5, rtol=1e-5)
    again = _config(text_corpus, "model=hf", f"model.name_or_path={target}", "trainer.max_steps=1")
    summary = _train_single(tmp_path, "again", again)
    assert summary.first_loss == pytest.approx(
        F.cross_entropy(ours.flatten(0, 1), y.flatten()).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="already exists and is not empty.*--overwrite"):
        export(str(ckpt), str(target))
    assert export(str(ckpt), str(target), overwrite=True) == target


def test_export_consolidates_shards_into_one_file(runs, tmp_path, text_corpus):
    # The fsdp checkpoint is two ranks' shards; one command turns it into one safetensors file (and a plain
    # state dict). Loaded into a fresh single-process model, it gives step 6 the loss fsdp gave it.
    out, _ = runs
    src = _at(out, "fsdp-saved", HALF)
    target = tmp_path / "model.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "commands.export", str(src), str(target)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"shardlab: wrote {target}"
    tensors = load_file(str(target))
    plain = torch.load(export(str(src), str(tmp_path / "model.pt")), weights_only=True)
    assert plain.keys() == tensors.keys()
    assert all(torch.equal(plain[k], tensors[k]) for k in plain)

    cfg = OmegaConf.create(_config(text_corpus))
    args = validate(cfg, 1, "cpu")
    model = build_model(args)
    model.load_state_dict(tensors, strict=True)
    data = build_data(cfg.data, cfg.trainer.seq_len, cfg.trainer.seed, args.vocab_size)
    ((x, y),) = micro_batches(data, HALF + 1, 0, 1, cfg.trainer.global_batch_size, 1)
    with torch.no_grad():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert loss == pytest.approx(_losses(out, "fsdp-resumed")[HALF + 1], rel=1e-5)

    code = subprocess.run(
        [sys.executable, "-m", "commands.export", str(tmp_path / "nothing"), str(target)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert code.returncode == 2 and code.stderr.startswith("shardlab: error: "), code.stderr


class _Marker:
    # Unpickling this runs code: it creates the directory.
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_loading_never_runs_pickled_code(tmp_path):
    # torch.load(weights_only=True) for DCP's items (its default planner uses weights_only=False), and an
    # allow-list for its .metadata pickle.
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil"
    dcp.save({"train": {"step": _Marker(marker), "last_epoch": 0}}, checkpoint_id=ckpt, no_dist=True)
    with pytest.raises(ValueError, match="cannot be read.*(?i:weights.only)"):
        checkpoint_io.read_train_state(ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(ValueError, match="not allowed in a checkpoint's metadata"):
        checkpoint_io.read_shapes(ckpt)
    assert not marker.exists()


# ---------------------------------------------------------------- processes killed, losses that blow up
def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"never saw {what} (exit code {proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.002)
    return found


def _listing(root: Path) -> set[str]:
    try:
        return set(os.listdir(root))
    except FileNotFoundError:
        return set()


def _save_begun(root: Path) -> bool:
    # step 1 is complete and the step-2 save has begun writing its files
    return "step_00000001" in _listing(root) and bool(_listing(root / ".tmp-step_00000002"))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    # SIGKILL as soon as the step-2 save has begun writing its shard (llama_20m with AdamW state: ~250 MB),
    # so its files are half-written under .tmp-step_00000002. A larger model if the save won the race.
    for attempt, model in enumerate((("model=llama_20m",), ("model=llama_20m", "model.n_layers=16"))):
        run_dir = tmp_path / f"run{attempt}"
        root = run_dir / "checkpoints"
        save = ("checkpoint=periodic", "checkpoint.every_n_steps=1", "trainer.max_steps=3")
        proc = start_cli(tmp_path, *model, *save, run_dir=str(run_dir))
        _wait_for(lambda r=root: _save_begun(r), proc, "the step-2 save begin")
        proc.kill()
        proc.communicate()
        if "step_00000002" not in _listing(root):
            break
    else:
        pytest.fail("the step-2 save completed before the kill every time")
    assert _listing(root) == {"step_00000001", ".tmp-step_00000002"}
    before = _digest(root / "step_00000001")
    checkpoint_io.verify(root / "step_00000001")
    # resume=auto (the default) in the same run dir takes step 1 and ignores the half-written save.
    proc = start_cli(tmp_path, *model, "trainer.max_steps=2", run_dir=str(run_dir))
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    assert f"shardlab: resumed from {root / 'step_00000001'} at step 1" in out
    summary = read_summary(run_dir)
    assert summary.status == "ok" and summary.resumed_from == str(root / "step_00000001")
    assert _digest(root / "step_00000001") == before


def test_killed_worker_restarts_and_resumes_to_the_same_loss(runs, tmp_path):
    # Style 2 with launcher.max_restarts=1: a worker SIGKILLed mid-run takes the group down, the agent starts
    # it again in the same run dir, and checkpoint.resume=auto picks up the newest checkpoint.
    out, summaries = runs
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *TINY,
            *RESTART,
            f"hydra.run.dir={run_dir}",
            "launcher.nproc_per_node=2",
            "launcher.max_restarts=1",
            "checkpoint=periodic",
            "checkpoint.every_n_steps=2",
        ],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: "step_00000002" in _listing(run_dir / "checkpoints"), proc, "a checkpoint")
        # The agent starts local ranks 0, 1 in order: the oldest is rank 0, which writes checkpoints and metrics.
        spawned = workers(proc.pid)
        assert len(spawned) == 2
        spawned[0].kill()  # SIGKILL, mid-run
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "killed by SIGKILL" in stderr or "SIGKILL" in stderr
    summary = read_summary(run_dir)
    assert summary.status == "ok"
    assert summary.resumed_from is not None  # the second attempt resumed, not started over
    reference = summaries["restart-reference"]
    assert summary.final_loss == reference.final_loss
    # The restarted attempt dropped the rows the killed one had logged past its checkpoint: each step once.
    steps = [r["step"] for r in read_rows(run_dir)]
    assert steps == list(range(1, 13))


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    # lr 1e20: step 1's update makes the weights ~1e20, and step 2's forward overflows to inf, then NaN. Under
    # trainer.on_nonfinite=skip the run goes on, but a run whose loss ends non-finite still fails, everywhere its
    # result is read: exit status, summary.json, and the console's summary says how many steps it skipped.
    blowup = ("optim.lr=1e20", "optim.warmup_steps=0", "checkpoint=periodic", "checkpoint.every_n_steps=1")
    stop = start_cli(tmp_path, *blowup, run_dir=str(tmp_path / "stop"))
    skip = start_cli(tmp_path, *blowup, "trainer.on_nonfinite=skip", run_dir=str(tmp_path / "skip"))
    out, err = stop.communicate(timeout=TIMEOUT)
    assert stop.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err
    root = tmp_path / "stop" / "checkpoints"
    line = err.strip().splitlines()[-1]
    assert line.startswith("shardlab: error: ") and "at step 2" in line, err
    assert f"the last checkpoint this run saved is {root / 'step_00000001'}" in line
    assert _listing(root) == {"step_00000001"}
    checkpoint_io.verify(root / "step_00000001")
    assert checkpoint_io.read_train_state(root / "step_00000001")["step"] == 1
    summary = read_summary(tmp_path / "stop")
    assert summary.status == "failed" and "at step 2" in summary.error
    # Resumed from step 1, it fails again before saving: the checkpoint it came from is named as that, not as good.
    again = compose_config(
        *blowup, f"checkpoint.resume={root / 'step_00000001'}", "checkpoint.every_n_steps=0"
    )
    with pytest.raises(NonFiniteLoss, match=rf"at step 2; this run resumed from {root / 'step_00000001'} at step 1 "
                       "and saved no checkpoint since"):  # fmt: skip
        train_in_process(again, tmp_path / "again")

    out, err = skip.communicate(timeout=TIMEOUT)
    assert skip.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert "the loss was non-finite at 2 of 3 steps (trainer.on_nonfinite=skip skipped them)" in line, err
    assert "final loss is nan" in line
    # the console's table
    assert re.search(r"non-finite loss +at 2 step\(s\), skipped \(trainer.on_nonfinite=skip\)", out), out
    summary = read_summary(tmp_path / "skip")
    assert summary.status == "failed" and "non-finite at 2 of 3 steps" in summary.error  # steps 2 and 3
    # A skipped step changes nothing: the weights after steps 2 and 3 are step 1's.
    root = tmp_path / "skip" / "checkpoints"
    first, last = (consolidated_model_state(root / f"step_0000000{s}") for s in (1, 3))
    assert all(torch.equal(first[k], last[k]) for k in first)
