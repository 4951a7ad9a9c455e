# Time model: one optimizer step's time on one rank, from its parts, at the rates the calibration measured on this
# machine (trainer/speed/calibration.py), as the memory planner predicts bytes from the config alone. One
# micro-batch of the model is dispatched once on the meta device (model_costs: shapes without arithmetic, operator
# by operator, as FlopCounterMode counts FLOPs with a dispatch mode), and each term says where it comes from:
#   compute    each matmul's FLOPs (2 m k n) at the calibrated dense rate of the precision's compute dtype at its
#              size, and fused attention's at the calibrated attention rate; plus the forward that activation
#              checkpointing runs again for its checkpointed blocks
#   operators  every operator's count times the measured cost of an operator beyond its arithmetic (on a CPU and for
#              small models most of a step), and the layout's own cost per block (or pipeline stage) and
#              micro-batch as calibrated for it: DDP's reducer, FSDP's hooks, copies and casts, DTensor's dispatch
#   memory     the bytes every other operator reads and writes (elementwise work, norms, softmax) and autocast's
#              casts, at the measured copy bandwidth; and the optimizer reading and writing the model state once (the
#              memory planner's bytes)
#   collectives  each collective the layout issues per step, at the calibrated latency and bandwidth of its kind
#              and group size (alpha + bytes x beta): DDP's all-reduce of the gradients in 25 MiB buckets, once per
#              step (no_sync between micro-batches); FSDP's all-gather of each block's parameters (in the compute
#              dtype) per micro-batch in forward and again in backward where it reshards after forward, and its
#              reduce-scatter of the gradients once per step; HSDP's all-reduce of the shards across replicas;
#              tensor parallelism's two collectives per block in forward and two in backward on the activations
#              (all-reduce, or with sequence parallelism all-gather + reduce-scatter); a pipeline's sends of each
#              micro-batch's activations forward and their gradients back, per stage boundary
#   split      tensor parallelism splits each block's arithmetic and bytes over its degree, a pipeline stage holds
#              1/pp of the blocks; data parallelism splits the batch (the micro-batches per rank)
#   bubble     a pipeline rank idles the schedule's bubble fraction of the step (strategies/pp.py's arithmetic)
#   overlap    on a CPU, gloo's collectives run on the same cores as the compute: nothing overlaps. On a GPU,
#              DDP's and FSDP's collectives overlap the backward (two thirds of the compute) and hide up to it;
#              tensor-parallel ones are on the critical path
# torch.distributed._tools' RuntimeEstimator is not used: it estimates CUDA kernels only (its benchmark mode runs
# them on a GPU, its roofline mode reads a GPU's peak), and the step time here is as much operators and gloo as
# kernels on the CPUs the suite runs on.
import math
from dataclasses import dataclass, field

from strategies import checkpointed
from strategies.pp import bubble_fraction
from trainer.memory.spec import PlanSpec, precision_bytes
from trainer.precision import peak_class
from trainer.speed.calibration import OpCosts, op_costs

DDP_BUCKET = 25 * 2**20  # DistributedDataParallel's default bucket_cap_mb


@dataclass
class StepTime:
    compute_s: float
    operators_s: float
    memory_s: float
    collectives_s: dict[str, float] = field(default_factory=dict)  # kind -> seconds this step
    exposed_collectives_s: float = 0.0
    bubble_s: float = 0.0
    tokens_per_step: int = 0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.operators_s + self.memory_s + self.exposed_collectives_s + self.bubble_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.total_s

    def terms(self) -> dict[str, float]:
        return {
            "compute": self.compute_s,
            "operators": self.operators_s,
            "memory": self.memory_s,
            **{f"collectives: {k}": v for k, v in self.collectives_s.items()},
            "collectives exposed": self.exposed_collectives_s,
            "pipeline bubble": self.bubble_s,
        }


def matmul_rate(cal: dict, dtype: str, n_eff: float) -> float:
    # TFLOP/s at the model's matmul size: log-linear between the calibrated sizes, the end ones beyond them.
    rates = {int(n): r for n, r in cal["matmul_tflops"][dtype].items()}
    sizes = sorted(rates)
    if len(sizes) == 1 or n_eff <= sizes[0]:
        return rates[sizes[0]]
    if n_eff >= sizes[-1]:
        return rates[sizes[-1]]
    hi = next(i for i, n in enumerate(sizes) if n >= n_eff)
    a, b = sizes[hi - 1], sizes[hi]
    w = (math.log(n_eff) - math.log(a)) / (math.log(b) - math.log(a))
    return rates[a] + w * (rates[b] - rates[a])


