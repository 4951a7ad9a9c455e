# Llama-family decoder (Llama 2/3 shapes): RMSNorm, rotary position embeddings, SwiGLU FFN and
# grouped-query attention. Parameter names follow Meta's reference code (wq/wk/wv/wo, w1/w2/w3,
# attention_norm/ffn_norm), as gpt-fast and torchtitan do, so strategies can find the blocks by name.
import math
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import ATTENTION, get_attention, one_of
from .plan import ParallelPlan


def check_heads(
    dim: int, n_heads: int, n_kv: int | None = None, kv_source: str = "model.n_kv_heads", rotary: bool = False
) -> None:
    # The head shapes every family needs, in the config's words: dim splits into n_heads heads, the heads into
    # groups of each K/V head, and rotary embeddings need an even head dimension.
    if dim % n_heads:
        raise ValueError(
            f"model.dim ({dim}) is not divisible by model.n_heads ({n_heads}): choose model.n_heads that divides {dim}"
        )
    if n_kv is not None and n_heads % n_kv:
        raise ValueError(
            f"model.n_heads ({n_heads}) is not divisible by the K/V head count ({n_kv}, from {kv_source}): "
            f"choose a K/V head count that divides {n_heads}"
        )
    if rotary and (dim // n_heads) % 2:
        raise ValueError(
            f"model.dim / model.n_heads = {dim} / {n_heads} = {dim // n_heads} is odd, but rotary "
            "embeddings need an even head dimension: choose model.n_heads so that the quotient is even"
        )


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: plain multi-head attention (= n_heads)
    vocab_size: int = 32000
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention: str = "sdpa"  # a key of models.attention.ATTENTION

    def __post_init__(self):
        one_of("attention", self.attention, ATTENTION)
        check_heads(self.dim, self.n_heads, self.kv_heads, rotary=True)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's rule: 2/3 of 4*dim keeps SwiGLU's three matrices at the cost of a 4*dim GELU MLP.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


PRESETS: dict[str, dict] = {
    # ~1.07 M parameters; vocab 256 so raw bytes are tokens and no tokenizer is needed.
    "debug": dict(dim=128, n_layers=5, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=512),
    # ~20.7 M parameters, byte vocab: big enough that memory differences between strategies show.
    "llama_20m": dict(dim=512, n_layers=6, n_heads=8, vocab_size=256, max_seq_len=1024),
    # ~162 M parameters, the shapes of JackFram/llama-160m (FFN 3072).
    "llama_160m": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, ffn_dim_multiplier=1.5),
    # Llama-3.2-1B shapes, ~1.24 B parameters (FFN 8192). Its llama3 RoPE frequency scaling for long
    # context is not modelled: it only matters beyond 8k tokens and for loading Meta's weights.
    "llama_1b": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.5,
        rope_theta=500000.0,
        max_seq_len=8192,
        tie_embeddings=True,
    ),
    # Llama-3-70B, ~70.6 B parameters (FFN 28672): past one node's memory under FSDP alone.
    "llama3_70b": dict(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    # Llama-3-8B, ~8.03 B parameters (FFN 14336).
    "llama3_8b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
}


class ParamShapes(NamedTuple):
    # A family's parameters by name, from its arguments alone (nothing allocated): what FSDP shards apart
    # (each block, then the root), what the parameter count and the memory planner read.
    root: dict[str, tuple[int, ...]]  # outside the blocks; a tied output head appears once
    block: dict[str, tuple[int, ...]]  # one transformer block (all n_layers are alike)
    lookups: tuple[str, ...]  # root tables used only as lookups, never as a matmul weight (no FLOPs)


def param_shapes(args: ModelArgs) -> ParamShapes:
    d, v = args.dim, args.vocab_size
    hq, hkv, f = args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
    block = {
        "attention_norm.weight": (d,),
        "attention.wq.weight": (hq, d),
        "attention.wk.weight": (hkv, d),
        "attention.wv.weight": (hkv, d),
        "attention.wo.weight": (d, hq),
        "ffn_norm.weight": (d,),
        "feed_forward.w1.weight": (f, d),
        "feed_forward.w2.weight": (d, f),
        "feed_forward.w3.weight": (f, d),
    }
    root = {"tok_embeddings.weight": (v, d), "norm.weight": (d,)}
    if not args.tie_embeddings:  # tied: the embedding is the output head, a matmul weight
        root["output.weight"] = (v, d)
    return ParamShapes(root, block, () if args.tie_embeddings else ("tok_embeddings.weight",))


