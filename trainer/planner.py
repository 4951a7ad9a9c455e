# Memory planner: the bytes one rank holds while it trains one step, from the model's arguments and the
# run's config alone (nothing is allocated, so llama3_8b on 8 GPUs plans on a laptop). trainer/memory.py
# measures the same categories with PyTorch's MemTracker; tests/test_memory.py holds the two together.
#
# Model state per parameter (tables below): weights + gradients + optimizer state (+ a master copy where
# weights are held in low precision and the optimizer updates an fp32 one). fp32 AdamW: 4 + 4 + 8 = 16
# bytes; the seed text's "~24 bytes per parameter to train" is that plus activations and temporaries;
# ZeRO's mixed-precision 2 + 2 + 12 = 16 is bf16-mixed's 4 + 4 + 8 here (the fp32 weights are the master,
# gradients are fp32). DDP holds all of it on every rank; FSDP full shard (ZeRO-3) divides it by the shard
# group; shard-grad-op (ZeRO-2) also keeps the gathered weights from forward to backward; HSDP divides by
# its shard dim; CPU offload moves the sharded state to host memory.
#
# Activations: what autograd saves in models/llama.py and models/gpt2.py, op by op (layer_terms), checked
# against MemTracker. The peak is the largest of a few moments of the step (peak_events), not the sum of
# everything: at the start of backward all activations exist and no gradient yet; at the optimizer step it
# is the other way round.
import math
from dataclasses import dataclass, field

from models.gpt2 import GPT2Args
from models.llama import ModelArgs

GB = 1e9  # decimal, like every *_gb key of shardlab


@dataclass(frozen=True)
class PrecisionBytes:
    weights: int  # bytes per parameter as held on the device (what the optimizer updates)
    grads: int  # per gradient element: gradients take the weights' dtype
    master: int  # a separate fp32 copy the optimizer updates while weights are held in low precision
    compute: int  # per element of a matmul output, and of what matmuls save for backward
    autocast: bool  # fp32 weights and residual stream, matmuls in `compute` (FSDP: MixedPrecisionPolicy)
    linear: str | None = None  # torchao swaps the Linears (fp8, int8): they save their input as given


# No recipe here keeps a separate master: mixed precision holds fp32 weights (they are the master) and
# casts per matmul; bf16-true trains the bf16 weights themselves (so AdamW's states are bf16 too).
PRECISION_BYTES = {
    "fp32": PrecisionBytes(4, 4, 0, 4, False),
    "tf32": PrecisionBytes(4, 4, 0, 4, False),  # tf32 changes matmul arithmetic, not storage
    "bf16-mixed": PrecisionBytes(4, 4, 0, 2, True),
    "fp16-mixed": PrecisionBytes(4, 4, 0, 2, True),  # + GradScaler's few scalars
    "bf16-true": PrecisionBytes(2, 2, 0, 2, False),
    # bf16-mixed whose Linears torchao replaces: the fp32 weight is cast to 1 byte inside each matmul
    # (nothing cached); inputs are saved as they arrive. int8's Linears return their input's dtype.
    "fp8": PrecisionBytes(4, 4, 0, 2, True, "float8"),
    "fp8-rowwise": PrecisionBytes(4, 4, 0, 2, True, "float8"),
    "int8": PrecisionBytes(4, 4, 0, 2, True, "int8"),
}

# optim -> what its state is, for the plan's printout; the bytes come from optimizer_bytes.
OPTIMIZERS = {
    "adamw": "AdamW: exp_avg + exp_avg_sq in the weights' dtype",
    "adamw8bit": "torchao AdamW8bit: 2 x uint8 + an fp32 scale per 256 (tensors < 4096 elements: fp32)",
}


