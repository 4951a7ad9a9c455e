# model.init_from: a native model starts from pretrained weights instead of a random initialisation, read from a
# Hugging Face Llama directory (config.json and safetensors, under transformers' names: the inverse of the export
# mapping, models/llama.py's to_hf) or from a shardlab checkpoint (DCP, any strategy's; a run directory gives its
# newest). The model asks for one parameter at a time: its full tensor where the model is built whole, and under FSDP
# the rank's shard only (strategies/fsdp.py's materialize), read without reading the other ranks' rows. No rank
# ever holds the whole model, nor, under FSDP, another rank's part of a weight (NF4 apart: see nf4_shard).
from pathlib import Path

import torch

from models import ModelArgs, param_shapes
from models.hf import read_safetensor_into
from models.llama import to_hf


def hf_names(args) -> dict[str, str]:
    # Native parameter name -> the name transformers gives it in a Llama directory.
    names = [
        *param_shapes(args).root,
        *(f"layers.{i}.{n}" for i in range(args.n_layers) for n in param_shapes(args).block),
    ]
    return {name: next(iter(to_hf({name: None}))) for name in names}


def source_kind(source: str, args) -> tuple[str, Path]:
    # -> ("hf", the directory) or ("checkpoint", the checkpoint directory); a refusal names what to give instead.
    from trainer.checkpoint import find_checkpoint

    root = Path(source).expanduser()
    if (root / "config.json").is_file() and list(root.glob("*.safetensors")):
        if not isinstance(args, ModelArgs):
            raise ValueError(
                f"model.init_from={source} is a Hugging Face directory, which only the native Llama family reads: "
                "give a shardlab checkpoint, or train it with model=hf model.name_or_path=<dir>"
            )
        return "hf", root
    if (found := find_checkpoint(root)) is not None:
        return "checkpoint", found
    raise ValueError(
        f"model.init_from={source} is neither a Hugging Face Llama directory (config.json and *.safetensors) nor a "
        "shardlab checkpoint or run directory: point it at one"
    )


def check_source(source: str, args) -> None:
    # Before any worker starts: the source's tensors have this model's names and shapes (read from headers and
    # metadata, no weights).
    kind, root = source_kind(source, args)
    shapes = param_shapes(args)
    want = {
        **shapes.root,
        **{f"layers.{i}.{n}": s for i in range(args.n_layers) for n, s in shapes.block.items()},
    }
    if args_tied(args):
        want.pop("output.weight", None)
    have = _hf_shapes(root, args) if kind == "hf" else _checkpoint_shapes(root)
    problems = [f"{n} is missing there" for n in want if n not in have]
    problems += [
        f"{n} is {list(have[n])} there, {list(s)} here"
        for n, s in want.items()
        if n in have and tuple(have[n]) != tuple(s)
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(
            f"model.init_from={source} does not hold this model's weights: {problems[0]}{more}: give the model "
            "config the weights were made with (model=..., and its fields)"
        )


def args_tied(args) -> bool:
    return bool(getattr(args, "tie_embeddings", False))


def _hf_shapes(root: Path, args) -> dict[str, tuple]:
    from safetensors import safe_open

    found = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            found.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return {ours: found[theirs] for ours, theirs in hf_names(args).items() if theirs in found}


def _checkpoint_shapes(path: Path) -> dict[str, tuple]:
    from trainer.checkpoint_io import read_shapes

    return {k.removeprefix("model."): v for k, v in read_shapes(path).items() if k.startswith("model.")}


def weight_source(source: str, args):
    # -> fill(name, target): fills target, the (canonical) parameter's full tensor or, under FSDP's materialize, its
    # DTensor, with the pretrained values. A DTensor reads only what overlaps its local shard: DCP plans the read
    # from the shard's offsets, and a safetensors file is sliced along dim 0 (models/hf.py's read_safetensor_into).
    kind, root = source_kind(source, args)
    if kind == "checkpoint":
        from trainer.checkpoint_io import read_model_state

        def from_checkpoint(name: str, target: torch.Tensor) -> None:
            read_model_state(root, {name: target})

        return from_checkpoint
    from safetensors import safe_open

    names = hf_names(args)
    where = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            where.update(dict.fromkeys(st.keys(), f))

    def from_hf(name: str, target: torch.Tensor) -> None:
        key = names["tok_embeddings.weight" if args_tied(args) and name == "output.weight" else name]
        read_safetensor_into(where[key], key, target)

    return from_hf
