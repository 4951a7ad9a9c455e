# From a (possibly sharded) DCP checkpoint to a model others can load:
#   python -m commands.export outputs/.../checkpoints/step_00000100 model.safetensors   (or model.pt): one file
#   python -m commands.export outputs/.../checkpoints/step_00000100 hf_model/             a Hugging Face model
# A Hugging Face directory holds config.json and model.safetensors under transformers' names (and the run's
# tokenizer files, when it used one): AutoModelForCausalLM.from_pretrained(dir) loads it, and shardlab trains
# it again with model=hf model.name_or_path=dir. Loads in one process with no process group: DCP reassembles
# the full tensors from every rank's shards. Everything is written under a temporary name and renamed.
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.errors import fail
from models import build_model_args, hf_export
from trainer.checkpoint import resolve_resume
from trainer.checkpoint_io import read_metadata, read_model_state, read_train_state, verify
from trainer.paths import staged

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


def model_record(path: Path) -> tuple[object, str]:
    # -> (the model's arguments, the run's tokenizer dir or ""), as the checkpoint recorded them.
    if "train.model_config" not in read_metadata(path).state_dict_metadata:
        raise ValueError(
            f"checkpoint {path} does not record its model (saved before shardlab recorded it): export it to one "
            "file (a .safetensors or .pt target) instead"
        )
    train = read_train_state(path, {"model_config": "", "tokenizer_dir": ""})
    record = json.loads(train["model_config"])
    model = dict(record["model"])
    return build_model_args(model.pop("name"), model, record["attention"]), train["tokenizer_dir"]


def _safe_state(state: dict) -> dict:
    # safetensors refuses tensors that share storage (tied embeddings): store each once, contiguous.
    return {k: v.contiguous().clone() for k, v in state.items()}


def export(checkpoint: str, out: str, overwrite: bool = False) -> Path:
    path = resolve_resume(checkpoint, Path(checkpoint))
    target = Path(out)
    if not target.parent.is_dir():
        raise ValueError(f"cannot write {out}: {target.parent} is not a directory")
    hf = target.suffix not in FILE_FORMATS
    if hf and target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ValueError(
            f"{target} already exists and is not empty: choose another directory, or pass --overwrite"
        )
    verify(path)
    state = consolidated_model_state(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if not hf:
        if target.suffix == ".safetensors":
            save_file(_safe_state(state), str(tmp))
        else:
            torch.save(state, tmp)
        tmp.replace(target)
        return target
    args, tokenizer = model_record(path)
    config, hf_state = hf_export(args, state)
    with staged(target) as tmp:
        config.save_pretrained(tmp)
        save_file(_safe_state(hf_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer, local_files_only=True).save_pretrained(tmp)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
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
        "--overwrite", action="store_true", help="replace a Hugging Face directory that is not empty"
    )
    opts = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        target = export(opts.checkpoint, opts.out, opts.overwrite)
    except ValueError as e:
        fail(str(e))
    print(f"shardlab: wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
