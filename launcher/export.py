# One command from a (possibly sharded) DCP checkpoint to a single consolidated model file:
#   python -m launcher.export outputs/.../checkpoints/step_00000100 model.safetensors   (or model.pt)
# Loads in one process with no process group: DCP reassembles the full tensors from every rank's shards.
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.checkpoint import resolve_resume
from trainer.checkpoint_io import read_metadata, read_model_state, verify


def consolidated_model_state(path: Path) -> dict[str, torch.Tensor]:
    # Full (unsharded) tensors of the shapes and dtypes the metadata records, filled from every rank's files.
    md = read_metadata(path).state_dict_metadata
    state = {
        k.removeprefix("model."): torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.items()
        if k.startswith("model.") and hasattr(v, "properties")
    }
    return read_model_state(path, state)


def export(checkpoint: str, out: str) -> Path:
    path = resolve_resume(checkpoint, Path(checkpoint))
    target = Path(out)
    if target.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"output {out!r} must end in .safetensors or .pt")
    if not target.parent.is_dir():
        raise ValueError(f"cannot write {out}: {target.parent} is not a directory")
    verify(path)
    state = consolidated_model_state(path)
    tmp = target.with_name(f".{target.name}.tmp")
    if target.suffix == ".safetensors":
        # safetensors refuses tensors that share storage (tied embeddings): store each once, contiguous.
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(target)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m launcher.export <checkpoint dir> <out.safetensors|out.pt>", file=sys.stderr)
        return 2
    try:
        target = export(*argv)
    except ValueError as e:
        print(f"shardlab: error: {e}", file=sys.stderr)
        return 2
    print(f"shardlab: wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
