import torch
from torch import nn

from strategies.common import apply_ac, apply_compile


def apply_single(model: nn.Module, mesh, cfg, *, device: torch.device, **_) -> nn.Module:
    apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    return model
