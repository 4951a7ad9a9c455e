# Checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards, so a checkpoint
# saved under one strategy or world size loads under another (DCP reshards on load). A checkpoint is
# written under a temporary name and renamed once complete, so a crash mid-save leaves the previous one
# as the newest loadable checkpoint. Reading one never runs pickled code: DCP's tensors and small items are
# read with torch.load(weights_only=True), and its .metadata pickle builds only DCP's own metadata classes.
import contextlib
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from models import build_model
from trainer.paths import unwritable_reason

_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Globals a DCP .metadata pickle names besides the classes of torch.distributed.checkpoint.metadata.
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    # DCP writes .metadata with pickle, which may name any callable: what torch.load(weights_only=True) does
    # for tensors, this does for the metadata.
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint.metadata":
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP metadata")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    # DefaultLoadPlanner reads the non-tensor items (step, optimizer hyper-parameters) with
    # torch.load(weights_only=False).
    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def _quiet_no_dist():
    # DCP warns on every single-process save or load that it "assumes the intent" is one process: it is.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    # Only renamed directories count; ".tmp-step_*" ones are saves that never finished.
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume(resume: str, root: Path) -> Path | None:
    # resume: "none", "auto" (newest complete checkpoint under root) or a path: a checkpoint directory, or a
    # directory of them (a run's checkpoints/), or a run directory, whose newest complete one is taken.
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if (path / ".metadata").is_file():
        return path
    found = complete_checkpoints(path) or complete_checkpoints(path / "checkpoints")
    if found:
        return found[-1][1]
    raise ValueError(
        f"checkpoint.resume={resume!r} is not a checkpoint (no .metadata in it, and no step_XXXXXXXX "
        "directory under it or its checkpoints/): give a checkpoint or run directory, or "
        "checkpoint.resume=auto|none"
    )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rng_states() -> dict:
    # Flat tensors only: DCP flattens nested containers, and loading needs a template of the same keys.
    states = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state()
    return states


