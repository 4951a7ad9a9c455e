# Which weights train. finetune=full: every one. finetune=lora: peft's LoRA adapters on the Linear layers of the
# transformer blocks (finetune.target_modules, by their last name; by default every one, as QLoRA does), the base
# frozen: only the adapters reach the optimizer, get gradients and go into checkpoints. peft builds the adapters
# (its LoraConfig and layer, the format users load afterwards); they start from (seed, name) like every other
# parameter (models/llama.py's fill_adapter_, peft's own distribution), so that every strategy starts alike, and
# stay in fp32 whatever the base's dtype (bf16, or NF4 under precision=nf4: QLoRA). peft's layer composes with FSDP2
# (its adapters are ordinary parameters of the block FSDP shards) and with torchao's NF4 weights (the base Linear
# calls F.linear, which NF4Tensor dequantizes): nothing of peft's is replaced here.
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from models.llama import LORA_A, LORA_B, fill_adapter_
from strategies.common import blocks
from trainer.integrity import digest_file

FINETUNES = ("full", "lora")


def is_adapter(name: str) -> bool:
    return LORA_A in name or LORA_B in name


def block_linears(model: nn.Module) -> list[str]:
    # The last names of the Linear layers inside the transformer blocks (wq ... w3; q_proj ... down_proj).
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in blocks(model).named_modules() if isinstance(m, nn.Linear)}
    )


def targets(model: nn.Module, cfg) -> list[str]:
    have = block_linears(model)
    want = list(cfg.target_modules) if cfg.target_modules else have
    if missing := [t for t in want if t not in have]:
        raise ValueError(
            f"finetune.target_modules: {', '.join(missing)} match no Linear layer of the model's blocks: its "
            f"linear layers are {', '.join(have)} (leave finetune.target_modules unset for all of them)"
        )
    return want


def apply_finetune(model: nn.Module, cfg, seed: int) -> nn.Module:
    # After the precision prepared the base (bf16, NF4), before any strategy wraps it; on the meta device too.
    if cfg is None or cfg.name == "full":
        return model
    import peft

    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets(model, cfg),
        bias="none",
    )
    model = peft.inject_adapter_in_model(config, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.data = p.data.float()  # adapters, their gradients and AdamW's state in fp32
                if not p.is_meta:  # on the meta device, materialize fills them (their fill_param_)
                    fill_adapter_(name, p.data, seed)
            else:
                p.requires_grad_(False)
    return model


def trainable_params(model: nn.Module) -> int:
    # Elements that train (a DTensor counts its global size): the adapters under LoRA, everything otherwise.
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_BASES: dict[tuple, dict] = {}  # (source, seed) -> its record: the base's files are read once per process


def base_record(model_cfg, seed: int) -> dict:
    # What a LoRA checkpoint says of the base it was trained on, to refuse another on resume: its weights' files
    # and their digests (model=hf: model.name_or_path; model.init_from), or, for a random base, the seed.
    source = model_cfg.get("name_or_path") or model_cfg.get("init_from")
    if not source:
        return {"source": f"random, trainer.seed={seed}", "digest": ""}
    key = (str(source), seed)
    if key not in _BASES:
        _BASES[key] = _digest_base(Path(source).expanduser())
    return _BASES[key]


def _digest_base(root: Path) -> dict:
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file() and _weights(p))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{digest_file(f)}".encode())
    return {"source": str(root.absolute()), "digest": h.hexdigest()[:32]}


def _weights(path: Path) -> bool:
    # The files that make a base what it is: its weights and its config (not tokenizers, not logs).
    return path.suffix in (".safetensors", ".distcp", ".bin") or path.name in ("config.json", ".metadata")


def record(finetune_cfg, model_cfg, seed: int, precision: str) -> dict[str, str]:
    # For a checkpoint's train state: how the model was fine-tuned (JSON), empty for full fine-tuning.
    if finetune_cfg.name == "full":
        return {}
    fields = {k: finetune_cfg[k] for k in ("name", "rank", "alpha", "dropout")}
    fields["target_modules"] = list(finetune_cfg.target_modules or [])
    base = base_record(model_cfg, seed)
    return {"finetune": json.dumps({**fields, "precision": precision, "seed": seed, "base": base})}