def optimizer_bytes(optim: str, weight_bytes: int, numel: int, local: int) -> float:
    # State bytes this rank holds for one parameter tensor of `numel` elements, `local` of them here.
    # AdamW's moments are zeros_like(param), so the weights' dtype (its scalar step is ignored). torchao's
    # AdamW8bit quantises both moments to 8 bits in blocks of 256 with an fp32 scale each (the "2 bytes
    # instead of 8" of 8-bit optimizers) plus a 256-entry fp32 code book per moment; tensors under 4096
    # elements keep fp32 moments.
    if optim == "adamw":
        return 2.0 * weight_bytes * local
    if optim == "adamw8bit":
        return 2 * ((1 + 4 / 256) * local + 4 * 256) if numel >= 4096 else 8.0 * local
    raise ValueError(f"unknown optim {optim!r} for the planner; valid: {', '.join(OPTIMIZERS)}")


def precision_bytes(name: str) -> PrecisionBytes:
    if name not in PRECISION_BYTES:
        raise ValueError(f"unknown precision {name!r} for the planner; valid: {', '.join(PRECISION_BYTES)}")
    return PRECISION_BYTES[name]


@dataclass(frozen=True)
class PlanSpec:
    # The config values the arithmetic reads (spec_from_config fills it from the Hydra config).
    precision: str = "fp32"
    optim: str = "adamw"
    strategy: str = "single"  # single | ddp | fsdp | hsdp
    world_size: int = 1
    micro_batch: int = 1  # sequences per rank per forward
    seq_len: int = 256
    grad_accum: int = 1
    reshard_after_forward: bool = True  # fsdp/hsdp: false = shard-grad-op (ZeRO-2)
    cpu_offload: bool = False
    shard_size: int = 0  # hsdp: ranks per shard group (resolved, > 0)
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = 2
    optim_impl: str = "auto"  # auto | fused | foreach | for_loop
    device: str = "cuda"  # cuda | cpu: which AdamW kernel "auto" picks; on cpu, offload stays on the device

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp", "hsdp")

    @property
    def shard(self) -> int:  # ranks that share one copy of the model state
        if self.strategy == "hsdp":
            return self.shard_size or self.world_size
        return self.world_size if self.strategy == "fsdp" else 1

    @property
    def offloaded(self) -> bool:  # model state in host memory; on a CPU run the host is the device
        return self.sharded and self.cpu_offload and self.device != "cpu"


# ---------------------------------------------------------------- parameters, as the models build them
def _llama(args) -> bool:
    return hasattr(args, "ffn_hidden_dim")


def param_shapes(args) -> tuple[list[tuple], list[tuple]]:
    # -> (root shapes, one block's shapes): FSDP shards each block and the root apart; AdamW groups by ndim.
    d, v = args.dim, args.vocab_size
    if _llama(args):  # wq wk wv wo, w1 w2 w3, two RMSNorm gains; final norm, embedding, head
        hq, hkv, f = args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim
        block = [(d,), (hq, d), (hkv, d), (hkv, d), (d, hq), (d,), (f, d), (d, f), (f, d)]
        return [(v, d), (d,)] + ([] if args.tie_embeddings else [(v, d)]), block
    # GPT-2: fused qkv and biases, 4*dim GELU MLP, LayerNorms with bias; tied head, learned positions
    block = [
        (d,),
        (d,),
        (3 * d, d),
        (3 * d,),
        (d, d),
        (d,),
        (d,),
        (d,),
        (4 * d, d),
        (4 * d,),
        (d, 4 * d),
        (d,),
    ]
    return [(v, d), (args.max_seq_len, d), (d,), (d,)], block


def _numel(shape: tuple, shard: int = 1) -> int:
    # FSDP2 pads dim 0 to a multiple of the shard group and keeps one slice of it per rank.
    return math.ceil(shape[0] / shard) * math.prod(shape[1:])


def _all_shapes(args) -> list[tuple]:
    root, block = param_shapes(args)
    return root + block * args.n_layers


