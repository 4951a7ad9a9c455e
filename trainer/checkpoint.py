# Checkpoint policy: where checkpoints live, which one a run resumes from, when it saves, and what can be
# checked before any worker starts. A checkpoint is written under a temporary name and renamed once
# complete, so a crash mid-save leaves the previous one as the newest loadable checkpoint. The reading and
# writing itself is trainer/checkpoint_io.py (DCP), imported only where a checkpoint is read or written: a
# run that never checkpoints never loads DCP.
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from models import build_model
from trainer.data import tokenizer_source
from trainer.environments import current
from trainer.finetune import apply_finetune, base_record
from trainer.paths import publish, unwritable_reason

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    # Only renamed directories count; ".tmp-step_*" ones are saves that never finished.
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def find_checkpoint(path: Path) -> Path | None:
    # A checkpoint directory, or the newest complete one in a directory of them (a run's checkpoints/) or in a run
    # directory's checkpoints/; None where there is none.
    if (path / ".metadata").is_file():
        return path
    found = complete_checkpoints(path) or complete_checkpoints(path / "checkpoints")
    return found[-1][1] if found else None


def resolve_resume(resume: str, root: Path, say=None) -> Path | None:
    # resume: "none", "auto" (the newest complete checkpoint under root that verifies; `say` is told of any passed
    # over) or a path: a checkpoint directory, or a directory of them (a run's checkpoints/), or a run directory,
    # whose newest complete one is taken.
    if resume == "none":
        return None
    if resume == "auto":
        return newest_verified(root, say)
    if (path := find_checkpoint(Path(resume).expanduser())) is not None:
        return path
    raise ValueError(
        f"checkpoint.resume={resume!r} is not a checkpoint (no .metadata in it, and no step_XXXXXXXX "
        "directory under it or its checkpoints/): give a checkpoint or run directory, or "
        "checkpoint.resume=auto|none"
    )


def newest_verified(root: Path, say=None) -> Path | None:
    # The newest complete checkpoint under root that verifies (trainer/checkpoint_io.verify: whole, and every file
    # as its save recorded it); those that do not are passed over, and `say` is told which and why. None: there is
    # no checkpoint. Checkpoints that all fail are refused: resuming none of them would silently start over.
    found = complete_checkpoints(root)
    if not found:
        return None
    from trainer import checkpoint_io

    failed = []
    for _, path in reversed(found):
        try:
            checkpoint_io.verify(path)
        except checkpoint_io.CheckpointError as e:
            failed.append(e.problem)
            continue
        if failed and say is not None:
            say(
                f"checkpoint.resume=auto: {'; '.join(failed)}; resuming from {path}, the newest that verifies"
            )
        return path
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    raise checkpoint_io.CheckpointError(
        f"no checkpoint under {root} verifies: {failed[0]}{more}",
        "delete them, or set checkpoint.resume=none to start over",
    )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(
    root: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    keep_last: int,
    meta: dict,
    tokenizer: Path | None = None,
) -> Path:
    # tokenizer: the run's tokenizer directory, copied into the checkpoint (tokenizer/), so that export and sampling
    # depend on nothing outside it, whatever moves later.
    from trainer import checkpoint_io

    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before
        tmp.mkdir(parents=True)
        if tokenizer is not None:
            shutil.copytree(tokenizer, tmp / TOKENIZER, ignore=shutil.ignore_patterns(".*"))
    _barrier()
    checkpoint_io.write(tmp, step, model, optimizer, scheduler, meta)
    _barrier()
    if _is_rank0():
        publish(tmp, final)  # the same step saved again (a resume from an older one) replaces it only then
        for _, old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


TOKENIZER = "tokenizer"  # a checkpoint's copy of the run's tokenizer files


def model_record(model_cfg, attention_cfg, data_cfg) -> dict[str, str]:
    # What a checkpoint says of the model it holds, for commands/export.py and commands/sample.py to rebuild it with
    # no config at hand: the model's and the attention option's fields (JSON), the tokens it was trained on (bytes,
    # a tokenizer's ids, or synthetic ones), and where the tokenizer's files are (its own copy, tokenizer/).
    model = OmegaConf.to_container(model_cfg, resolve=True)
    attention = OmegaConf.to_container(attention_cfg, resolve=True)
    source = tokenizer_source(data_cfg)
    return {
        "model_config": json.dumps({"model": model, "attention": attention}),
        "tokenizer_dir": TOKENIZER if source else "",
        "tokens": "synthetic" if data_cfg.name == "synthetic" else "tokenizer" if source else "bytes",
    }


def checkpoint_root(ckpt_cfg, run_dir: Path) -> Path:
    return Path(ckpt_cfg.dir).expanduser() if ckpt_cfg.dir else run_dir / "checkpoints"


