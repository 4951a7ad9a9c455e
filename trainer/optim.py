# AdamW and its schedule: linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps.
# adamw8bit is torchao's AdamW with both moments quantised to 8 bits in blocks of 256 (one fp32 scale per
# block): 2 bytes of state per parameter instead of 8. Tensors under 4096 elements keep fp32 states.
import math

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
# optim.implementation -> torch.optim.AdamW flags; "auto" picks fused on CUDA, foreach elsewhere.
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optim {cfg.name!r}: valid options are {', '.join(OPTIMIZERS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on matrices only; norms' gains (1-D) are left alone, as in nanoGPT and Llama.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    betas = (cfg.beta1, cfg.beta2)
    if (
        cfg.name == "adamw8bit"
    ):  # its own kernel, compiled on the first step: optim.implementation does not apply
        from torchao.optim import AdamW8bit  # imported only when chosen: torchao is slow to import

        return AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown optim.implementation {impl!r}: valid options are auto, {', '.join(IMPLEMENTATIONS)}"
        )
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
