# Activations: what autograd saves in models/llama.py and models/gpt2.py, op by op, per transformer block
# and for the head and loss, in the dtypes each precision produces; checked against MemTracker
# (tests/test_memory.py). Also the gradients of activations alive during a block's backward.
import math

from models import family, parallel_plan, param_shapes
from trainer.memory.spec import PlanSpec, precision_bytes


def local_shapes(args, spec: PlanSpec | None = None) -> tuple[dict, dict]:
    # -> (root, block) parameter shapes as one rank holds them before FSDP shards them: under tensor parallelism a
    # column-parallel weight (and its bias) split on dim 0, a row-parallel weight on dim 1 (its bias replicated),
    # the embedding and the output head over the vocabulary (dim 0), norms whole (the model's plan names which).
    shapes = param_shapes(args)
    tp = spec.dims.tp if spec is not None else 1
    if tp == 1:
        return shapes.root, shapes.block
    plan = parallel_plan(args)

    def split(name: str, shape: tuple, in_block: bool) -> tuple:
        module, _, leaf = name.rpartition(".")
        row = in_block and module in plan.rowwise
        dim = 0 if (module in plan.colwise if in_block else module in (plan.embedding, plan.head)) else None
        dim = 1 if row and leaf == "weight" else dim
        return shape if dim is None else (*shape[:dim], math.ceil(shape[dim] / tp), *shape[dim + 1 :])

    root = {n: split(n, s, False) for n, s in shapes.root.items()}
    return root, {n: split(n, s, True) for n, s in shapes.block.items()}


def block_shapes(args, spec: PlanSpec | None = None) -> list[tuple]:
    return list(local_shapes(args, spec)[1].values())


def root_shapes(args, spec: PlanSpec | None = None) -> list[tuple]:
    return list(local_shapes(args, spec)[0].values())


def all_shapes(args, spec: PlanSpec | None = None) -> list[tuple]:
    return root_shapes(args, spec) + block_shapes(args, spec) * args.n_layers


def tp_and_seq(spec: PlanSpec) -> tuple[int, int]:
    # -> (the tensor-parallel degree, what it divides the residual stream's tokens by: tp under sequence
    # parallelism, else 1)
    tp = spec.dims.tp
    return tp, (tp if spec.sequence_parallel and tp > 1 else 1)


def elements(shape: tuple, shard: int = 1) -> int:
    # FSDP2 pads dim 0 to a multiple of the shard group and keeps one slice of it per rank.
    return math.ceil(shape[0] / shard) * math.prod(shape[1:])


def is_llama(args) -> bool:
    return family(args) == "llama"


def widths(spec: PlanSpec) -> tuple[int, int, bool]:
    # -> (residual, compute, cast): bytes per element of the residual stream and of matmul outputs, and
    # whether autocast casts each nn.Linear's fp32 input (one saved bf16 copy per Linear call). Under FSDP
    # the MixedPrecisionPolicy gathers bf16 weights instead of autocast: everything runs in bf16.
    p = precision_bytes(spec.precision)
    if p.autocast and not spec.casts_params:
        return 4, p.compute, p.linear is None
    return (p.compute if p.autocast else p.weights), p.compute, False