# ---------------------------------------------------------------- activations
def _widths(spec: PlanSpec) -> tuple[int, int, bool]:
    # -> (residual, compute, cast): bytes per element of the residual stream and of matmul outputs, and
    # whether autocast casts each nn.Linear's fp32 input (one saved bf16 copy per Linear call). Under FSDP
    # the MixedPrecisionPolicy gathers bf16 weights instead of autocast: everything runs in bf16.
    p = precision_bytes(spec.precision)
    if p.autocast and not spec.sharded:
        return 4, p.compute, p.linear is None
    return (p.compute if p.autocast else p.weights), p.compute, False


def layer_terms(args, spec: PlanSpec, checkpointed: bool = False) -> dict[str, float]:
    # Bytes one transformer block saves for backward, per term; E = micro_batch * seq_len tokens.
    # Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
    # sbh(34 + 5as/h) for GPT in fp16 with dropout. Here, op by op, what autograd keeps in this code (no
    # dropout, RMSNorm, RoPE, SwiGLU with three matrices, GQA), in the dtypes each precision produces.
    b, t, d, h = spec.micro_batch, spec.seq_len, args.dim, args.n_heads
    e, p = b * t, precision_bytes(spec.precision)
    r, c, cast = _widths(spec)
    if checkpointed:  # the checkpoint keeps the block's input and recomputes the rest in backward
        return {"block input (checkpoint)": r * e * d}
    if not _llama(args):
        return _gpt2_layer_terms(args, spec)
    # RMSNorm (x2): pow and mul keep the fp32 input (x itself when the residual is fp32, else x.float()),
    # the rsqrt (E, fp32) and the normalised x (residual dtype). The Linears reading its output keep it
    # (residual dtype), unless autocast casts it: then each keeps its own cast (3 for wq/wk/wv, 2 for w1/w3).
    norm = 2 * (4 * e * d + 4 * e + r * e * d) + (5 * c * e * d if cast else 2 * r * e * d)
    terms = {"RMSNorms: fp32 input, rsqrt, normalised, Linear inputs": norm}
    # RoPE multiplies by constant cos/sin, so q and k before rotation are not kept; the rotated q, k and v
    # are, by the attention kernel, and so is its output reshaped to (B, T, H*hd) for wo (a copy).
    if args.attention == "standard":
        # q @ k^T keeps q and k, softmax its fp32 output (B, H, T, T), probs @ v the probs cast back to the
        # compute dtype, and v; masked_fill its (T, T) bool mask. The raw and scaled scores are freed.
        # K/V are repeat_interleave'd to n_heads first, so GQA keeps full-size K/V here.
        terms["q, k, v (k, v repeated to n_heads)"] = 3 * c * e * d
        terms["scores: softmax (fp32) + probs, (B, H, T, T)"] = _scores(b, h, t, c)
    else:  # flash / sdpa: q, k, v, the output, the logsumexp (B, H, T) fp32; no T x T; GQA's K/V stay small
        terms["q, k, v"] = c * e * (d + 2 * args.kv_heads * args.head_dim)
        terms["attention output + logsumexp"] = c * e * d + 4 * b * h * t
    terms["attention output reshaped for wo"] = c * e * d
    if spec.sharded and p.autocast:
        # MixedPrecisionPolicy casts each block's inputs to bf16, cos/sin included; apply_rope's .float()
        # then makes fp32 copies (T, hd/2), one per use (q and k), which the products keep.
        terms["RoPE cos/sin fp32 copies"] = 4 * 4 * t * args.head_dim // 2
    # SwiGLU: w1's output (kept by silu), silu's and w3's (kept by the product), the product (kept by w2).
    terms["SwiGLU: w1, silu, w3, product"] = 4 * _ffn_width(spec) * e * args.ffn_hidden_dim
    if cast:  # autocast's cache: one bf16 copy per matmul weight, kept by the matmul until backward
        terms["bf16 weight copies (autocast cache)"] = c * _matmul_numel(param_shapes(args)[1])
    return terms


def _scores(b: int, h: int, t: int, c: int) -> int:
    return 4 * b * h * t * t + (c * b * h * t * t if c < 4 else 0) + t * t