def collective_s(cal: dict, kind: str, group: int, nbytes: float, calls: float = 1.0) -> float:
    # `calls` collectives of `kind` moving `nbytes` in all, in a group of `group` ranks: the calibration of that
    # group size, else of the nearest measured one (a world's groups are its divisors, all measured).
    if group <= 1 or calls <= 0:
        return 0.0
    sizes = {int(g): kinds for g, kinds in cal["collectives"].items()}
    kinds = sizes.get(group) or sizes[min(sizes, key=lambda g: abs(g - group))]
    alpha, beta = kinds[kind]["fit"]
    return calls * alpha + nbytes * beta


def compute_dtype(precision: str, cal: dict) -> str:
    # The calibrated dtype a precision's matmuls run in (tf32: fp32's rate where no tf32 rate was measured).
    cls = peak_class(precision)
    return cls if cls in cal["matmul_tflops"] else "fp32"


@dataclass
class ModelCosts:
    # One micro-batch of the model, forward (and recomputed forward) apart from the whole step's forward + backward.
    forward: OpCosts
    step: OpCosts


def seconds(c: OpCosts, cal: dict, dtype: str, autocast: bool = False) -> tuple[float, float, float]:
    # -> (compute, operators, memory) seconds of these operators at the calibration's rates. autocast: each matmul's
    # operands cast to the compute dtype first (fp32 read, 16-bit written: 6 bytes an element, one operator each),
    # which the meta device's dispatch does not show (autocast acts on real devices' tensors only).
    attention = cal.get("attention_tflops", {}).get("bf16" if dtype in ("bf16", "fp16") else "fp32")
    compute = sum(f / (matmul_rate(cal, dtype, n) * 1e12) for f, n in c.matmuls)
    compute += c.attention_flops / ((attention or matmul_rate(cal, dtype, 256)) * 1e12)
    ops, moved = c.ops, c.bytes
    if autocast:
        ops += 2 * len(c.matmul_elements)
        moved += 6 * sum(a + b for a, b in c.matmul_elements)
    return compute, ops * cal["op_latency_us"] * 1e-6, moved / (cal["copy_gbps"] * 1e9)


def overhead_units(args, spec: PlanSpec) -> float:
    # What a layout's calibrated overhead is per: each block of a rank's share, or under a pipeline (whose schedule
    # costs per stage it runs) each stage; for every micro-batch of the step.
    per = spec.pp_stages_per_rank if spec.layout.pipelined else args.n_layers / spec.dims.pp
    return per * spec.grad_accum