def layer_terms(args, spec: PlanSpec, checkpointed: bool = False) -> dict[str, float]:
    # Bytes one transformer block saves for backward, per term; E = micro_batch * seq_len tokens.
    # Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
    # sbh(34 + 5as/h) for GPT in fp16 with dropout. Here, op by op, what autograd keeps in this code (no
    # dropout, RMSNorm, RoPE, SwiGLU with three matrices, GQA), in the dtypes each precision produces.
    # Tensor parallelism (tp ranks): everything on the heads or the MLP's hidden units is 1/tp per rank; under
    # sequence parallelism the norms' and the residual stream's tokens are 1/tp too (sq), but the Linears after a
    # norm keep the input gathered over the whole sequence (DTensor's all-gather feeds them the full tensor).
    b, t, d, h = spec.micro_batch, spec.seq_len, args.dim, args.n_heads
    e, p = b * t, precision_bytes(spec.precision)
    r, c, cast = widths(spec)
    tp, sq = tp_and_seq(spec)
    if checkpointed:  # the checkpoint keeps the block's input and recomputes the rest in backward
        return {"block input (checkpoint)": r * e * d / sq}
    if not is_llama(args):
        return _gpt2_layer_terms(args, spec)
    # RMSNorm (x2): pow and mul keep the fp32 input (x itself when the residual is fp32, else x.float()),
    # the rsqrt (E, fp32) and the normalised x (residual dtype). The Linears reading its output keep it
    # (residual dtype), unless autocast casts it: then each keeps its own cast (3 for wq/wk/wv, 2 for w1/w3).
    norm = 2 * (4 * e * d + 4 * e + r * e * d) / sq + (5 * c * e * d if cast else 2 * r * e * d)
    terms = {"RMSNorms: fp32 input, rsqrt, normalised, Linear inputs": norm}
    # RoPE multiplies by constant cos/sin, so q and k before rotation are not kept; the rotated q, k and v
    # are, by the attention kernel, and so is its output reshaped to (B, T, H*hd) for wo (a copy).
    if args.attention == "standard":
        # q @ k^T keeps q and k, softmax its fp32 output (B, H, T, T), probs @ v the probs cast back to the
        # compute dtype, and v; masked_fill its (T, T) bool mask. The raw and scaled scores are freed.
        # K/V are repeat_interleave'd to n_heads first, so GQA keeps full-size K/V here.
        terms["q, k, v (k, v repeated to n_heads)"] = 3 * c * e * d / tp
        terms["scores: softmax (fp32) + probs, (B, H, T, T)"] = _scores(b, h // tp, t, c)
    else:  # flash / sdpa: q, k, v, the output, the logsumexp (B, H, T) fp32; no T x T; GQA's K/V stay small
        terms["q, k, v"] = c * e * (d + 2 * args.kv_heads * args.head_dim) / tp
        terms["attention output + logsumexp"] = (c * e * d + 4 * b * h * t) / tp
    terms["attention output reshaped for wo"] = c * e * d / tp
    if spec.casts_params and p.autocast:
        # MixedPrecisionPolicy casts each block's inputs to bf16, cos/sin included; apply_rope's .float()
        # then makes fp32 copies (T, hd/2), one per use (q and k), which the products keep.
        terms["RoPE cos/sin fp32 copies"] = 4 * 4 * t * args.head_dim // 2
    # SwiGLU: w1's output (kept by silu), silu's and w3's (kept by the product), the product (kept by w2).
    terms["SwiGLU: w1, silu, w3, product"] = 4 * ffn_width(spec) * e * args.ffn_hidden_dim / tp
    if cast:  # autocast's cache: one bf16 copy per matmul weight (this rank's shard), kept until backward
        terms["bf16 weight copies (autocast cache)"] = c * matmul_elements(block_shapes(args, spec))
    return terms


def _scores(b: int, h: int, t: int, c: int) -> int:
    return 4 * b * h * t * t + (c * b * h * t * t if c < 4 else 0) + t * t


def ffn_width(spec: PlanSpec) -> int:
    r, c, _ = widths(spec)
    return r if precision_bytes(spec.precision).linear == "int8" else c  # int8 Linears keep fp32 after norms


def matmul_elements(shapes: list[tuple]) -> int:
    return sum(elements(s) for s in shapes if len(s) == 2)


def _gpt2_layer_terms(args, spec: PlanSpec) -> dict[str, float]:
    # models/gpt2.py, the same way: LayerNorm keeps its input, mean and rstd (fp32 under autocast, which
    # runs it in fp32), the Linear reading it its output (or autocast's cast). q, k, v are views of one
    # fused qkv output: flash keeps that storage and its output (wo reads it as a view); standard
    # attention copies q, k, v for its matmuls. GELU MLP: w1's output (kept by gelu), gelu's (kept by w2).
    b, t, d, h = spec.micro_batch, spec.seq_len, args.dim, args.n_heads
    e = b * t
    r, c, cast = widths(spec)
    stats = 4 if precision_bytes(spec.precision).autocast and not spec.casts_params else r
    terms = {
        "LayerNorms: input, mean, rstd, Linear input": 2
        * (r * e * d + 2 * stats * e + (c if cast else r) * e * d)
    }
    terms["q, k, v"] = 3 * c * e * d
    if args.attention == "standard":
        terms["scores: softmax (fp32) + probs, (B, H, T, T)"] = _scores(b, h, t, c)
        terms["attention output reshaped for wo"] = c * e * d
    else:
        terms["attention output + logsumexp"] = c * e * d + 4 * b * h * t
    terms["GELU MLP: w1, gelu"] = 2 * ffn_width(spec) * e * 4 * d
    if cast:
        terms["bf16 weight copies (autocast cache)"] = c * matmul_elements(block_shapes(args))
    return terms


def head_terms(args, spec: PlanSpec) -> dict[str, float]:
    # The final norm, the output head and the loss. The fp32 log-softmax over the vocabulary dominates
    # small models: cross_entropy(logits.float()) keeps its (E, V) fp32 output, and the loop holds the
    # logits themselves until the step ends. The head is never torchao-converted: autocast casts it.
    # Under tensor parallelism the logits, their log-softmax and the head's weight are sharded over the vocabulary
    # (loss_parallel), and under sequence parallelism the final norm over the sequence; the head's input is the
    # norm's output gathered over the whole sequence.
    e, d, v = spec.micro_batch * spec.seq_len, args.dim, args.vocab_size
    r, c, _ = widths(spec)
    tp, sq = tp_and_seq(spec)
    autocast = precision_bytes(spec.precision).autocast and not spec.casts_params
    norm = 4 * e * d + 4 * e + r * e * d if is_llama(args) else r * e * d + 2 * (4 if autocast else r) * e
    terms = {
        "final norm": norm / sq + (c if autocast else r) * e * d,
        "logits (held by the loop)": c * e * v / tp,
        "log-softmax (fp32)": 4 * e * v / tp,
    }
    if autocast:
        terms["bf16 copy of the output weight"] = c * v * d / tp
    return terms


def backward_scratch(args, spec: PlanSpec) -> tuple[float, float]:
    # Gradients of activations alive while a block's FFN, then its attention, runs backward (measured):
    # the residual's gradient plus the FFN's E x F gradients (3 for SwiGLU, 2 for GELU); or the q/k/v/out
    # gradients; for standard attention, the softmax's two (B, H, T, T) fp32 gradients, by which time
    # probs @ v's backward has released the compute-dtype probs.
    b, t, d = spec.micro_batch, spec.seq_len, args.dim
    e, f = b * t, (args.ffn_hidden_dim if is_llama(args) else 4 * d)
    r, c, _ = widths(spec)
    tp, sq = tp_and_seq(spec)
    ffn = r * e * d / sq + (3 if is_llama(args) else 2) * ffn_width(spec) * e * f / tp
    if args.attention != "standard":
        return ffn, r * e * d / sq + 4 * c * e * d / tp
    scores = b * args.n_heads // tp * t * t
    return ffn, r * e * d / sq + c * e * d / tp + 8 * scores - (c * scores if c < 4 else 0)
