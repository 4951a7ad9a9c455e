# The memory planner for pipeline parallelism (strategy=pp): each pipeline rank holds its stages' blocks (the
# first stage also the embedding, the last the final norm and the head), FSDP2-sharded over the data-parallel
# ranks and split by tensor parallelism inside, and the activations of the micro-batches its schedule keeps in
# flight (strategies/pp.py's in_flight, read from torch's schedules). One MemoryPlan per pipeline rank; the run's
# plan is the worst one. Checked against MemTracker on each rank of PP runs (tests/test_pp.py).
#
# A pipeline rank's step, by moments: a backward with the most micro-batches in flight, with and without the
# gradients of earlier backwards (FSDP accumulates them unsharded, in fp32, until the step's last backward
# reduce-scatters them), the last backward's reduce-scatter, and the optimizer step.
from models import parallel_plan
from strategies import checkpointed
from strategies.pp import in_flight, layer_split, stages_of
from trainer.memory.activations import (
    backward_scratch,
    elements,
    head_terms,
    is_llama,
    layer_terms,
    local_shapes,
)
from trainer.memory.result import MemoryPlan, optimizer_scratch
from trainer.memory.spec import PlanSpec, precision_bytes
from trainer.optim import state_bytes


def stage_layout(args, spec: PlanSpec, pp_rank: int) -> tuple[list[list[int]], bool, bool]:
    # -> (the blocks of each stage this rank holds, in stages_of's order; whether it holds the first stage, the
    # last)
    v = spec.pp_stages_per_rank
    n_stages = spec.dims.pp * v
    split = layer_split(args.n_layers, n_stages, spec.pp_split)
    starts = [sum(split[:i]) for i in range(n_stages + 1)]
    held = stages_of(pp_rank, spec.dims.pp, v, spec.pp_schedule)
    return [list(range(starts[s], starts[s + 1])) for s in held], 0 in held, n_stages - 1 in held


def stage_shapes(args, spec: PlanSpec, pp_rank: int) -> tuple[list[tuple], list[tuple], int]:
    # -> (the embedding's or the final norm's and the head's parameter shapes this pipeline rank holds, one
    # block's, how many blocks it holds): each tensor-parallel shard's, before FSDP shards them.
    stages, first, last = stage_layout(args, spec, pp_rank)
    plan = parallel_plan(args)
    root, block = local_shapes(args, spec)
    ends = (plan.first_stage if first else ()) + (plan.last_stage if last else ())
    return (
        [s for name, s in root.items() if name.split(".")[0] in ends],
        list(block.values()),
        sum(map(len, stages)),
    )


