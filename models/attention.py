# Attention kernels. Every kernel takes q (B, n_heads, T, hd), k and v (B, n_kv_heads, T, hd) and
# returns (B, n_heads, T, hd). n_heads must be a multiple of n_kv_heads (grouped-query attention):
# query head h reads K/V head h // (n_heads // n_kv_heads), the grouping of repeat_interleave, which
# is also what SDPA's enable_gqa and HF's repeat_kv do.
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_ALTERNATIVES = "use attention=sdpa or attention=standard"


def standard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    # The textbook kernel, kept on purpose: it materialises the (B, H, T, T) scores (memory quadratic
    # in T), the baseline that flash attention is measured against.
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, hd)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, T)
    if causal:
        T = q.size(-2)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T), True = visible
        scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax in fp32: in bf16 the exp-sum over long rows loses too many bits.
    probs = F.softmax(scores.float(), dim=-1).to(v.dtype)  # (B, H, T, T)
    return probs @ v  # (B, H, T, hd)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    # Pinning the backend turns a silent fallback to the math kernel (which does materialise T x T)
    # into an error: a run that asked for flash either gets it or says why.
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=k.size(1) != q.size(1)
            )
    except RuntimeError as e:
        raise RuntimeError(
            f"flash attention kernel cannot run on {q.device.type} with {q.dtype}, "
            f"shape {tuple(q.shape)}: {_ALTERNATIVES} ({e})"
        ) from e


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    # PyTorch picks flash, memory-efficient, cuDNN or math, whichever fits the inputs.
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.size(1) != q.size(1))


ATTENTION = {"standard": standard, "flash": flash, "sdpa": sdpa}


def one_of(key: str, value, valid) -> None:
    # models/ imports nothing of ours, so its registries say an unknown name here, in the words of
    # strategies.base.one_of (which trainer/ and everything above use).
    if value not in valid:
        raise ValueError(f"unknown {key} {value!r}: valid options are {', '.join(valid)}")


def get_attention(name: str):
    one_of("attention", name, ATTENTION)
    return ATTENTION[name]


def check_attention_supported(
    impl: str,
    device_type: str,
    dtype: torch.dtype,
    compute_capability: tuple[int, int] | None,
) -> None:
    # Called once before training starts, with the dtype the attention will compute in (bf16 under
    # bf16-mixed autocast, fp32 for fp32/tf32 precision), so a bad combination fails in one line
    # instead of deep inside the first forward.
    get_attention(impl)
    if impl != "flash":
        return
    if device_type == "cuda":
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention=flash on CUDA needs fp16/bf16 compute, got {dtype} (fp32/tf32 precision): "
                "use precision=bf16-mixed or attention=sdpa/standard"
            )
        if compute_capability is not None and tuple(compute_capability) < (8, 0):
            major, minor = compute_capability
            raise ValueError(
                f"attention=flash on CUDA needs compute capability >= 8.0 (Ampere or newer), "
                f"this GPU is {major}.{minor}: {_ALTERNATIVES}"
            )
    elif device_type == "cpu":
        # The CPU flash kernel runs every float dtype (checked against torch 2.13).
        if not dtype.is_floating_point:
            raise ValueError(f"attention=flash on CPU needs a float dtype, got {dtype}: {_ALTERNATIVES}")
    else:
        raise ValueError(
            f"attention=flash is only supported on cuda and cpu, not {device_type}: {_ALTERNATIVES}"
        )
