# AdamW and its schedule: linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps.
# adamw8bit is torchao's AdamW with both moments quantised to 8 bits in blocks of 256 (one fp32 scale per
# block): 2 bytes of state per parameter instead of 8. Tensors under 4096 elements keep fp32 states.
import math

import torch

from trainer.config import one_of

# optim= option -> what its state is (the memory planner prints it; state_bytes counts it).
OPTIMIZERS = {
    "adamw": "AdamW: exp_avg + exp_avg_sq in the weights' dtype",
    "adamw8bit": "torchao AdamW8bit: 2 x uint8 + an fp32 scale per 256 (local shards < 4096 elements or not a multiple of 256: the weights' dtype)",
}
# optim.implementation -> torch.optim.AdamW flags; "auto" picks fused on CUDA, foreach elsewhere.
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def implementation(impl: str, device_type: str) -> str:
    return ("fused" if device_type == "cuda" else "foreach") if impl == "auto" else impl


def state_bytes(optim: str, weight_bytes: int, local: int) -> float:
    # State bytes a rank holds for one parameter tensor, `local` of whose elements are on this rank.
    # AdamW's moments are zeros_like(param), so the weights' dtype (its scalar step is ignored). torchao's
    # AdamW8bit (0.18, optim/adam.py _new_buffer) quantises both moments to 8 bits in blocks of 256 with an
    # fp32 scale each (the "2 bytes instead of 8" of 8-bit optimizers) plus a 256-entry fp32 code book per
    # moment, but only where this rank's own (local) shard has at least 4096 elements and a multiple of 256;
    # any other tensor keeps zeros_like moments, in the weights' dtype.
    if optim == "adamw":
        return 2.0 * weight_bytes * local
    if optim == "adamw8bit":
        quantised = local >= 4096 and local % 256 == 0
        return 2 * ((1 + 4 / 256) * local + 4 * 256) if quantised else 2.0 * weight_bytes * local
    one_of("optim", optim, OPTIMIZERS)
    raise AssertionError(f"no state rule for optim {optim!r}")


def check_config(cfg) -> None:
    # The optim sub-config, before any worker starts (its numeric ranges are in its schema).
    one_of("optim.name", cfg.name, OPTIMIZERS)
    one_of("optim.implementation", cfg.implementation, ("auto", *IMPLEMENTATIONS))
    if cfg.name == "adamw8bit" and cfg.implementation != "auto":
        raise ValueError(
            f"optim.implementation={cfg.implementation} picks a kernel of torch's AdamW; optim=adamw8bit has its "
            "own (compiled on the first step): leave optim.implementation=auto"
        )


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    one_of("optim", cfg.name, OPTIMIZERS)
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on matrices only; norms' gains (1-D) are left alone, as in nanoGPT and Llama.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # An empty group (LoRA's adapters are all matrices) is left out: DCP's flattened optimizer state cannot
    # load one back (torch 2.13, state_dict._unflatten_optim_state_dict reads each group's first parameter).
    groups = [g for g in groups if g["params"]]
    betas = (cfg.beta1, cfg.beta2)
    if (
        cfg.name == "adamw8bit"
    ):  # its own kernel, compiled on the first step: optim.implementation does not apply
        from torchao.optim import AdamW8bit  # imported only when chosen: torchao is slow to import

        return AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    impl = implementation(cfg.implementation, device.type)
    one_of("optim.implementation", impl, ("auto", *IMPLEMENTATIONS))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, **IMPLEMENTATIONS[impl])


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    # `step` counts optimizer steps taken so far (LambdaLR's epoch): step 0 is the first update.
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    )
