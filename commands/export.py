# From a (possibly sharded) DCP checkpoint to a model others can load:
#   python -m commands.export outputs/.../checkpoints/step_00000100 model.safetensors   (or model.pt): one file
#   python -m commands.export outputs/.../checkpoints/step_00000100 hf_model/             a Hugging Face model
# A Hugging Face directory holds config.json and model.safetensors under transformers' names (and the run's
# tokenizer files, when it used one): AutoModelForCausalLM.from_pretrained(dir) loads it, and shardlab trains
# it again with model=hf model.name_or_path=dir. Loads in one process with no process group: DCP reassembles
# the full tensors from every rank's shards. Everything is written under a temporary name and renamed.
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from commands.adapters import base_state, finetune_of, merged_state, write_peft
from commands.cli import Parser
from launcher.errors import command_errors
from models import build_model_args, hf_export
from trainer.checkpoint import find_checkpoint
from trainer.checkpoint_io import CheckpointError, read_metadata, read_model_state, read_train_state, verify
from trainer.config import NOT_MODEL_ARGS
from trainer.paths import as_shared, staged, unwritable_reason
from trainer.tokenizer import byte_tokenizer, load_tokenizer, save_tokenizer

FILE_FORMATS = (".safetensors", ".pt")  # any other target: a Hugging Face directory


def consolidated_model_state(path: Path) -> dict[str, torch.Tensor]:
    # Full (unsharded) tensors of the shapes and dtypes the metadata records, filled from every rank's files.
    md = read_metadata(path).state_dict_metadata
    state = {
        k.removeprefix("model."): torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.items()
        if k.startswith("model.") and hasattr(v, "properties")
    }
    return read_model_state(path, state)


def model_record(path: Path):
    # -> (the model's arguments, the tokenizer it was trained with, or None for synthetic tokens, and the model's
    # config as recorded), as the checkpoint recorded them: the tokenizer from the checkpoint's own copy
    # (tokenizer/), the byte-level one for bytes.
    md = read_metadata(path).state_dict_metadata
    if "train.model_config" not in md:
        raise ValueError(
            f"checkpoint {path} does not record its model (saved before shardlab recorded it): export it to one "
            "file (a .safetensors or .pt target) instead"
        )
    train = read_train_state(
        path, {k: "" for k in ("model_config", "tokenizer_dir", "tokens") if f"train.{k}" in md}
    )
    record = json.loads(train["model_config"])
    model = {k: v for k, v in record["model"].items() if k not in NOT_MODEL_ARGS}
    args = build_model_args(model.pop("name"), model, record["attention"])
    return (
        args,
        run_tokenizer(path, train.get("tokenizer_dir", ""), train.get("tokens"), args),
        record["model"],
    )


def model_state(path: Path, args, model_cfg: dict) -> dict[str, torch.Tensor]:
    # The model's whole state: the checkpoint's own, or for a LoRA checkpoint (adapters only) its base with the
    # adapters merged in (commands/adapters.py).
    state = consolidated_model_state(path)
    if (ft := finetune_of(path)) is None:
        return state
    return merged_state(base_state(args, model_cfg, ft), state, ft)


def run_tokenizer(path: Path, where: str, tokens: str | None, args):
    if where:
        # tokenizer/ in the checkpoint; a checkpoint saved before checkpoints kept a copy names the absolute path
        # of the data's tokenizer, which may have moved since.
        found = path / where if not Path(where).is_absolute() else Path(where)
        if not found.is_dir():
            raise ValueError(
                f"checkpoint {path} was trained with the tokenizer {found}, which is gone (the checkpoint is older than "
                "the copy each one now keeps): put the tokenizer back there, or export to a .safetensors or .pt file"
            )
        return load_tokenizer(str(found), "the checkpoint's tokenizer", "a checkpoint of a byte-level run")
    if tokens == "bytes" or (tokens is None and args.vocab_size == 256):  # older checkpoints record no tokens
        return byte_tokenizer()
    return None  # synthetic tokens: no text to tokenize


def special_ids(tokenizer) -> dict[str, int | None]:
    # The ids transformers' generate stops and pads with: the data's own (bytes: the NUL byte prepare ends each
    # document with), never LlamaConfig's defaults (bos 1, eos 2), which would stop on an ordinary token.
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}


def _safe_state(state: dict) -> dict:
    # safetensors refuses tensors that share storage (tied embeddings): store each once, contiguous.
    return {k: v.contiguous().clone() for k, v in state.items()}


# What export can do about a checkpoint it cannot use (train.py's own fixes name checkpoint.resume).
EXPORT_FIX = "give export another checkpoint (an older step_XXXXXXXX of the same run, say)"


def source(checkpoint: str, command: str = "export") -> Path:
    path = find_checkpoint(Path(checkpoint).expanduser())
    if path is None:
        raise ValueError(
            f"{checkpoint} is not a checkpoint (no .metadata in it, and no step_XXXXXXXX directory under it or its "
            f"checkpoints/): give {command} a checkpoint directory, a run directory or its checkpoints/"
        )
    return path


