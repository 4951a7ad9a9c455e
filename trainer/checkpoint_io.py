# Reading and writing checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards,
# so a checkpoint saved under one strategy or world size loads under another (DCP reshards on load). Reading
# one never runs pickled code: DCP's tensors and small items are read with torch.load(weights_only=True), and
# its .metadata pickle builds only DCP's own metadata classes. Every save records a digest of each file it wrote
# (trainer/integrity.py), and a checkpoint is verified against them before it is resumed or exported. DCP (which
# loads DTensor and FSDP) is imported only by a run that reads or writes a checkpoint; trainer/checkpoint.py
# decides which and when.
import contextlib
import dataclasses
import pickle
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from trainer import integrity

# What a run that resumes can do about a checkpoint it cannot use; commands/export.py says its own.
RESUME_FIX = "delete it, or set checkpoint.resume to an older checkpoint directory or none"


class CheckpointError(ValueError):
    # A checkpoint that cannot be used, said as the problem and what to do about it, so that each command can
    # name its own fix (train.py's options, or export's arguments).
    def __init__(self, problem: str, fix: str = RESUME_FIX):
        super().__init__(f"{problem}: {fix}")
        self.problem = problem

    def with_fix(self, fix: str) -> "CheckpointError":
        return CheckpointError(self.problem, fix)


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


def _rng_states() -> dict:
    # Flat tensors only: DCP flattens nested containers, and loading needs a template of the same keys.
    states = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state()
    return states


# The optimizer's hyper-parameters keyed by each parameter's name (param_groups.<name>.lr), not by group index: a
# pipeline rank's groups hold other parameters than rank 0's, and DCP keeps one copy of each key.
# Frozen parameters are left out (finetune=lora: the base; a checkpoint holds the adapters, and records which base).
FLAT = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True)


def write(tmp: Path, step: int, model, optimizer, scheduler, meta: dict) -> None:
    # Every rank writes its shards of the model, optimizer and train state into tmp.
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT)
    # The data position is the step: batches are a function of (seed, step, rank).
    train_state = {"step": step, "last_epoch": scheduler.last_epoch, **_rng_states(), **meta}
    save_files({"model": model_sd, "optim": optim_sd, "train": train_state}, tmp)


def save_files(state: dict, tmp: Path) -> None:
    # DCP writes (and syncs) every rank's files; each rank then records the digests of its own, all at once, reading
    # back what the page cache still holds (benchmarks/checkpoint_digest.py measures the cost). Rank 0 adds .metadata
    # and writes the manifest.
    with _quiet_no_dist():
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = integrity.record(tmp, [p.name for p in tmp.glob(f"__{rank}_*")])
    parts = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    if rank == 0:
        files = {name: entry for part in parts for name, entry in part.items()}
        rest = [str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()]  # the tokenizer's copy too
        files.update(integrity.record(tmp, [name for name in rest if name not in files]))
        integrity.write_manifest(tmp, files)


def checkpoint_error(path: Path, e: BaseException) -> CheckpointError:
    if isinstance(e, CheckpointException) and e.failures:  # per-rank (exception, traceback) pairs
        e = next(iter(e.failures.values()))[0]
    first = (str(e).strip().splitlines() or ["no message"])[0]
    return CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first})")


def read_metadata(path: Path) -> Metadata:
    try:
        return _SafeReader(str(path)).read_metadata()
    except Exception as e:
        raise checkpoint_error(path, e) from None


def _read(state: dict, path: Path, no_dist: bool) -> None:
    try:
        with _quiet_no_dist():
            reader, planner = _SafeReader(str(path)), _WeightsOnlyPlanner()
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise checkpoint_error(path, e) from None


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    # Global tensor shapes from the checkpoint's metadata, read without loading any tensor.
    md = read_metadata(path)
    return {
        k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
    }


_verified: set[tuple] = set()  # checkpoints read through by this process, as their files then were


def _state_of(path: Path) -> tuple:
    # A checkpoint as its files stand (names, sizes, modification times): verified once per process unless they change.
    files = (p for p in path.rglob("*") if p.is_file())
    return (
        str(path),
        *sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files),
    )


def verify(path: Path) -> None:
    # Without loading it: every file is there and long enough for what the metadata records (a truncated copy or an
    # interrupted rsync fails here, before any worker starts), and every file matches the digest its save recorded
    # (a flipped byte fails here; the metadata's own first, before its pickle is read). A checkpoint saved before
    # digests were recorded loads, with one warning line.
    try:
        recorded = integrity.read_manifest(path)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} fails verification: {e}") from None
    key = _state_of(path)
    if key in _verified:
        return
    if recorded is not None and (
        wrong := integrity.mismatch(path, {k: v for k, v in recorded.items() if k == ".metadata"})
    ):
        raise CheckpointError(f"checkpoint {path} fails verification: {wrong}")
    ends: dict[str, int] = {}
    for info in read_metadata(path).storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            have = "missing" if size is None else f"{size} bytes, short of the {end} its metadata records"
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is {have}")
    if recorded is None:
        print(
            f"shardlab: warning: checkpoint {path} records no digests (saved before shardlab recorded them): "
            "loading it unverified",
            file=sys.stderr,
            flush=True,
        )
    elif (wrong := integrity.mismatch(path, recorded)) is not None:
        raise CheckpointError(f"checkpoint {path} fails verification: {wrong}")
    _verified.add(key)


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
    if dist.is_initialized() and dist.get_world_size() > 1:
        # A pipeline rank holds its stages' modules only: the model is what all the ranks hold together.
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, here)
        here = {k: v for part in parts for k, v in part.items()}
    problems = [f"{k} is missing from the checkpoint" for k in here if k not in saved]
    problems += [
        f"{k} is {list(saved[k])} there, {list(here[k])} here"
        for k in here
        if k in saved and saved[k] != here[k]
    ]
    problems += [f"{k} is in the checkpoint but not in this model" for k in saved if k not in here]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint {path} does not match this model: {problems[0]}{more}",
            "resume with the model config it was saved with (its run's config.yaml) or set checkpoint.resume=none",
        )


def load(path: Path, model, optimizer, scheduler, extra: dict | None = None) -> dict:
    # -> the checkpoint's train state (step, meta, and the `extra` tensors it has, e.g. the fp16 loss scale).
    # Model and optimizer are loaded in place.
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT)
    check_compatible(path, model_sd)
    saved = read_metadata(path).state_dict_metadata
    # Only what this checkpoint holds: a CPU run's has no cuda_rng, an fp32 run's no loss scale.
    optional = {k: v for k, v in {**_rng_states(), **(extra or {})}.items() if f"train.{k}" in saved}
    train_template = {"step": 0, "last_epoch": 0, **optional}  # the model record is export's, not a resume's
    state = {"model": model_sd, "optim": optim_sd, "train": train_template}
    _read(state, path, no_dist=not dist.is_initialized())
    # The frozen parameters (finetune=lora's base) are not in it: loaded without them (check_compatible held the
    # keys it does have to this model's).
    frozen = any(not p.requires_grad for p in model.parameters())
    options = dataclasses.replace(FLAT, strict=False) if frozen else FLAT
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
    )
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