def _ffn_width(spec: PlanSpec) -> int:
    r, c, _ = _widths(spec)
    return r if precision_bytes(spec.precision).linear == "int8" else c  # int8 Linears keep fp32 after norms


def _matmul_numel(shapes: list[tuple]) -> int:
    return sum(_numel(s) for s in shapes if len(s) == 2)


def _gpt2_layer_terms(args, spec: PlanSpec) -> dict[str, float]:
    # models/gpt2.py, the same way: LayerNorm keeps its input, mean and rstd (fp32 under autocast, which
    # runs it in fp32), the Linear reading it its output (or autocast's cast). q, k, v are views of one
    # fused qkv output: flash keeps that storage and its output (wo reads it as a view); standard
    # attention copies q, k, v for its matmuls. GELU MLP: w1's output (kept by gelu), gelu's (kept by w2).
    b, t, d, h = spec.micro_batch, spec.seq_len, args.dim, args.n_heads
    e = b * t
    r, c, cast = _widths(spec)
    stats = 4 if precision_bytes(spec.precision).autocast and not spec.sharded else r
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
    terms["GELU MLP: w1, gelu"] = 2 * _ffn_width(spec) * e * 4 * d
    if cast:
        terms["bf16 weight copies (autocast cache)"] = c * _matmul_numel(param_shapes(args)[1])
    return terms


def head_terms(args, spec: PlanSpec) -> dict[str, float]:
    # The final norm, the output head and the loss. The fp32 log-softmax over the vocabulary dominates
    # small models: cross_entropy(logits.float()) keeps its (E, V) fp32 output, and the loop holds the
    # logits themselves until the step ends. The head is never torchao-converted: autocast casts it.
    e, d, v = spec.micro_batch * spec.seq_len, args.dim, args.vocab_size
    r, c, _ = _widths(spec)
    autocast = precision_bytes(spec.precision).autocast and not spec.sharded
    norm = 4 * e * d + 4 * e + r * e * d if _llama(args) else r * e * d + 2 * (4 if autocast else r) * e
    terms = {
        "final norm": norm + (c if autocast else r) * e * d,
        "logits (held by the loop)": c * e * v,
        "log-softmax (fp32)": 4 * e * v,
    }
    if autocast:
        terms["bf16 copy of the output weight"] = c * v * d
    return terms


def checkpointed_layers(spec: PlanSpec, n_layers: int) -> list[bool]:
    # strategies/common.apply_ac: full wraps every block, selective every ac_every-th (i % ac_every == 0).
    mode = spec.activation_checkpointing
    if mode not in ("none", "full", "selective"):
        raise ValueError(f"unknown activation_checkpointing {mode!r}; valid: none, full, selective")
    return [mode == "full" or (mode == "selective" and i % spec.ac_every == 0) for i in range(n_layers)]


def _backward_scratch(args, spec: PlanSpec) -> tuple[float, float]:
    # Gradients of activations alive while a block's FFN, then its attention, runs backward (measured):
    # the residual's gradient plus the FFN's E x F gradients (3 for SwiGLU, 2 for GELU); or the q/k/v/out
    # gradients; for standard attention, the softmax's two (B, H, T, T) fp32 gradients, by which time
    # probs @ v's backward has released the compute-dtype probs.
    b, t, d = spec.micro_batch, spec.seq_len, args.dim
    e, f = b * t, getattr(args, "ffn_hidden_dim", 4 * d)
    r, c, _ = _widths(spec)
    ffn = r * e * d + (3 if _llama(args) else 2) * _ffn_width(spec) * e * f
    if args.attention != "standard":
        return ffn, r * e * d + 4 * c * e * d
    scores = b * args.n_heads * t * t
    return ffn, r * e * d + c * e * d + 8 * scores - (c * scores if c < 4 else 0)