def say_which(path: Path, checkpoint: str) -> None:
    # A run directory (or its checkpoints/) was given: which of its checkpoints this is.
    if path.resolve() != Path(checkpoint).expanduser().resolve():
        print(f"shardlab: {path.name}, the newest checkpoint under {checkpoint}", flush=True)


def export_adapters(path: Path, target: Path) -> Path:
    ft = finetune_of(path)
    if ft is None:
        raise ValueError(
            f"checkpoint {path} is not a LoRA checkpoint (finetune=full: every weight trained): export it without "
            "--adapters"
        )
    args, tokenizer, _ = model_record(path)
    with staged(target) as tmp:
        write_peft(tmp, consolidated_model_state(path), ft, args)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return target


def check_target(path: Path, out: str, overwrite: bool, adapters: bool = False) -> Path:
    # -> the target, once it is one that export may write: never the checkpoint or what holds it, a file replaced
    # only with --overwrite, a directory replaced only where it holds an earlier export (a Hugging Face model, no
    # subdirectories), so a mistyped out can never take a run with it.
    target = Path(out).expanduser().absolute()
    ckpt = path.absolute()
    if target == ckpt or target in ckpt.parents or ckpt in target.parents:
        raise ValueError(
            f"out {out} is or holds the checkpoint being exported ({path}): choose an out outside the run directory"
        )
    if why := unwritable_reason(target.parent):
        raise ValueError(f"out {out} cannot be written ({why}): choose an out in a writable directory")
    if not target.exists():
        return target
    if target.suffix in FILE_FORMATS:
        if target.is_dir():
            raise ValueError(
                f"out {out} is a directory, not a {target.suffix} file: choose another file name"
            )
        if not overwrite:
            raise ValueError(
                f"out {target} already exists: choose another file, or pass --overwrite to replace it"
            )
        return target
    if not target.is_dir():
        raise ValueError(
            f"out {out} is a file: give a directory for a Hugging Face model, or a .safetensors or .pt file name"
        )
    held = sorted(target.iterdir())
    if held and not overwrite:
        raise ValueError(
            f"{target} already exists and is not empty: choose another directory, or pass --overwrite"
        )
    if adapters and (target / "config.json").is_file():
        raise ValueError(
            f"out {target} holds a model (config.json): peft's adapters go in a directory of their own, which "
            "PeftModel.from_pretrained(<the base>, dir) reads: choose another directory"
        )
    ours = "adapter_config.json" if adapters else "config.json"
    if held and (not (target / ours).is_file() or any(p.is_dir() for p in held)):
        other = next((p.name for p in held if p.is_dir()), held[0].name)
        raise ValueError(
            f"out {target} holds more than an earlier export (e.g. {other}): --overwrite replaces only a directory "
            "that export wrote; choose another directory"
        )
    return target


def export(checkpoint: str, out: str, overwrite: bool = False, adapters: bool = False) -> Path:
    # adapters: a LoRA checkpoint's adapters in peft's format (else the merged model).
    path = source(checkpoint)
    say_which(path, checkpoint)
    target = check_target(path, out, overwrite, adapters)
    hf = target.suffix not in FILE_FORMATS
    try:
        verify(path)
    except CheckpointError as e:
        raise e.with_fix(EXPORT_FIX) from None
    if adapters:
        return export_adapters(path, target)
    args, tokenizer, model_cfg = model_record(path)
    state = model_state(path, args, model_cfg)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if not hf:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".safetensors":
            save_file(_safe_state(state), str(tmp))
        else:
            torch.save(state, tmp)
        as_shared(tmp)  # safetensors writes 0600
        tmp.replace(target)
        return target
    config, hf_state = hf_export(args, state)
    ids = special_ids(tokenizer)
    for key, value in ids.items():
        setattr(config, key, value)
    from transformers import GenerationConfig

    with staged(target) as tmp:
        config.save_pretrained(tmp)
        GenerationConfig(**ids).save_pretrained(tmp)
        save_file(_safe_state(hf_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        as_shared(tmp / "model.safetensors")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = Parser(
        prog="python -m commands.export",
        description="a checkpoint -> a model file or a Hugging Face directory",
    )
    ap.add_argument(
        "checkpoint", help="a checkpoint directory (or a run's checkpoints/ or run directory: its newest)"
    )
    ap.add_argument(
        "out",
        help="out.safetensors or out.pt: one file of our names; anything else: a Hugging Face directory",
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="replace a file, or a directory that export wrote before"
    )
    ap.add_argument(
        "--adapters",
        action="store_true",
        help="a LoRA checkpoint: its adapters in peft's format (default: merged)",
    )
    ap.add_argument("--debug", action="store_true", help="a traceback instead of one line on bad input")
    opts = ap.parse_args(sys.argv[1:] if argv is None else argv)
    with command_errors(opts.debug):
        target = export(opts.checkpoint, opts.out, opts.overwrite, opts.adapters)
    print(f"shardlab: wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
