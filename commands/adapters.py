# A LoRA checkpoint (finetune=lora) holds the adapters, not the base: what export and sample need of the base, and
# the two forms an export takes. The base is rebuilt as training saw it (model=hf: its model.name_or_path; a native
# model: model.init_from, or its seed), then the run's precision applied to it (bf16, or NF4 and back: QLoRA's
# base is what its 4 bits dequantize to). Merged: each adapted weight W + alpha/r * B @ A, in fp32, as a Hugging
# Face directory. peft's format: adapter_config.json (peft's own LoraConfig) and adapter_model.safetensors under
# peft's names (base_model.model.<the transformers module>.lora_A.weight), which
# peft.PeftModel.from_pretrained(<the base>, dir) loads.
import json
from pathlib import Path

import torch

from models import HFArgs, build_model
from models.llama import LORA_A, LORA_B, to_hf
from trainer.checkpoint_io import read_metadata, read_train_state
from trainer.precision import build_precision
from trainer.pretrained import weight_source


def finetune_of(path: Path) -> dict | None:
    # The checkpoint's record of its fine-tuning (trainer/finetune.record); None for full fine-tuning.
    if "train.finetune" not in read_metadata(path).state_dict_metadata:
        return None
    return json.loads(read_train_state(path, {"finetune": ""})["finetune"])


def base_state(args, model_cfg: dict, ft: dict) -> dict[str, torch.Tensor]:
    # The frozen base's weights, in fp32, as the run trained on them.
    model = build_model(args)
    if model_cfg.get("init_from"):
        model.weight_source = weight_source(model_cfg["init_from"], args)
    model.init_weights(ft["seed"])
    build_precision(ft["precision"], torch.device("cpu")).prepare_model(model)  # bf16; NF4
    out = {}
    for name, t in model.state_dict().items():
        t = t.get_original_weight() if hasattr(t, "get_original_weight") else t  # NF4: what it dequantizes to
        out[name] = t.float()
    return out


def pairs(adapters: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    # The adapted Linear's name (layers.0.attention.wq) -> (A, B).
    out = {}
    for name, a in adapters.items():
        if LORA_A in name:
            linear, _, rest = name.partition(LORA_A)
            out[linear] = (a, adapters[f"{linear}{LORA_B}{rest}"])
    return out


def merged_state(base: dict[str, torch.Tensor], adapters: dict, ft: dict) -> dict[str, torch.Tensor]:
    scale = ft["alpha"] / ft["rank"]
    out = dict(base)
    for linear, (a, b) in pairs(adapters).items():
        out[f"{linear}.weight"] = base[f"{linear}.weight"] + scale * (b.float() @ a.float())
    return out


def transformers_module(linear: str, args) -> str:
    # A Linear's name here -> its module's name in the transformers model (LlamaForCausalLM's for a native Llama).
    if isinstance(args, HFArgs):
        return linear.removeprefix("hf.")
    return next(iter(to_hf({f"{linear}.weight": None}))).removesuffix(".weight")


def write_peft(out: Path, adapters: dict, ft: dict, args) -> None:
    import peft
    from safetensors.torch import save_file

    found = pairs(adapters)
    modules = {linear: transformers_module(linear, args) for linear in found}
    config = peft.LoraConfig(
        r=ft["rank"], lora_alpha=ft["alpha"], lora_dropout=ft["dropout"], bias="none", task_type="CAUSAL_LM",
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules.values()}),
        base_model_name_or_path=ft["base"]["source"] if Path(ft["base"]["source"]).is_dir() else None,
    )  # fmt: skip
    config.save_pretrained(str(out))
    tensors = {}
    for linear, (a, b) in found.items():
        tensors[f"base_model.model.{modules[linear]}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{modules[linear]}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