def save(root: Path, step: int, model, optimizer, scheduler, keep_last: int, meta: dict) -> Path:
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died before
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # The data position is the step: batches are a function of (seed, step, rank).
    train_state = {"step": step, "last_epoch": scheduler.last_epoch, **_rng_states(), **meta}
    state = {"model": model_sd, "optim": optim_sd, "train": train_state}
    with _quiet_no_dist():
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    _barrier()
    if _is_rank0():
        _publish(tmp, final)
        for _, old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _publish(tmp: Path, final: Path) -> None:
    # The same step saved again (a resume from an older checkpoint): the old one is moved aside, not deleted
    # first, so a crash here still leaves a complete checkpoint of every other step.
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_error(path: Path, e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:  # per-rank (exception, traceback) pairs
        e = next(iter(e.failures.values()))[0]
    first = (str(e).strip().splitlines() or ["no message"])[0]
    return (
        f"checkpoint {path} cannot be read ({type(e).__name__}: {first}): delete it, or set "
        "checkpoint.resume to an older checkpoint directory or none"
    )


def read_metadata(path: Path) -> Metadata:
    try:
        return _SafeReader(str(path)).read_metadata()
    except Exception as e:
        raise ValueError(checkpoint_error(path, e)) from None


def _read(state: dict, path: Path, no_dist: bool) -> None:
    try:
        with _quiet_no_dist():
            reader, planner = _SafeReader(str(path)), _WeightsOnlyPlanner()
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise ValueError(checkpoint_error(path, e)) from None


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    # Global tensor shapes from the checkpoint's metadata, read without loading any tensor.
    md = read_metadata(path)
    return {
        k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
    }


def verify(path: Path) -> None:
    # Without loading it: the metadata reads, and every file it points into is there and long enough (a
    # truncated copy or an interrupted rsync fails here, before any worker starts).
    ends: dict[str, int] = {}
    for info in read_metadata(path).storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            have = "missing" if size is None else f"{size} bytes, short of the {end} its metadata records"
            raise ValueError(
                f"checkpoint {path} is incomplete: {name} is {have}: delete it, or set checkpoint.resume to "
                "an older checkpoint directory or none"
            )


def read_train_state(path: Path, extra: dict | None = None) -> dict:
    # The step and schedule position (and the `extra` tensors named by a template), without a process group
    # or a model.
    state = {"train": {"step": 0, "last_epoch": 0, **(extra or {})}}
    _read(state, path, no_dist=True)
    return state["train"]


def read_model_state(path: Path, state: dict) -> dict:
    # state: {name: a full tensor to fill}, filled in place from every rank's shards without a process group.
    box = {"model": state}
    _read(box, path, no_dist=True)
    return box["model"]


def check_compatible(path: Path, model_sd: dict) -> None:
    saved = {k.removeprefix("model."): v for k, v in read_shapes(path).items() if k.startswith("model.")}
    here = {k: tuple(v.shape) for k, v in model_sd.items()}
    problems = [f"{k} is missing from the checkpoint" for k in here if k not in saved]
    problems += [
        f"{k} is {list(saved[k])} there, {list(here[k])} here"
        for k in here
        if k in saved and saved[k] != here[k]
    ]
    problems += [f"{k} is in the checkpoint but not in this model" for k in saved if k not in here]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(
            f"checkpoint {path} does not match this model: {problems[0]}{more}; resume with the model "
            "config it was saved with (its run's config.yaml) or set checkpoint.resume=none"
        )


def load(path: Path, model, optimizer, scheduler, extra: dict | None = None) -> dict:
    # -> the checkpoint's train state (step, meta, and the `extra` tensors it has, e.g. the fp16 loss scale).
    # Model and optimizer are loaded in place.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    check_compatible(path, model_sd)
    saved = read_metadata(path).state_dict_metadata
    # Only what this checkpoint holds: a CPU run's has no cuda_rng, an fp32 run's no loss scale.
    optional = {k: v for k, v in {**_rng_states(), **(extra or {})}.items() if f"train.{k}" in saved}
    train_template = {"step": 0, "last_epoch": 0, "model_args": "", **optional}
    state = {"model": model_sd, "optim": optim_sd, "train": train_template}
    _read(state, path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # The schedule is a function of the step: recompute the lr from this run's schedule (which may have a
    # new max_steps) rather than trusting the saved one.
    scheduler.last_epoch = state["train"]["last_epoch"]
    lrs = [
        base * fn(scheduler.last_epoch)
        for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
    for key, restore in (("rng", torch.set_rng_state), ("cuda_rng", torch.cuda.set_rng_state)):
        if key in state["train"]:
            restore(state["train"][key])
    return state["train"]


def checkpoint_root(ckpt_cfg, run_dir: Path) -> Path:
    return Path(ckpt_cfg.dir).expanduser() if ckpt_cfg.dir else run_dir / "checkpoints"


def maybe_resume(
    ckpt_cfg, root: Path, model, optimizer, scheduler, max_steps: int, extra: dict | None = None
) -> tuple[int, Path | None, dict]:
    # -> (the last completed step, the checkpoint resumed from, its train state); (0, None, {}) for a fresh
    # start. `extra`: templates of the extra tensors save() was given, filled from the checkpoint if there.
    path = resolve_resume(ckpt_cfg.resume, root)
    if elastic_restart() and (own := complete_checkpoints(root)):
        path = own[-1][1]  # restarted after a failure: this run's newest save, whatever resume named
    if path is None:
        return 0, None, {}
    state = load(path, model, optimizer, scheduler, extra)
    check_below_max_steps(path, state["step"], max_steps)
    if _is_rank0():
        print(f"shardlab: resumed from {path} at step {state['step']}", flush=True)
    return state["step"], path, state


def elastic_restart() -> bool:
    # The elastic agent (launcher.max_restarts, torchrun --max-restarts) counts the group's restarts.
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def check_below_max_steps(path: Path, step: int, max_steps: int) -> None:
    if step >= max_steps:
        raise ValueError(
            f"checkpoint {path} is already at step {step}, not below trainer.max_steps={max_steps}: "
            "raise trainer.max_steps to train further, or set checkpoint.resume=none to start over"
        )


def maybe_save(ckpt_cfg, root: Path, step: int, max_steps: int, model, optimizer, scheduler, meta):
    # meta: a function returning the extra train state, called only on the steps that save (the fp16 loss
    # scale is read from the device, a sync that other steps should not pay).
    every = ckpt_cfg.every_n_steps
    if (every > 0 and step % every == 0) or (ckpt_cfg.save_final and step == max_steps):
        return save(root, step, model, optimizer, scheduler, ckpt_cfg.keep_last, meta())
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
    path = resolve_resume(c.resume, root)
    if path is None:
        return
    verify(path)
    with torch.device("meta"):  # shapes only
        check_compatible(path, build_model(args).state_dict())
    check_below_max_steps(path, read_train_state(path)["step"], t.max_steps)