# ---------------------------------------------------------------- model state and the peak
@dataclass
class MemoryPlan:
    spec: PlanSpec
    n_params: int
    params: float  # bytes on this rank's device
    grads: float
    optimizer: float
    buffers: float
    host: float  # model state offloaded to host memory (cpu_offload), not on the device
    layer_terms: dict[str, float]  # one block without checkpointing
    layer_bytes: list[float]  # each block as configured (a checkpointed block keeps its input only)
    head_terms: dict[str, float]
    events: dict[str, dict[str, float]] = field(default_factory=dict)  # moment -> bytes by category
    peak_event: str = ""

    @property
    def activations(self) -> float:
        return sum(self.layer_bytes) + sum(self.head_terms.values())

    @property
    def peak(self) -> float:
        return sum(self.events[self.peak_event].values())

    @property
    def temporaries(self) -> dict[str, float]:
        # What the peak moment holds besides model state and saved activations.
        state = ("params", "buffers", "grads", "optimizer", "activations")
        return {k: v for k, v in self.events[self.peak_event].items() if k not in state and v}


def model_state(args, spec: PlanSpec) -> dict[str, float]:
    # Bytes per rank of weights (+ master), gradients and optimizer state, and this rank's element count.
    p = precision_bytes(spec.precision)
    shapes = _all_shapes(args)
    local = sum(_numel(s, spec.shard) for s in shapes)
    opt = sum(optimizer_bytes(spec.optim, p.weights, _numel(s), _numel(s, spec.shard)) for s in shapes)
    return {
        "params": (p.weights + p.master) * local,
        "grads": p.grads * local,
        "optimizer": opt,
        "numel": local,
    }


def _optimizer_scratch(args, spec: PlanSpec) -> float:
    # foreach AdamW (the CPU default) allocates sqrt(exp_avg_sq) for a whole parameter group at once, the
    # matrices (weight-decayed) being the larger group; for_loop one parameter's worth at a time; fused
    # AdamW (the CUDA default) and torchao's compiled AdamW8bit step nothing measurable.
    impl = spec.optim_impl if spec.optim_impl != "auto" else ("fused" if spec.device == "cuda" else "foreach")
    if spec.optim != "adamw" or impl == "fused":
        return 0.0
    state, local = precision_bytes(spec.precision).weights, [_numel(s, spec.shard) for s in _all_shapes(args)]
    if impl == "foreach":
        return state * sum(n for n, s in zip(local, _all_shapes(args), strict=True) if len(s) >= 2)
    return 2 * state * max(local)


def _gathered(args, spec: PlanSpec) -> tuple[float, float, int]:
    # FSDP: -> (root, one block) bytes of gathered (unsharded) parameters, in the dtype they are gathered
    # in (the compute dtype under MixedPrecisionPolicy, else the weights'), and a block's element count.
    root, block = param_shapes(args)
    numel = sum(map(_numel, block))
    if not spec.sharded:
        return 0.0, 0.0, numel
    p = precision_bytes(spec.precision)
    width = p.compute if p.autocast else p.weights
    return width * sum(map(_numel, root)), width * numel, numel


def peak_events(args, spec: PlanSpec, state: dict, layer_bytes: list[float], head: dict) -> dict:
    # Bytes by category at each moment that can be the step's peak. Steady state: the optimizer state
    # exists; the previous step's zero_grad(set_to_none=True) freed the gradients.
    off = spec.offloaded
    base = {
        "params": 0.0 if off else state["params"],
        "buffers": 4.0 * args.max_seq_len * args.head_dim if _llama(args) else 0.0,  # RoPE cos, sin (fp32)
        "optimizer": 0.0 if off else state["optimizer"],
    }
    if spec.strategy == "ddp":  # DDP's gradient buckets: a second copy of the gradients, allocated up front
        base["DDP gradient buckets"] = precision_bytes(spec.precision).grads * state["numel"]
    grads = 0.0 if off else state["grads"]
    # Gradient accumulation: later micro-batches run forward with the gradients held (under FSDP without
    # sync: unsharded, fp32) and the previous micro-batch's logits.
    held = (4.0 * state["numel"] * spec.shard if spec.sharded else grads) if spec.grad_accum > 1 else 0.0
    events = _forward_events(args, spec, base, held, layer_bytes, head)
    events.update(_backward_events(args, spec, base, held, layer_bytes, head["logits (held by the loop)"]))
    # The optimizer step: every gradient, the state, the step's scratch; the loop still holds the logits.
    events["optimizer step"] = {
        **base,
        "grads": grads,
        "activations": head["logits (held by the loop)"],
        "optimizer scratch": 0.0 if off else _optimizer_scratch(args, spec),
    }
    return events


