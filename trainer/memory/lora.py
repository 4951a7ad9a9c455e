# The memory of finetune=lora (and precision=nf4, QLoRA): a frozen base and small trainable adapters.
# - The base: its weights in the precision's dtype, no gradients, no optimizer state. Under precision=nf4 the
#   blocks' Linear weights as torchao's NF4Tensor stores them (measured on torchao 0.18's __tensor_flatten__):
#   4 bits a weight (uint8, two a byte), an int8 scale per block of 64, a bf16 factor per 256 of those, and a
#   bf16 mean and 16-entry code book per tensor: 0.516 bytes a weight, against 2 in bf16 and 16 to train in mixed
#   precision.
# - The adapters (trainer/finetune.py): for each adapted Linear (out, in), A (rank, in) and B (out, rank), fp32,
#   with fp32 gradients and the optimizer's state (trainer/optim.state_bytes): only they are trainable, so DDP's
#   buckets and FSDP's held gradients are theirs alone.
# - Activations: what autograd saves changes with the base frozen. A frozen Linear keeps its weight (a parameter
#   already) but not its input, which only a weight's gradient needs; peft's A keeps the input instead (in fp32:
#   peft casts it to the adapters' dtype, a copy per adapted Linear where the base computes in bf16, the same
#   tensor as the norm's output in fp32), and B keeps A's output (E x rank, fp32).
import math

from trainer.memory.activations import elements, ffn_width, is_llama, local_shapes, widths
from trainer.memory.spec import PlanSpec, precision_bytes
from trainer.optim import state_bytes

NF4_BYTES = 0.5 + 1 / 64 + 2 / (64 * 256)  # per weight: 4 bits, an int8 scale per 64, a bf16 factor per 16384
NF4_TENSOR = 2 + 16 * 2  # per tensor: the bf16 mean, the 16 bf16 code values


def adapted(args, spec: PlanSpec) -> dict[str, tuple[int, int]]:
    # A block's adapted Linear weights -> (out, in): every 2-D weight of the block (its Linears) whose module's last
    # name is a target (no targets: every one).
    _, block = local_shapes(args, spec)
    out = {}
    for name, shape in block.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if len(shape) == 2 and (not spec.lora_targets or module in spec.lora_targets):
            out[name] = shape
    return out


def adapter_shapes(args, spec: PlanSpec) -> list[tuple[int, int]]:
    # One block's adapters: A (rank, in) and B (out, rank) per adapted Linear.
    r = spec.lora_rank
    return [s for out, inp in adapted(args, spec).values() for s in ((r, inp), (out, r))]


def lora_state(args, spec: PlanSpec) -> dict[str, float]:
    # Bytes per rank of the frozen base, the adapters, their gradients and optimizer state (model_state's keys).
    p = precision_bytes(spec.precision)
    root, block = local_shapes(args, spec)
    nf4 = spec.precision == "nf4"
    base = sum(p.weights * elements(s, spec.shard) for s in root.values())
    for s in block.values():
        base += args.n_layers * (
            NF4_BYTES * elements(s, spec.shard) + NF4_TENSOR
            if nf4 and len(s) == 2
            else p.weights * elements(s, spec.shard)
        )
    adapters = args.n_layers * sum(elements(s, spec.shard) for s in adapter_shapes(args, spec))
    return {
        "params": base + 4 * adapters,
        "grads": 4.0 * adapters,
        "optimizer": args.n_layers
        * sum(state_bytes(spec.optim, 4, elements(s, spec.shard)) for s in adapter_shapes(args, spec)),
        "numel": adapters,
    }


# The block's Linears by role (native names, and transformers' for Llama-like models), and the input each reads:
# the attention norm's output (q, k, v), the attention's output (o), the MLP norm's output (gate, up), the SwiGLU
# product (down).
ROLES = {
    "wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "wo_in", "w1": "ffn_in", "w3": "ffn_in", "w2": "w2_in",
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "wo_in",
    "gate_proj": "ffn_in", "up_proj": "ffn_in", "down_proj": "w2_in",
}  # fmt: skip


def lora_layer_terms(args, spec: PlanSpec, full: dict[str, float]) -> dict[str, float]:
    # A Llama block's saved activations under LoRA (measured against MemTracker; activations.layer_terms gives full
    # fine-tuning's). With the base frozen, autograd keeps what only a weight's gradient needs no more: a frozen
    # RMSNorm's normalised x, a frozen Linear's input. What peft's adapters read is kept instead: each adapted
    # Linear's input, as A computes it: the very tensor where A's dtype is the input's (one copy for the Linears
    # that share it), an fp32 cast per adapter where the base computes in bf16 and the adapters are fp32, autocast's
    # bf16 cast per adapter under bf16-mixed; and A's output, kept by B. Other models: full fine-tuning's terms and
    # the adapters' (an upper bound).
    e, r, d, f = spec.micro_batch * spec.seq_len, spec.lora_rank, args.dim, args.ffn_hidden_dim
    p = precision_bytes(spec.precision)
    res, c, cast = widths(spec)
    adapter = c if (cast or (spec.casts_params and p.autocast)) else 4  # the width adapters compute in
    roles = {}
    for name, (_, inp) in adapted(args, spec).items():
        roles.setdefault(ROLES.get(name.rsplit(".", 2)[-2], "other"), []).append(inp)
    a_outputs = (
        4.0 * e * r * sum(len(v) for v in roles.values())
        if adapter == 4
        else adapter * e * r * sum(len(v) for v in roles.values())
    )
    if not is_llama(args) or "other" in roles:
        return {
            **full,
            "LoRA: inputs and A's outputs": a_outputs
            + adapter * e * sum(i for v in roles.values() for i in v),
        }
    given = {"attn_in": res, "wo_in": c, "ffn_in": res, "w2_in": ffn_width(spec)}
    width = {"attn_in": d, "wo_in": d, "ffn_in": d, "w2_in": f}
    kept = 0.0
    for role, ins in roles.items():
        if cast:  # autocast casts the input for each adapter's matmul
            kept += c * e * width[role] * len(ins)
        elif adapter == given[role]:  # the input itself, once
            kept += given[role] * e * width[role]
        else:  # peft casts it to the adapters' fp32, for each
            kept += adapter * e * width[role] * len(ins)
    terms = {
        k: v for k, v in full.items() if not k.startswith(("RMSNorms", "attention output reshaped", "SwiGLU"))
    }
    terms["RMSNorms: fp32 input, rsqrt (the weights frozen: no normalised x)"] = 2 * (4 * e * d + 4 * e)
    terms["SwiGLU: w1, silu, w3 (the product: only as down's adapted input)"] = 3 * ffn_width(spec) * e * f
    terms["LoRA: adapted Linears' inputs, as A reads them"] = kept
    terms["LoRA: A's outputs, kept by B"] = a_outputs
    return terms


def gathered_block(args, spec: PlanSpec, width: int) -> float:
    # FSDP under LoRA: a block's parameters as FSDP gathers them: NF4 weights stay 4-bit (torchao's all-gather
    # hooks gather the NF4 pieces), the rest and the adapters `width` bytes each (the gathered dtype).
    _, block = local_shapes(args, spec)
    nf4 = spec.precision == "nf4"
    total = sum(
        (NF4_BYTES * math.prod(s) + NF4_TENSOR) if nf4 and len(s) == 2 else width * math.prod(s)
        for s in block.values()
    )
    return total + max(width, 4) * sum(math.prod(s) for s in adapter_shapes(args, spec))