def predict(args, spec: PlanSpec, plan, cal: dict, costs: ModelCosts) -> StepTime:
    # plan: the memory planner's MemoryPlan of this spec (its model state, per rank); costs: model_costs' for one
    # micro-batch of this config's model (the whole model on one rank: split here as the layout splits it).
    dims = spec.dims
    dp, tp, pp = dims.dp_size, dims.tp, dims.pp
    micro, accum, seq = spec.micro_batch, spec.grad_accum, spec.seq_len
    tokens_step = micro * accum * seq * dp  # the global batch
    dtype = compute_dtype(spec.precision, cal)
    p = precision_bytes(spec.precision)
    autocast = (
        p.autocast and not spec.casts_params
    )  # FSDP's MixedPrecisionPolicy casts once per gather instead
    compute, operators, memory = seconds(costs.step, cal, dtype, autocast)
    # Checkpointed blocks run their forward again in backward.
    ac = checkpointed(spec.activation_checkpointing, spec.ac_every, args.n_layers)
    again = sum(ac) / max(1, len(ac))
    if again:
        f = seconds(costs.forward, cal, dtype, autocast)
        compute, operators, memory = compute + again * f[0], operators + again * f[1], memory + again * f[2]
    # A rank's share: tensor parallelism splits each block's arithmetic and its activations' bytes, a pipeline stage
    # holds 1/pp of the blocks; every micro-batch of the step.
    compute, memory = compute / (tp * pp) * accum, memory / (tp * pp) * accum
    operators = operators / pp * accum
    # The layout's own cost (DDP's reducer, FSDP's hooks, DTensor's dispatch, a pipeline schedule's), as calibrated
    # for it, per unit: a block, or a pipeline's stage, each micro-batch.
    blocks = args.n_layers / pp
    operators += cal.get("layout_overhead_s", {}).get(spec.strategy, 0.0) * overhead_units(args, spec)
    # The optimizer: reads and writes the model state once.
    state = plan.params + plan.grads + plan.optimizer
    memory += 2 * state / (cal["copy_gbps"] * 1e9)
    comm: dict[str, float] = {}
    overlappable = 0.0
    grad_bytes = plan.grads  # this rank's gradients (sharded under FSDP)
    if spec.sharded and dims.dp_shard > 1:  # FSDP / HSDP: gathers per micro-batch, a reduce-scatter per step
        shard = dims.dp_shard
        gathered = plan.params * shard * (p.compute if spec.casts_params else p.weights) / p.weights
        units = blocks + 1  # each block, and the root
        gathers = accum * (2 if spec.reshard_after_forward else 1)
        comm["all_gather"] = collective_s(cal, "all_gather", shard, gathered * gathers, units * gathers)
        comm["reduce_scatter"] = collective_s(cal, "reduce_scatter", shard, grad_bytes * shard, units)
        if dims.dp_replicate > 1:
            comm["all_reduce"] = collective_s(cal, "all_reduce", dims.dp_replicate, grad_bytes, units)
        overlappable += sum(comm.values())
    elif dp > 1:  # replicated state (DDP): one all-reduce of every gradient per step, in buckets
        buckets = max(1, math.ceil(grad_bytes / DDP_BUCKET))
        comm["all_reduce"] = collective_s(cal, "all_reduce", dp, grad_bytes, buckets)
        overlappable += comm["all_reduce"]
    act = micro * seq * args.dim * p.compute  # one micro-batch's activations at a block's boundary, bytes
    if tp > 1:  # two collectives per block in forward and two in backward, on a micro-batch's activations
        calls = 4 * blocks * accum
        if spec.sequence_parallel:
            comm["tp all_gather"] = collective_s(cal, "all_gather", tp, act * calls / 2, calls / 2)
            comm["tp reduce_scatter"] = collective_s(cal, "reduce_scatter", tp, act * calls / 2, calls / 2)
        else:
            comm["tp all_reduce"] = collective_s(cal, "all_reduce", tp, act * calls, calls)
    bubble = 0.0
    if pp > 1:  # each micro-batch's activations forward and gradients back, across each stage boundary
        sends = 2 * accum * spec.pp_stages_per_rank
        comm["pp send/recv"] = collective_s(cal, "send_recv", 2, act * sends, sends)
        fraction = bubble_fraction(spec.pp_schedule, pp, spec.pp_stages_per_rank, accum)
        bubble = (compute + operators + memory) * fraction / (1 - fraction)
    total_comm = sum(comm.values())
    exposed = total_comm - (min(overlappable, 2 / 3 * compute) if spec.device == "cuda" else 0.0)
    return StepTime(compute, operators, memory, comm, exposed, bubble, tokens_step)


def model_costs(args, micro: int, seq: int, precision: str = "fp32") -> ModelCosts:
    # One micro-batch's forward, loss and backward of this model, dispatched on the meta device (no memory, no
    # arithmetic: well under a second even for 8B parameters), operator by operator, in the dtype its weights are
    # held in (bf16-true and nf4's base: bf16, and so are their activations; autocast's casts are seconds()').
    import torch
    import torch.nn.functional as F

    from models import build_model
    from trainer.precision import precision_fields

    with torch.device("meta"):
        model = build_model(args).to(precision_fields(precision)["param_dtype"])
    tokens = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    costs, forward = OpCosts(), []

    def step():
        logits = model(tokens)
        forward.append(costs.copy())  # the forward alone: what checkpointed blocks run again
        F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()

    try:
        op_costs(step, costs)
        return ModelCosts(forward[0], costs)
    except (
        RuntimeError,
        NotImplementedError,
    ) as e:  # e.g. a Hugging Face model reads a tensor's value (.item())
        raise ValueError(
            f"the time model cannot run this model on the meta device ({str(e).splitlines()[0]})"
        ) from e


def predict_setup(setup, cal: dict) -> StepTime:
    # A planner Setup (trainer/memory/suggest.py: the model's arguments and the PlanSpec) at a calibration.
    spec = setup.spec
    costs = model_costs(setup.args, spec.micro_batch, spec.seq_len, spec.precision)
    return predict(setup.args, spec, setup.plan(), cal, costs)
