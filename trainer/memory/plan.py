# Memory planner: the bytes one rank holds while it trains one step, from the model's arguments and the
# run's config alone (nothing is allocated, so llama3_8b on 8 GPUs plans on a laptop). measure.py measures
# the same categories with PyTorch's MemTracker; tests/test_memory.py holds the two together.
#
# Model state per parameter (the precision table's dtypes, spec.py; the optimizer's state, trainer/optim.py):
# weights + gradients + optimizer state. fp32 AdamW: 4 + 4 + 8 = 16
# bytes; the seed text's "~24 bytes per parameter to train" is that plus activations and temporaries;
# ZeRO's mixed-precision 2 + 2 + 12 = 16 is bf16-mixed's 4 + 4 + 8 here (the fp32 weights are the master,
# gradients are fp32). DDP holds all of it on every rank; FSDP full shard (ZeRO-3) divides it by the shard
# group; shard-grad-op (ZeRO-2) also keeps the gathered weights from forward to backward; HSDP divides by
# its shard dim; CPU offload moves the sharded state to host memory.
#
# Activations: what autograd saves in models/llama.py and models/gpt2.py, op by op (activations.py), checked
# against MemTracker. The peak is the largest of a few moments of the step (peak_events), not the sum of
# everything: at the start of backward all activations exist and no gradient yet; at the optimizer step it
# is the other way round.
import math

from models import family, parallel_plan, param_shapes
from strategies import checkpointed
from trainer.memory.activations import (
    all_shapes,
    backward_scratch,
    block_shapes,
    elements,
    head_terms,
    is_llama,
    layer_terms,
    local_shapes,
    matmul_elements,
    root_shapes,
    widths,
)
from trainer.memory.lora import adapter_shapes, gathered_block, lora_layer_terms, lora_state
from trainer.memory.pipeline import plan_stages
from trainer.memory.result import MemoryPlan, optimizer_scratch, reduce_scatter_bytes
from trainer.memory.spec import PlanSpec, precision_bytes
from trainer.optim import state_bytes


def model_state(args, spec: PlanSpec) -> dict[str, float]:
    # Bytes per rank of weights, gradients and optimizer state, and this rank's element count: each parameter's
    # tensor-parallel shard (activations.local_shapes), sharded again by FSDP over its group. Under LoRA: the frozen
    # base and the adapters (trainer/memory/lora.py); the element count is what trains.
    if spec.lora_rank:
        return lora_state(args, spec)
    p = precision_bytes(spec.precision)
    shapes = all_shapes(args, spec)
    local = sum(elements(s, spec.shard) for s in shapes)
    opt = sum(state_bytes(spec.optim, p.weights, elements(s, spec.shard)) for s in shapes)
    return {
        "params": p.weights * local,
        "grads": p.grads * (local + _whole_embedding_grad(args, spec)),
        "optimizer": opt,
        "numel": local,
    }


def _whole_embedding_grad(args, spec: PlanSpec) -> int:
    # Elements beyond its shard that the embedding's gradient holds under tensor parallelism without FSDP: the
    # backward of DTensor's row-parallel embedding gives a replicated (whole) gradient of the sharded weight
    # (measured, torch 2.13; FSDP reduce-scatters it into the shard).
    if spec.dims.tp == 1 or spec.sharded:
        return 0
    full, local = param_shapes(args).root, local_shapes(args, spec)[0]
    name = f"{parallel_plan(args).embedding}.weight"
    return elements(full[name]) - elements(local[name])


def _optimizer_scratch(args, spec: PlanSpec) -> float:
    return optimizer_scratch(spec, all_shapes(args, spec))


def _gathered(args, spec: PlanSpec) -> tuple[float, float, int]:
    # FSDP: -> (root, one block) bytes of gathered (unsharded) parameters, in the dtype they are gathered
    # in (the compute dtype under MixedPrecisionPolicy, else the weights'), and a block's element count.
    root, block = root_shapes(args, spec), block_shapes(args, spec)
    numel = sum(map(elements, block))
    if not spec.sharded:
        return 0.0, 0.0, numel
    p = precision_bytes(spec.precision)
    width = p.compute if p.autocast else p.weights
    block_g = gathered_block(args, spec, width) if spec.lora_rank else width * numel
    return width * sum(map(elements, root)), block_g, numel