def maybe_resume(
    ckpt_cfg, root: Path, model, optimizer, scheduler, max_steps: int, extra: dict | None = None
) -> tuple[int, Path | None, dict]:
    # -> (the last completed step, the checkpoint resumed from, its train state); (0, None, {}) for a fresh
    # start. `extra`: templates of the extra tensors save() was given, filled from the checkpoint if there.
    # Rank 0 picks and verifies the checkpoint (reading it through once), and every rank loads that one.
    path = _on_rank0(lambda: _resume_path(ckpt_cfg.resume, root))
    if path is None:
        return 0, None, {}
    from trainer import checkpoint_io

    state = checkpoint_io.load(path, model, optimizer, scheduler, extra)
    check_below_max_steps(path, state["step"], max_steps)
    if _is_rank0():
        print(f"shardlab: resumed from {path} at step {state['step']}", flush=True)
    return state["step"], path, state


def _resume_path(resume: str, root: Path) -> Path | None:
    def say(message: str) -> None:
        print(f"shardlab: {message}", flush=True)

    if current().restarted() and complete_checkpoints(root):
        # restarted after a failure, or a requeued SLURM job: this run's newest save, whatever resume named
        return newest_verified(root, say)
    path = resolve_resume(resume, root, say)
    if path is not None:
        from trainer import checkpoint_io

        checkpoint_io.verify(path)
    return path


def _on_rank0(fn):
    # fn() on rank 0, its answer (or its one-line refusal, raised again) on every rank.
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ValueError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value


def check_below_max_steps(path: Path, step: int, max_steps: int) -> None:
    if step >= max_steps:
        raise ValueError(
            f"checkpoint {path} is already at step {step}, not below trainer.max_steps={max_steps}: "
            "raise trainer.max_steps to train further, or set checkpoint.resume=none to start over"
        )


def maybe_save(
    ckpt_cfg, root: Path, step: int, max_steps: int, model, optimizer, scheduler, meta, tokenizer=None
):
    # meta: a function returning the extra train state, called only on the steps that save (the fp16 loss
    # scale is read from the device, a sync that other steps should not pay).
    every = ckpt_cfg.every_n_steps
    if (every > 0 and step % every == 0) or (ckpt_cfg.save_final and step == max_steps):
        return save(root, step, model, optimizer, scheduler, ckpt_cfg.keep_last, meta(), tokenizer)
    return None


def preflight(cfg, args) -> None:
    # Before any worker starts: fault tolerance that could not work, a checkpoint directory that cannot be
    # made, and the checkpoint a run would resume from (readable, complete, of this model's shapes, below
    # trainer.max_steps). Reads the checkpoint; writes nothing.
    c, t = cfg.checkpoint, cfg.trainer
    restarts = cfg.launcher.max_restarts
    if restarts > 0 and c.every_n_steps < 1:
        raise ValueError(
            f"launcher.max_restarts={restarts} restarts failed workers from the newest checkpoint, but "
            "checkpoint.every_n_steps=0 saves none, so a restart would start over: add checkpoint=periodic "
            "(or checkpoint.every_n_steps=N), or set launcher.max_restarts=0"
        )
    run_dir = cfg.get("run_dir")
    root = checkpoint_root(c, Path(run_dir or ".")) if c.dir or run_dir else None
    if root is not None and (c.every_n_steps > 0 or c.save_final) and (why := unwritable_reason(root)):
        raise ValueError(
            f"checkpoint directory {root} cannot be created ({why}): set checkpoint.dir to a writable "
            "directory, or checkpoint=none"
        )
    if root is None and c.resume == "auto":
        return  # composed without a run directory (tests, planning): nothing to resume
    # Every file is read through against its digest here, so a changed byte is refused before any worker starts.
    # Under torchrun every rank checks its config, and so reads it (from the page cache after the first): each
    # must reach the same verdict, or the ranks that passed would wait for the ones that did not.
    path = resolve_resume(c.resume, root)
    if path is None:
        return
    from trainer import checkpoint_io

    checkpoint_io.verify(path)
    with torch.device(
        "meta"
    ):  # shapes only; under finetune=lora, what trains (the adapters) is what was saved
        model = apply_finetune(build_model(args), cfg.finetune, t.seed)
        trains = {n for n, p in model.named_parameters() if p.requires_grad}
        checkpoint_io.check_compatible(path, {n: v for n, v in model.state_dict().items() if n in trains})
    check_below_max_steps(path, checkpoint_io.read_train_state(path)["step"], t.max_steps)
    check_same_base(path, cfg)


def check_same_base(path: Path, cfg) -> None:
    # Adapters belong to the base they were trained on: resuming them on another would train nonsense quietly.
    from trainer import checkpoint_io

    if "train.finetune" not in checkpoint_io.read_metadata(path).state_dict_metadata:
        return
    saved = json.loads(checkpoint_io.read_train_state(path, {"finetune": ""})["finetune"])["base"]
    here = base_record(cfg.model, cfg.trainer.seed)
    if saved != here:
        raise ValueError(
            f"checkpoint {path} holds adapters trained on the base {saved['source']}"
            + (f" (digest {saved['digest']})" if saved["digest"] else "")
            + f", not this run's {here['source']}"
            + (f" (digest {here['digest']})" if here["digest"] else "")
            + ": resume with the base it was trained on, or set checkpoint.resume=none"
        )