# ---------------------------------------------------------------- the same model in transformers
# LlamaForCausalLM holds the same tensors under other names (RoPE pairs in HF's rotate_half layout already):
# commands/export.py writes a Hugging Face directory with these, and the parity tests build one from them.
HF_BLOCK_NAMES = {
    "attention_norm": "input_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
HF_ROOT_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def hf_config(args: ModelArgs):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def to_hf(state: dict) -> dict:
    # Our parameter names -> LlamaForCausalLM's (a tied head under both names, as its state_dict has it).
    out = {}
    for name, tensor in state.items():
        head, _, leaf = name.rpartition(".")
        if head.startswith("layers."):
            _, i, module = head.split(".", 2)
            out[f"model.layers.{i}.{HF_BLOCK_NAMES[module]}.{leaf}"] = tensor
        else:
            out[f"{HF_ROOT_NAMES[head]}.{leaf}"] = tensor
    return out


def build_args(preset: str, **overrides) -> ModelArgs:
    one_of("llama preset", preset, PRESETS)
    kwargs = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelArgs(**kwargs)


# ---------------------------------------------------------------- deterministic initialisation
# Wrappers that strategies put around modules add these segments to parameter names; dropping them
# makes the init of a parameter independent of whether it was checkpointed, compiled or wrapped.
# peft's LoRA layer holds the Linear it adapts as base_layer: the base weight keeps its own name's init and source.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module", "base_layer")


def canonical_name(name: str) -> str:
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":  # DistributedDataParallel
        parts = parts[1:]
    return ".".join(parts)


def seeded_generator(name: str, seed: int, device: torch.device) -> torch.Generator:
    # crc32, not hash(): Python salts str hashes per process, and every rank must agree. The seed
    # goes into the hashed string because the CPU generator (mt19937) keeps only 32 bits of a seed.
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


# LoRA adapters as peft lays them out on a Linear (`<linear>.lora_A.<adapter>.weight`, rank x in_features, and
# `<linear>.lora_B.<adapter>.weight`, out_features x rank; the Linear itself becomes `<linear>.base_layer`) start,
# like every other parameter here, as a function of (seed, name), so that every strategy and every sharding starts
# from the same adapters. The values follow peft's default: A uniform in +-1/sqrt(in_features) (kaiming_uniform_
# with a = sqrt(5)), B zero, so that the adapted model starts as its base.
LORA_A, LORA_B = ".lora_A.", ".lora_B."


def fill_adapter_(name: str, tensor: torch.Tensor, seed: int) -> bool:
    # -> whether name is an adapter's (and tensor, its full value, is filled).
    if LORA_A in name:
        bound = 1.0 / math.sqrt(tensor.shape[1])
        tensor.uniform_(-bound, bound, generator=seeded_generator(canonical_name(name), seed, tensor.device))
        return True
    if LORA_B in name:
        tensor.zero_()
        return True
    return False


def is_residual_projection(name: str) -> bool:
    # The projections that write into the residual stream; GPT-2 scales them by 1/sqrt(2 * n_layers)
    # so the residual's variance does not grow with depth.
    return name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))


