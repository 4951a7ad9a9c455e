# The cheapest changes that make a config fit its device: each candidate changes the planner's inputs (the
# PlanSpec and the model's arguments) directly and is planned again; the command-line overrides that make the
# same change are carried along to be printed. No config is composed per candidate. A candidate that does not
# apply says so by returning None; the one error caught is a strategy's refusal to lay out a world (_layout), and
# a planner bug is an error, not "no suggestion".
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models import ModelArgs, build_model, parallel_plan
from strategies import get_strategy
from strategies.tp import indivisible
from trainer.memory.plan import MemoryPlan, plan_memory
from trainer.memory.spec import PlanSpec
from trainer.precision import nf4_refusal


@dataclass(frozen=True)
class Setup:
    # What one candidate plans: the model, the spec, and what the spec was derived from that a change of
    # world size needs again (the global batch, a micro-batch the user set, HSDP's shard size as set).
    args: object
    spec: PlanSpec
    nproc: int
    nnodes: int
    micro_batch_size: int | None  # trainer.micro_batch_size as set (None: the whole per-rank batch)
    shard_size: int = 0  # strategy.shard_size as set (hsdp; 0: the ranks of one node)
    overrides: tuple[str, ...] = ()  # the changes made so far, as command-line overrides

    @property
    def global_batch(self) -> int:
        return self.spec.micro_batch * self.spec.grad_accum * self.spec.dims.dp_size

    def change(self, overrides: list[str], args=None, **spec) -> "Setup":
        keys = {o.split("=", 1)[0] for o in overrides}
        kept = tuple(o for o in self.overrides if o.split("=", 1)[0] not in keys)
        return dataclasses.replace(
            self,
            args=self.args if args is None else args,
            spec=dataclasses.replace(self.spec, **spec),
            overrides=kept + tuple(overrides),
        )

    def plan(self) -> MemoryPlan:
        return plan_memory(self.args, self.spec)


