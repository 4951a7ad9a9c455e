# What each `precision=` option does: the dtype parameters are held in, the autocast dtype for compute,
# and (under FSDP) the MixedPrecisionPolicy that replaces autocast.
import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    param_dtype: torch.dtype  # dtype the parameters (and so the optimizer's master copy) are held in
    compute_dtype: torch.dtype  # dtype of matmuls in forward/backward
    autocast: bool  # mixed: fp32 parameters, compute autocast to compute_dtype
    device_type: str = "cpu"

    def context(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)


PRECISIONS = {
    # name: (parameter dtype, compute dtype, autocast)
    "fp32": (torch.float32, torch.float32, False),
    "bf16-mixed": (torch.float32, torch.bfloat16, True),
}


def build_precision(name: str, device: torch.device) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: valid options are {', '.join(PRECISIONS)}")
    param_dtype, compute_dtype, autocast = PRECISIONS[name]
    if compute_dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision={name} needs a GPU with bfloat16 support: use precision=fp32")
    return Precision(name, param_dtype, compute_dtype, autocast, device.type)
