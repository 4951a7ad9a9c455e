# Parameter and FLOP counts from model arguments alone, from each family's own param_shapes, so the planner
# can size llama3_8b without allocating it; tests/test_models.py checks param_count against real modules.
import math

import torch.nn as nn


def count(shapes, n_layers: int, exclude_embedding: bool = False) -> int:
    # shapes: a family's ParamShapes. exclude_embedding drops the lookup tables (token and, for GPT-2,
    # position): a lookup does no matmul. A tied output head does, so it stays, counted once.
    root = sum(
        math.prod(s) for name, s in shapes.root.items() if not (exclude_embedding and name in shapes.lookups)
    )
    return root + n_layers * sum(math.prod(s) for s in shapes.block.values())


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    # Same convention as count, for any module (native or HF): nn.Embedding tables count as embeddings
    # unless their weight is also some Linear's weight (a tied output head).
    params = list(model.parameters())  # parameters() yields a tied weight once
    n = sum(p.numel() for p in params)
    if exclude_embedding:
        linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
        n -= sum(w.numel() for i, w in tables.items() if i not in linear)
    return n


def flops_per_token(n_non_embedding: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    # Training FLOPs per token, forward + backward: 6 * N_non_embedding + 12 * L * H * d_head * T.
    # This is the PaLM paper's formula (Chowdhery et al. 2022, appendix B), the one nanoGPT
    # (estimate_mfu) and torchtitan (get_num_flop_per_token) use, so MFU numbers compare.
    # 6N: each weight does one multiply-add (2 FLOPs) per token forward and two backward (input and
    # weight gradients). The attention term counts QK^T and scores @ V over the full, non-causal T x T
    # (2 matmuls * 2 FLOPs * T * d_head per head per token, times 3 for forward + backward); causal
    # kernels skip about half of it, but the convention, and FlopCounterMode's SDPA formula, do not.
    return 6.0 * n_non_embedding + 12.0 * n_layers * n_heads * head_dim * seq_len