def _layout(s: Setup, strategy: str, nproc: int, nnodes: int, micro: int | None, **options) -> dict | None:
    # -> the spec's layout and batch fields for `strategy` over nproc x nnodes ranks at this micro-batch, or None
    # where the strategy cannot lay out that world (HSDP's shard_size does not divide it) or the batch does not
    # divide. options: the strategy's own (tp).
    try:
        dims = get_strategy(strategy).dims({"shard_size": s.shard_size, **options}, nproc * nnodes, nproc)
    except ValueError:
        return None
    gbs = s.global_batch
    if gbs % dims.dp_size:
        return None
    per_rank = gbs // dims.dp_size
    micro = per_rank if micro is None else micro
    if micro < 1 or per_rank % micro:
        return None
    return {"strategy": strategy, "dims": dims, "micro_batch": micro, "grad_accum": per_rank // micro}


# Candidates, cheapest first, by what they cost a run that fits either way: bf16 and flash attention make steps
# faster, not slower; FSDP adds all-gathers that overlap with compute; 8-bit optimizer states cost some
# optimizer time and a little accuracy; tensor parallelism within a node adds each block's all-reduces (or
# all-gathers and reduce-scatters), which overlap less than FSDP's gathers, but divides activations as well as
# state and costs less than recomputing them; activation checkpointing recomputes the forward (selective: every
# other block); a smaller micro-batch keeps the global batch through gradient accumulation at lower
# arithmetic intensity; GQA changes the model; more ranks cost hardware; CPU offload moves every optimizer
# step over PCIe. Each: Setup -> the changed Setups to try in order (the first that fits is taken), or none.
def _bf16(s: Setup) -> list[Setup]:
    return (
        [s.change(["precision=bf16-mixed"], precision="bf16-mixed")]
        if s.spec.precision in ("fp32", "tf32")
        else []
    )


def _flash(s: Setup) -> list[Setup]:
    if s.args.attention != "standard":
        return []
    return [s.change(["attention=flash"], args=dataclasses.replace(s.args, attention="flash"))]


def _full_shard(s: Setup) -> list[Setup]:
    # Replicated model state (DDP) or shard-grad-op over the whole world -> FSDP full shard of the same world.
    spec = s.spec
    replicated = not spec.sharded and spec.dims.dp_size > 1
    grad_op = spec.sharded and spec.dims.dp_replicate == 1 and not spec.reshard_after_forward
    if not (replicated or grad_op):
        return []
    layout = _layout(s, "fsdp", s.nproc, s.nnodes, spec.micro_batch)
    return (
        [s.change(["strategy=fsdp"], **layout, reshard_after_forward=True, cpu_offload=False)]
        if layout
        else []
    )


def _tensor_parallel(s: Setup) -> list[Setup]:
    # FSDP x TP over the same ranks, TP within a node (degrees that divide its ranks and split the model), at the
    # same micro-batch: each rank holds 1/tp of the state and of the activations, and gradient accumulation keeps
    # the global batch over the smaller data-parallel size.
    spec, out = s.spec, []
    if spec.dims.tp > 1 or s.nproc < 2:
        return []
    plan = parallel_plan(s.args)
    for tp in (d for d in range(2, s.nproc + 1) if s.nproc % d == 0):
        layout = _layout(s, "fsdp_tp", s.nproc, s.nnodes, spec.micro_batch, tp=tp)
        if layout is None or indivisible(s.args, plan, tp) is not None:
            continue
        overrides = ["strategy=fsdp_tp", f"strategy.tp={tp}", f"trainer.micro_batch_size={spec.micro_batch}"]
        out.append(
            s.change(
                overrides, **layout, reshard_after_forward=True, cpu_offload=False, sequence_parallel=True
            )
        )
    return out


def _adamw8bit(s: Setup) -> list[Setup]:
    return [s.change(["optim=adamw8bit"], optim="adamw8bit")] if s.spec.optim == "adamw" else []


def _ac(mode: str) -> Callable[[Setup], list[Setup]]:
    def change(s: Setup) -> list[Setup]:
        if s.spec.activation_checkpointing != "none":
            return []
        return [s.change([f"strategy.activation_checkpointing={mode}"], activation_checkpointing=mode)]

    return change


def _smaller_micro_batch(s: Setup) -> list[Setup]:
    # Halved until it fits; gradient accumulation keeps the global batch.
    out, micro = [], s.spec.micro_batch
    while micro > 1:
        micro //= 2
        if (layout := _layout(s, s.spec.strategy, s.nproc, s.nnodes, micro)) is not None:
            out.append(s.change([f"trainer.micro_batch_size={micro}"], **layout))
    return out


def _gqa(s: Setup) -> list[Setup]:
    # attention=gqa: n_heads / 4 K/V heads, on the flash kernel.
    a = s.args
    if not (isinstance(a, ModelArgs) and a.kv_heads == a.n_heads and a.n_heads % 4 == 0):
        return []
    gqa = dataclasses.replace(a, n_kv_heads=a.n_heads // 4, attention="flash")
    return [s.change(["attention=gqa"], args=gqa)]


def _single(s: Setup) -> list[Setup]:
    # A replicating strategy with buckets (DDP) in a world of one: its buckets are a second copy of the gradients
    # that no other rank needs.
    if not s.spec.layout.grad_buckets or s.spec.dims.world_size != 1:
        return []
    layout = _layout(s, "single", s.nproc, s.nnodes, s.spec.micro_batch)
    return [s.change(["strategy=single"], **layout)] if layout else []


def _adapters(precision: str):
    # LoRA adapters on the frozen base (the default rank), bf16 or in 4 bits (QLoRA): for when every weight cannot
    # train in the memory there is. NF4 needs whole blocks of 64 x 256 weights per Linear (and per FSDP shard).
    def change(s: Setup) -> list[Setup]:
        if s.spec.lora_rank or s.spec.layout.splits_tensors or s.spec.layout.pipelined:
            return []
        if precision == "nf4":
            with torch.device("meta"):
                if nf4_refusal(build_model(s.args), s.spec.shard) is not None:
                    return []
        lora = s.change(["finetune=lora", f"precision={precision}"], lora_rank=LORA_RANK, precision=precision)
        return [
            lora,
            *_smaller_micro_batch(lora),
        ]  # the adapters' inputs are activations too: then less of them

    return change


def _more_ranks(s: Setup) -> list[Setup]:
    # Sharded over more machines (FSDP, where the state was replicated): launcher.nproc_per_node is the GPUs a node
    # has, so the world grows by nodes of that size, doubled, up to 16x (not by more processes on the GPUs there
    # are). The strategy lays out each world (HSDP: a shard group per node unless set).
    out, nproc, nnodes = [], s.nproc, s.nnodes
    sharded = s.spec.sharded
    strategy = s.spec.strategy if sharded else "fsdp"
    for _ in range(4):
        nnodes *= 2
        layout = _layout(s, strategy, nproc, nnodes, s.micro_batch_size)
        if layout is None:
            continue
        overrides = ([] if sharded else ["strategy=fsdp"]) + [f"launcher.nnodes={nnodes}"]
        spec = {} if sharded else {"reshard_after_forward": True}
        out.append(dataclasses.replace(s.change(overrides, **spec, **layout), nproc=nproc, nnodes=nnodes))
    return out


def _offload(s: Setup) -> list[Setup]:
    # FSDP full shard with CPU offload over the same world; not for a 2-D (hybrid) layout, which it would lose.
    spec = s.spec
    hybrid = spec.sharded and spec.dims.dp_replicate > 1
    layout = _layout(s, "fsdp", s.nproc, s.nnodes, spec.micro_batch)
    if hybrid or spec.cpu_offload or layout is None:
        return []
    return [s.change(["strategy=fsdp_offload"], **layout, reshard_after_forward=True, cpu_offload=True)]


CANDIDATES: list[tuple[str, Callable[[Setup], list[Setup]]]] = [
    ("one process, no DDP buckets", _single),
    ("bf16 mixed precision", _bf16),
    ("flash attention", _flash),
    ("FSDP full shard", _full_shard),
    ("8-bit optimizer states", _adamw8bit),
    ("FSDP x tensor parallelism", _tensor_parallel),
    ("selective activation checkpointing", _ac("selective")),
    ("full activation checkpointing", _ac("full")),
    ("a smaller micro-batch", _smaller_micro_batch),
    ("GQA (4 query heads per K/V head)", _gqa),
    ("FSDP over more nodes (more GPUs)", _more_ranks),
    ("CPU offload", _offload),
    # Fine-tuning adapters instead of every weight changes what trains: offered last, when nothing else fits.
    ("LoRA adapters on a frozen bf16 base", _adapters("bf16-true")),
    ("QLoRA: LoRA on a 4-bit (NF4) base", _adapters("nf4")),
]
LORA_RANK = 8  # conf/finetune/lora.yaml's (trainer/config.FinetuneConfig.rank)


def _first_fit(tries: list[Setup], limit: float) -> tuple[Setup, MemoryPlan] | None:
    # The first change that fits, else the last one tried (the furthest it went).
    found = None
    for trial in tries:
        found = (trial, trial.plan())
        if found[1].peak <= limit:
            break
    return found


def suggestions(setup: Setup, limit: float) -> list[tuple[str, Setup, MemoryPlan]]:
    # The candidates that fit on their own, cheapest first; if none does, the cheapest combination that
    # fits, built by adding candidates in order of cost (each kept only if it lowers the peak). Only changes
    # that fit: a combination that still does not is no suggestion ([]).
    single = []
    for label, candidate in CANDIDATES:
        if (found := _first_fit(candidate(setup), limit)) is not None:
            single.append((label, *found))
    fitting = [c for c in single if c[2].peak <= limit]
    if fitting:
        return fitting
    combined, labels, best = setup, [], setup.plan()
    for label, candidate in CANDIDATES:
        found = _first_fit(candidate(combined), limit)
        if found is not None and found[1].peak < best.peak:
            added = set(found[0].overrides) - set(combined.overrides)
            (combined, best), labels = found, [*labels, (label, added)]
        if best.peak <= limit:
            break
    # A change a later one replaced (strategy=single, then strategy=fsdp_offload) is not named.
    named = [label for label, added in labels if added & set(combined.overrides)]
    return [(" + ".join(named), combined, best)] if labels and best.peak <= limit else []