def _forward_events(args, spec, base, held, layer_bytes, head) -> dict:
    e, v = spec.micro_batch * spec.seq_len, args.vocab_size
    _, c, cast = _widths(spec)
    acts, logits = sum(layer_bytes) + sum(head.values()), head["logits (held by the loop)"]
    # FSDP: the root stays gathered from forward to the end of backward; shard-grad-op keeps every block.
    root_g, block_g, _ = _gathered(args, spec)
    gathered = root_g + (0.0 if spec.reshard_after_forward else block_g * args.n_layers)
    n_ckpt = sum(checkpointed_layers(spec, args.n_layers))
    return {
        # The loss: every activation, and the fp32 copy of the logits that cross_entropy reads. Checkpointed
        # blocks keep no bf16 weight copies, but autocast's cache holds them until forward ends.
        "forward (loss)": {
            **base,
            "grads": held,
            "activations": acts,
            "gathered params": gathered,
            "logits fp32 copy": 4 * e * v if c < 4 else 0.0,
            "autocast cache": c * _matmul_numel(param_shapes(args)[1]) * n_ckpt if cast else 0.0,
            "previous logits": logits if spec.grad_accum > 1 else 0.0,
        },
        # The start of backward: the gradients of the log-softmax and of its input, fp32, E x V each.
        "start of backward": {
            **base,
            "grads": held,
            "activations": acts,
            "gathered params": gathered,
            "loss gradients": 8 * e * v,
        },
    }


def _backward_events(args, spec, base, held, layer_bytes, logits) -> dict:
    # Gradients appear as backward goes: the output head's first (under FSDP unsharded, in the gathered
    # dtype, until the root's post-backward), then each block's (sharded once reduce-scattered).
    p, off = precision_bytes(spec.precision), spec.offloaded
    root, block = param_shapes(args)
    root_g, _, _ = _gathered(args, spec)
    head_numel = args.vocab_size * args.dim + args.dim  # output weight (the embedding, if tied), final norm
    head_grad = 0.0 if off else (root_g / sum(map(_numel, root)) if spec.sharded else p.grads) * head_numel
    block_grad = 0.0 if off else p.grads * sum(_numel(s, spec.shard) for s in block)
    events = {}
    for i in reversed(range(args.n_layers)):
        done = max(held, head_grad + block_grad * (args.n_layers - 1 - i))
        events.update(_block_events(args, spec, i, base, done, layer_bytes, logits))
    if spec.sharded:  # the root's post-backward: its gradients (embedding, head) reduce-scattered last
        events["backward of the root (reduce-scatter)"] = {
            **base,
            "grads": max(held, block_grad * args.n_layers),
            "activations": logits,
            "reduce-scatter buffers": _reduce_scatter(spec, sum(map(_numel, root))),
        }
    return events


def _reduce_scatter(spec: PlanSpec, numel: int) -> float:
    # FSDP2's post-backward (foreach_reduce) for numel gathered elements: their unsharded gradients (gathered
    # dtype) are copied into the fp32 reduce-scatter input (on CPU torch._chunk_cat builds the fp32
    # concatenation in a temporary first; CUDA's kernel writes in place), then freed before the output
    # (one shard) is allocated.
    _, c, _ = _widths(spec)
    return max(c + 4 + (4 if spec.device == "cpu" else 0), 4 + 4 / spec.shard) * numel


