# Parameter and FLOP counts from model arguments alone, so the planner can size llama3_8b without
# allocating it; tests/test_models.py checks param_count against real modules.
import torch.nn as nn

from .gpt2 import GPT2Args
from .llama import ModelArgs


def _llama_params(args: ModelArgs, exclude_embedding: bool) -> int:
    d, hd = args.dim, args.head_dim
    attn = d * args.n_heads * hd + 2 * d * args.kv_heads * hd + args.n_heads * hd * d  # wq, wk+wv, wo
    ffn = 3 * d * args.ffn_hidden_dim  # w1, w2, w3
    block = attn + ffn + 2 * d  # + attention_norm, ffn_norm
    head = args.vocab_size * d  # output; the same matrix as tok_embeddings when tied
    embedding = 0 if args.tie_embeddings else args.vocab_size * d
    n = args.n_layers * block + d + head  # + final norm
    return n if exclude_embedding else n + embedding


def _gpt2_params(args: GPT2Args, exclude_embedding: bool) -> int:
    d = args.dim
    attn = d * 3 * d + 3 * d + d * d + d  # wqkv, wo with biases
    mlp = d * 4 * d + 4 * d + 4 * d * d + d  # w1, w2 with biases
    block = attn + mlp + 2 * 2 * d  # two LayerNorms, weight + bias
    head = args.vocab_size * d  # tied: the token embedding is the head, so it always counts
    n = args.n_layers * block + 2 * d + head  # + final LayerNorm
    return n if exclude_embedding else n + args.max_seq_len * d  # position embedding table


def param_count(args: ModelArgs | GPT2Args, exclude_embedding: bool = False) -> int:
    # exclude_embedding drops the input lookup tables (token and, for GPT-2, position): a lookup does
    # no matmul. The output head does, so it stays, counted once when tied to the token embedding.
    if isinstance(args, ModelArgs):
        return _llama_params(args, exclude_embedding)
    if isinstance(args, GPT2Args):
        return _gpt2_params(args, exclude_embedding)
    raise TypeError(f"param_count: unsupported args type {type(args).__name__}")


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    # Same convention as param_count, for any module (native or HF): nn.Embedding tables count as
    # embeddings unless their weight is also some Linear's weight (a tied output head).
    params = list(model.parameters())  # parameters() yields a tied weight once
    n = sum(p.numel() for p in params)
    if exclude_embedding:
        linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
        n -= sum(w.numel() for i, w in tables.items() if i not in linear)
    return n


def flops_per_token(args: ModelArgs | GPT2Args, seq_len: int) -> float:
    # Training FLOPs per token, forward + backward: 6 * N_non_embedding + 12 * L * H * d_head * T.
    # This is the PaLM paper's formula (Chowdhery et al. 2022, appendix B), the one nanoGPT
    # (estimate_mfu) and torchtitan (get_num_flop_per_token) use, so MFU numbers compare.
    # 6N: each weight does one multiply-add (2 FLOPs) per token forward and two backward (input and
    # weight gradients). The attention term counts QK^T and scores @ V over the full, non-causal T x T
    # (2 matmuls * 2 FLOPs * T * d_head per head per token, times 3 for forward + backward); causal
    # kernels skip about half of it, but the convention, and FlopCounterMode's SDPA formula, do not.
    n = param_count(args, exclude_embedding=True)
    return 6.0 * n + 12.0 * args.n_layers * args.n_heads * args.head_dim * seq_len