# ---------------------------------------------------------------- modules
class SeededInit:
    # For models whose every parameter is a function of (seed, name): the model supplies fill_param_ and
    # reset_buffers; this fills every parameter in place. weight_source: where pretrained weights come from
    # (name -> the full tensor; set by the trainer for model.init_from), else None: seeded.
    weight_source = None

    def load_pretrained_(self, name: str, target: torch.Tensor) -> bool:
        # A sharded strategy's materialize: fills target (the parameter's DTensor) from the pretrained source, which
        # reads this rank's part only. False when there is nothing to read (no source, or an adapter): seeded.
        if self.weight_source is None or LORA_A in name or LORA_B in name:
            return False
        self.weight_source(canonical_name(name), target)
        return True

    @torch.no_grad()
    def init_weights(self, seed: int, buffer_device: torch.device | None = None) -> None:
        for name, p in self.named_parameters():  # a tied weight appears once, as tok_embeddings
            self.fill_param_(name, p.data, seed)
        self.reset_buffers(buffer_device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares of bf16 activations is too coarse.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, ...]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # each (max_seq_len, hd/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, n, T, hd); cos, sin (T, hd/2). Rotates the pairs (x[i], x[i + hd/2]): HF's "rotate_half"
    # layout, so HF Llama checkpoints load without permuting wq/wk (Meta's layout interleaves pairs).
    # Computed in fp32 because the angles at large positions need the precision.
    x1, x2 = x.float().chunk(2, dim=-1)  # each (B, n, T, hd/2)
    cos, sin = cos.float(), sin.float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.attn_fn = get_attention(args.attention)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts from the projections' widths, not from args: under tensor parallelism each rank holds
        # n_heads / tp query heads and n_kv_heads / tp K/V heads (column-parallel wq, wk, wv).
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attn_fn(q, k, v, causal=True)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


# Meta's layout, as torchtitan splits it: q, k, v (K/V heads split across ranks under GQA) and the SwiGLU gate
# and up projections column-wise; the attention output and the down projection row-wise.
PLAN = ParallelPlan(
    blocks="layers",
    colwise=("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"),
    rowwise=("attention.wo", "feed_forward.w2"),
    norms=("attention_norm", "ffn_norm"),
    embedding="tok_embeddings",
    final_norm="norm",
    head="output",
    sp_inputs=(("attention", 3), ("feed_forward", 1)),  # attention(x, cos, sin), feed_forward(x)
    first_stage=("tok_embeddings",),
    last_stage=("norm", "output"),
)


class Transformer(SeededInit, nn.Module):
    parallel_plan = PLAN

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: derived from args, so not in checkpoints; rebuilt by reset_buffers().
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # to_empty() from meta makes a new Parameter per module, silently untying the output head
        # from the embedding (FSDP2 keeps the tie itself, and then this is a no-op).
        super()._apply(fn, recurse)
        if self.args.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_stage(tokens, self.layers, embed=True, head=True)

    def forward_stage(self, x: torch.Tensor, layers, embed: bool, head: bool, seq_len: int | None = None):
        # The model, or one pipeline stage of it: x is the tokens (B, T) where the stage embeds them, else the
        # residual stream (B, T, D) from the stage before; layers are the stage's blocks, in order. seq_len: T
        # where x holds a slice of the sequence (sequence parallelism's shard of the residual stream).
        T = seq_len or x.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(x) if embed else x  # (B, T, D)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hd/2)
        for layer in layers:
            h = layer(h, cos, sin)
        return (
            self.output(self.norm(h)) if head else h
        )  # (B, T, vocab) in the compute dtype: the loss is the caller's

    def fill_param_(self, name: str, tensor: torch.Tensor, seed: int) -> None:
        # Fills a full-size tensor for parameter `name` from (seed, name) alone, so every rank and
        # every sharding gets the same numbers on the same device type.
        if tensor.is_meta or fill_adapter_(name, tensor, seed):
            return
        name = canonical_name(name)
        if self.weight_source is not None:  # pretrained (model.init_from): the source's tensor
            self.weight_source(name, tensor)
            return
        if self.args.tie_embeddings and name == "output.weight":
            name = "tok_embeddings.weight"  # one matrix, one stream, whichever name it is reached by
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
            return
        std = 0.02 / math.sqrt(2 * self.args.n_layers) if is_residual_projection(name) else 0.02
        tensor.normal_(0.0, std, generator=seeded_generator(name, seed, tensor.device))

    def reset_buffers(self, device: torch.device | None = None) -> None:
        # After to_empty() the RoPE tables hold garbage: recompute them, by default where the
        # parameters live. With FSDP CPU offload the parameters stay on CPU but forward runs on the
        # GPU, so pass the compute device (torchtitan's buffer_device).
        device = self.tok_embeddings.weight.device if device is None else device
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device)
        self.rope_cos, self.rope_sin = cos, sin