def _block_events(args, spec, i, base, done, layer_bytes, logits) -> dict:
    # Block i's backward (blocks run last to first): the blocks before it still hold their activations,
    # the root and the blocks after it have made their gradients. Its FFN runs backward first (all of the
    # block's activations held), then attention (the FFN's released); a checkpointed block first
    # recomputes its activations. Under FSDP this block and the prefetched next one are gathered, and its
    # post-backward reduce-scatters its gradients. `done`: the gradients made so far.
    terms = layer_terms(args, spec)
    full = sum(terms.values())
    ffn = terms.get("SwiGLU: w1, silu, w3, product", terms.get("GELU MLP: w1, gelu", 0.0))
    ckpt = layer_bytes[i] < full
    before = sum(layer_bytes[:i]) + logits
    root_g, block_g, numel = _gathered(args, spec)
    gathered = root_g + (block_g * (2 if i else 1) if spec.reshard_after_forward else block_g * (i + 1))
    events = {}
    phases = zip(("FFN", "attention"), _backward_scratch(args, spec), (full, full - ffn), strict=True)
    for phase, scratch, own in phases:
        events[f"backward of block {i} ({phase})"] = {
            **base,
            "grads": done,
            "activations": before + (layer_bytes[i] if ckpt else own),
            "recomputed block": own - layer_bytes[i] if ckpt else 0.0,
            "backward scratch": scratch,
            "gathered params": gathered,
        }
    if spec.sharded:
        events[f"backward of block {i} (reduce-scatter)"] = {
            **base,
            "grads": done,
            "activations": before,
            "gathered params": gathered - block_g,
            "reduce-scatter buffers": _reduce_scatter(spec, numel),
        }
    return events


def plan_memory(args, spec: PlanSpec) -> MemoryPlan:
    if not isinstance(args, ModelArgs | GPT2Args):
        raise ValueError(f"the planner covers the native llama and gpt2 families, not {type(args).__name__}")
    if spec.world_size < 1 or spec.shard < 1 or spec.world_size % spec.shard:
        raise ValueError(f"the shard group ({spec.shard}) must divide the world size ({spec.world_size})")
    state = model_state(args, spec)
    layer_bytes = [sum(layer_terms(args, spec, k).values()) for k in checkpointed_layers(spec, args.n_layers)]
    head = head_terms(args, spec)
    events = peak_events(args, spec, state, layer_bytes, head)
    off = spec.offloaded
    return MemoryPlan(
        spec=spec,
        n_params=sum(map(_numel, _all_shapes(args))),
        params=0.0 if off else state["params"],
        grads=0.0 if off else state["grads"],
        optimizer=0.0 if off else state["optimizer"],
        buffers=events["optimizer step"]["buffers"],
        host=state["params"] + state["grads"] + state["optimizer"] if off else 0.0,
        layer_terms=layer_terms(args, spec),
        layer_bytes=layer_bytes,
        head_terms=head,
        events=events,
        peak_event=max(events, key=lambda k: sum(events[k].values())),
    )


def spec_from_config(cfg, world_size: int, device: str, local_world_size: int | None = None) -> PlanSpec:
    # The run's Hydra config -> PlanSpec. local_world_size: ranks per node, HSDP's default shard group.
    from trainer.checks import batch_layout

    s, t = cfg.strategy, cfg.trainer
    micro, accum = batch_layout(t, world_size)
    return PlanSpec(
        precision=cfg.precision.name,
        optim=cfg.optim.name,
        strategy=s.name,
        world_size=world_size,
        micro_batch=micro,
        seq_len=t.seq_len,
        grad_accum=accum,
        reshard_after_forward=s.get("reshard_after_forward", True),
        cpu_offload=s.get("cpu_offload", False),
        shard_size=(s.get("shard_size") or local_world_size or world_size) if s.name == "hsdp" else 0,
        activation_checkpointing=s.activation_checkpointing,
        ac_every=s.ac_every,
        optim_impl=cfg.optim.get("implementation", "auto"),
        device=device,
    )
