# GPT-2 family (after nanoGPT): pre-LayerNorm with bias, GELU MLP of 4 * dim, learned position
# embeddings, output head tied to the token embeddings. Same module names and init interface as the
# Llama model (tok_embeddings, layers, norm, output; attention.wo and feed_forward.w2 are the
# residual projections), so strategies and the trainer need not know which family they hold.
# No dropout: shardlab measures and trains throughput-bound runs, and dropout only adds noise there.
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import ATTENTION, get_attention, one_of
from .llama import (
    ParamShapes,
    SeededInit,
    canonical_name,
    check_heads,
    fill_adapter_,
    is_residual_projection,
    seeded_generator,
)
from .plan import ParallelPlan


@dataclass
class GPT2Args:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 50257  # nanoGPT pads to 50304 for faster matmuls; 50257 matches HF's gpt2
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    attention: str = "sdpa"

    def __post_init__(self):
        one_of("attention", self.attention, ATTENTION)
        check_heads(self.dim, self.n_heads)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads


PRESETS: dict[str, dict] = {
    # ~0.89 M parameters, byte vocab.
    "gpt2_debug": dict(dim=128, n_layers=4, n_heads=4, vocab_size=256, max_seq_len=512),
    # GPT-2 small: 124 M parameters.
    "gpt2_124m": dict(dim=768, n_layers=12, n_heads=12, vocab_size=50257, max_seq_len=1024),
}


def param_shapes(args: GPT2Args) -> ParamShapes:
    # Fused qkv and biases, a 4 * dim GELU MLP, LayerNorms with bias; the head is the token embedding.
    d, v = args.dim, args.vocab_size
    block = {
        "attention_norm.weight": (d,),
        "attention_norm.bias": (d,),
        "attention.wqkv.weight": (3 * d, d),
        "attention.wqkv.bias": (3 * d,),
        "attention.wo.weight": (d, d),
        "attention.wo.bias": (d,),
        "ffn_norm.weight": (d,),
        "ffn_norm.bias": (d,),
        "feed_forward.w1.weight": (4 * d, d),
        "feed_forward.w1.bias": (4 * d,),
        "feed_forward.w2.weight": (d, 4 * d),
        "feed_forward.w2.bias": (d,),
    }
    root = {
        "tok_embeddings.weight": (v, d),
        "pos_embeddings.weight": (args.max_seq_len, d),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    return ParamShapes(root, block, ("pos_embeddings.weight",))


# ---------------------------------------------------------------- the same model in transformers
# GPT2LMHeadModel: the same tensors under other names, its attention and MLP matrices as Conv1D weights,
# stored (in, out): ours transposed. q, k, v lie in c_attn's output in the order of our fused wqkv.
HF_NAMES = {
    "tok_embeddings": "transformer.wte",
    "pos_embeddings": "transformer.wpe",
    "norm": "transformer.ln_f",
    "output": "lm_head",
    "attention_norm": "ln_1",
    "attention.wqkv": "attn.c_attn",
    "attention.wo": "attn.c_proj",
    "ffn_norm": "ln_2",
    "feed_forward.w1": "mlp.c_fc",
    "feed_forward.w2": "mlp.c_proj",
}
_CONV1D = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2")


def hf_config(args: GPT2Args):
    import transformers

    return transformers.GPT2Config(
        vocab_size=args.vocab_size,
        n_positions=args.max_seq_len,
        n_embd=args.dim,
        n_layer=args.n_layers,
        n_head=args.n_heads,
        layer_norm_epsilon=args.norm_eps,
        activation_function="gelu_new",  # the tanh approximation, as FeedForward uses
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def to_hf(state: dict) -> dict:
    out = {}
    for name, tensor in state.items():
        head, _, leaf = name.rpartition(".")
        if head.startswith("layers."):
            _, i, module = head.split(".", 2)
            key = f"transformer.h.{i}.{HF_NAMES[module]}.{leaf}"
            out[key] = tensor.t().contiguous() if module in _CONV1D and leaf == "weight" else tensor
        elif head != "output":  # the head is the token embedding, tied
            out[f"{HF_NAMES[head]}.{leaf}"] = tensor
    return out


def build_args(preset: str, **overrides) -> GPT2Args:
    one_of("gpt2 preset", preset, PRESETS)
    return GPT2Args(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


class Attention(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, 3 * args.dim)  # fused q, k, v, as GPT-2's c_attn
        self.wo = nn.Linear(args.dim, args.dim)
        self.attn_fn = get_attention(args.attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        y = self.attn_fn(q, k, v, causal=True)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, 4 * dim)
        self.w2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))  # GPT-2 used the tanh approximation


class Block(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


PLAN = ParallelPlan(
    blocks="layers",
    rowwise=("attention.wo", "feed_forward.w2"),
    colwise=("feed_forward.w1",),
    norms=("attention_norm", "ffn_norm"),
    embedding="tok_embeddings",
    final_norm="norm",
    head="output",
    # A column split of the fused (dim, 3 * dim) wqkv would give each rank a slice across q, k and v, not
    # whole heads of each: splitting it needs a layout of its own, which GPT-2 does not get here.
    unsplit="GPT-2 fuses q, k and v in one Linear (wqkv, as GPT-2's c_attn), which a column split would cut "
    "across q, k and v instead of into whole heads: use a Llama-family model for tensor parallelism",
    unpiped="GPT-2's output head is its token embedding (tied), one weight the first and the last stage would "
    "both hold: use a Llama-family model for pipeline parallelism",
)


class GPT2(SeededInit, nn.Module):
    parallel_plan = PLAN

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.output.weight is not self.tok_embeddings.weight:  # to_empty() from meta unties them
            self.output.weight = self.tok_embeddings.weight
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}")
        pos = torch.arange(T, device=tokens.device)
        h = self.tok_embeddings(tokens) + self.pos_embeddings(pos)  # (B, T, D)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))  # (B, T, vocab)

    def fill_param_(self, name: str, tensor: torch.Tensor, seed: int) -> None:
        if tensor.is_meta or fill_adapter_(name, tensor, seed):
            return
        name = canonical_name(name)
        if self.weight_source is not None:  # pretrained (model.init_from): the source's tensor
            self.weight_source(name, tensor)
            return
        if name == "output.weight":
            name = "tok_embeddings.weight"  # tied: one matrix, one stream
        if name.endswith("bias"):
            tensor.zero_()
        elif "norm." in name:  # LayerNorm weight
            tensor.fill_(1.0)
        else:
            std = 0.02 / math.sqrt(2 * self.args.n_layers) if is_residual_projection(name) else 0.02
            tensor.normal_(0.0, std, generator=seeded_generator(name, seed, tensor.device))

    def reset_buffers(self, device: torch.device | None = None) -> None:
        pass  # no buffers: positions are made in forward