def peak_events(args, spec: PlanSpec, state: dict, layer_bytes: list[float], head: dict) -> dict:
    # Bytes by category at each moment that can be the step's peak. Steady state: the optimizer state
    # exists; the previous step's zero_grad(set_to_none=True) freed the gradients.
    off = spec.offloaded
    base = {
        "params": 0.0 if off else state["params"],
        "buffers": 4.0 * args.max_seq_len * args.head_dim if is_llama(args) else 0.0,  # RoPE cos, sin (fp32)
        "optimizer": 0.0 if off else state["optimizer"],
    }
    if spec.layout.grad_buckets:  # DDP's gradient buckets: a second copy of the gradients, allocated up front
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
    e, v = (
        spec.micro_batch * spec.seq_len,
        args.vocab_size / spec.dims.tp,
    )  # the vocabulary: this rank's shard
    _, c, cast = widths(spec)
    acts, logits = sum(layer_bytes) + sum(head.values()), head["logits (held by the loop)"]
    # FSDP: the root stays gathered from forward to the end of backward; shard-grad-op keeps every block.
    root_g, block_g, _ = _gathered(args, spec)
    gathered = root_g + (0.0 if spec.reshard_after_forward else block_g * args.n_layers)
    n_ckpt = sum(checkpointed(spec.activation_checkpointing, spec.ac_every, args.n_layers))
    return {
        # The loss: every activation, and the fp32 copy of the logits that cross_entropy reads. Checkpointed
        # blocks keep no bf16 weight copies, but autocast's cache holds them until forward ends.
        "forward (loss)": {
            **base,
            "grads": held,
            "activations": acts,
            "gathered params": gathered,
            "logits fp32 copy": 4 * e * v if c < 4 else 0.0,
            "autocast cache": c * matmul_elements(block_shapes(args, spec)) * n_ckpt if cast else 0.0,
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
    root, block = root_shapes(args, spec), block_shapes(args, spec)
    root_g, _, _ = _gathered(args, spec)
    # output weight (the embedding, if tied; its tensor-parallel shard), final norm
    head_numel = math.ceil(args.vocab_size / spec.dims.tp) * args.dim + args.dim
    # Under CPU offload the sharded gradients leave the device after each unit's reduce-scatter, but FSDP2 makes
    # each unit's unsharded gradient on the device first: the root's (the output head, the embedding if tied)
    # from the start of backward until the root's post-backward at its end.
    head_grad = (root_g / sum(map(elements, root)) if spec.sharded else p.grads) * head_numel
    block_grad = 0.0 if off else p.grads * sum(elements(s, spec.shard) for s in block)
    if spec.lora_rank:  # the head and the base are frozen: the adapters' fp32 gradients only
        head_grad = 0.0
        block_grad = 0.0 if off else 4.0 * sum(elements(s, spec.shard) for s in adapter_shapes(args, spec))
    events = {}
    for i in reversed(range(args.n_layers)):
        done = max(held, head_grad + block_grad * (args.n_layers - 1 - i))
        events.update(_block_events(args, spec, i, base, done, layer_bytes, logits))
    if spec.sharded:  # the root's post-backward: its gradients (embedding, head) reduce-scattered last
        events["backward of the root (reduce-scatter)"] = {
            **base,
            "grads": max(held, block_grad * args.n_layers),
            "activations": logits,
            "reduce-scatter buffers": reduce_scatter_bytes(spec, sum(map(elements, root))),
        }
    return events


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
    phases = zip(("FFN", "attention"), backward_scratch(args, spec), (full, full - ffn), strict=True)
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
            "reduce-scatter buffers": reduce_scatter_bytes(spec, numel),
        }
    return events


def plan_memory(args, spec: PlanSpec) -> MemoryPlan:
    if family(args) is None:
        raise ValueError(
            f"the planner covers the native llama and gpt2 families and Hugging Face models built like Llama (llama, "
            f"mistral, qwen2), not {args.config.model_type}: plan a native model of the same shapes instead"
        )
    if spec.dims.pp > 1:  # each pipeline rank its own plan: the worst one, with every rank's peak
        stages = plan_stages(args, spec)
        worst = max(range(len(stages)), key=lambda r: stages[r].peak)
        plan = stages[worst]
        plan.stage_peaks, plan.stage = [s.peak for s in stages], worst
        return plan
    state = model_state(args, spec)
    layer_bytes = [
        sum(block_terms(args, spec, k).values())
        for k in checkpointed(spec.activation_checkpointing, spec.ac_every, args.n_layers)
    ]
    head = head_terms(args, spec)
    if spec.lora_rank and is_llama(
        args
    ):  # the final norm's weight and the head frozen: neither keeps its input
        e = spec.micro_batch * spec.seq_len
        head["final norm"] = 4.0 * e * args.dim + 4.0 * e  # its fp32 input and rsqrt
    events = peak_events(args, spec, state, layer_bytes, head)
    off = spec.offloaded
    return MemoryPlan(
        spec=spec,
        n_params=sum(map(elements, all_shapes(args))),
        params=0.0 if off else state["params"],
        grads=0.0 if off else state["grads"],
        optimizer=0.0 if off else state["optimizer"],
        buffers=events["optimizer step"]["buffers"],
        host=state["params"] + state["grads"] + state["optimizer"] if off else 0.0,
        layer_terms=block_terms(args, spec),
        layer_bytes=layer_bytes,
        head_terms=head,
        events=events,
        peak_event=max(events, key=lambda k: sum(events[k].values())),
    )


def block_terms(args, spec: PlanSpec, checkpointed: bool = False) -> dict[str, float]:
    # A block's saved activations: activations.layer_terms, as LoRA changes them (trainer/memory/lora.py).
    terms = layer_terms(args, spec, checkpointed)
    return lora_layer_terms(args, spec, terms) if spec.lora_rank and not checkpointed else terms


def plan_for_run(args, spec: PlanSpec) -> MemoryPlan | None:
    # The planner's per-rank prediction for a run, or None for models it does not cover (model=hf).
    # Arithmetic only: cheap enough for every run.
    return None if family(args) is None else plan_memory(args, spec)


def memory_summary(plan: MemoryPlan | None, record: dict | None) -> dict:
    # Flat summary.json keys for the sweep report: the planner's peak per rank, and with
    # metrics.memory_breakdown the measured one (this rank's, MemTracker) and predicted / measured.
    out = {
        "memory_predicted_peak_gb": plan.peak / 1e9 if plan is not None else None,
        "memory_predicted_peak_at": plan.peak_event if plan is not None else None,
    }
    if record is not None:
        out["memory_measured_peak_gb"] = record["measured"]["peak_bytes"] / 1e9
        out["memory_peak_ratio"] = record["ratio"]["peak"] if record["ratio"] else None
    return out