def plan_stage(args, spec: PlanSpec, pp_rank: int) -> MemoryPlan:
    p = precision_bytes(spec.precision)
    stages, _, last = stage_layout(args, spec, pp_rank)
    ends, block, n_blocks = stage_shapes(args, spec, pp_rank)
    shapes = ends + block * n_blocks
    numel, local = sum(map(elements, shapes)), sum(elements(s, spec.shard) for s in shapes)
    params, grads = p.weights * local, p.grads * local
    optimizer = sum(state_bytes(spec.optim, p.weights, elements(s, spec.shard)) for s in shapes)
    ckpt = checkpointed(spec.activation_checkpointing, spec.ac_every, args.n_layers)
    # one micro-batch's activations of each stage this rank holds; the head and the loss on the last stage
    per_stage = [sum(sum(layer_terms(args, spec, ckpt[i]).values()) for i in blocks) for blocks in stages]
    head = head_terms(args, spec) if last else {}
    moments = in_flight(spec.pp_schedule, spec.dims.pp, spec.pp_stages_per_rank, spec.grad_accum, pp_rank)

    def held(
        counts: list[int],
    ) -> float:  # the activations of `counts` micro-batches per stage (and the head's)
        return (
            sum(c * a for c, a in zip(counts, per_stage, strict=True))
            + sum(head.values()) * counts[-1] * last
        )

    c = p.compute if p.autocast else p.weights  # the dtype FSDP gathers in
    # reshard_after_forward=false (strategy=pp's default): the stage's parameters stay gathered all step; else a
    # block and the next one at a time, besides the embedding or the head (each stage's own unit, kept gathered)
    block_numel, ends_numel = sum(map(elements, block)), sum(map(elements, ends))
    unit = max(block_numel, ends_numel)
    gathered = c * (numel if not spec.reshard_after_forward else ends_numel + min(2, n_blocks) * block_numel)
    unsharded_grads = 4.0 * numel  # FSDP without gradient sync between micro-batches: fp32, unsharded
    base = {
        "params": params,
        "buffers": 4.0 * args.max_seq_len * args.head_dim if is_llama(args) else 0.0,  # RoPE cos, sin (fp32)
        "optimizer": optimizer,
        "gathered params": gathered,
    }
    full = sum(layer_terms(args, spec).values())
    backward = {
        "backward scratch": max(backward_scratch(args, spec)),
        # a checkpointed block recomputes its activations for its backward
        "recomputed block": max(
            full - sum(layer_terms(args, spec, ckpt[i]).values()) for b in stages for i in b
        ),
        # the last stage's loss: the log-softmax's and its input's gradients, fp32, E x V each
        "loss gradients": 8.0 * spec.micro_batch * spec.seq_len * args.vocab_size / spec.dims.tp
        if last
        else 0.0,
    }
    events = {}
    for i, counts in enumerate(moments):
        tag = f" ({i + 1})" if len(moments) > 1 else ""
        events[f"first backward, most micro-batches in flight{tag}"] = {
            **base,
            "activations": held(counts),
            **backward,
        }
        if spec.grad_accum > 1:  # a later backward, the earlier ones' gradients held: as many in flight where
            # forwards remain (1F1B's steady state), else one fewer (GPipe: every forward ran before the first backward)
            steady = spec.grad_accum * len(counts) > sum(counts)
            later = counts if steady else [max(0, n - (j == len(counts) - 1)) for j, n in enumerate(counts)]
            events[f"later backward, gradients held{tag}"] = {
                **base, "grads": unsharded_grads, "activations": held(later), **backward,
            }  # fmt: skip
    if spec.grad_accum > 1 and c < 4:
        # Mixed precision: the end of a later backward, its gradients made in the compute dtype beside the fp32
        # accumulated ones (FSDP adds them in its post-backward)
        events["end of a later backward"] = {**base, "grads": unsharded_grads + c * numel, **backward}
    # After the last backward every unit's parameters are resharded, and torch's schedule reduces each FSDP
    # unit's gradients in turn (REDUCE_GRAD): every gradient still held, and one unit's fp32 reduce-scatter input.
    after = {**base, "gathered params": 0.0}
    events["gradient reduce-scatter"] = {
        **after,
        "grads": unsharded_grads,
        "reduce-scatter buffers": 4.0 * unit,
    }
    events["optimizer step"] = {**after, "grads": grads, "optimizer scratch": optimizer_scratch(spec, shapes)}
    return MemoryPlan(
        spec=spec,
        n_params=numel,
        params=params,
        grads=grads,
        optimizer=optimizer,
        buffers=base["buffers"],
        host=0.0,
        layer_terms=layer_terms(args, spec),
        layer_bytes=[a * max(n) for a, n in zip(per_stage, zip(*moments, strict=True), strict=True)],
        head_terms={k: v * max(m[-1] for m in moments) for k, v in head.items()},
        events=events,
        peak_event=max(events, key=lambda k: sum(events[k].values())),
    )


def plan_stages(args, spec: PlanSpec) -> list:
    # One MemoryPlan per pipeline rank, in rank order.
    return [plan_stage(args, spec, r) for r in range(spec.dims.pp)]
