# Pipeline parallelism through torch.distributed.pipelining (PipelineStage and torch's schedules; no hand-written
# send or recv): the model's blocks split into pp x pp_stages_per_rank stages by layers (even, or
# strategy.pp_split), the embedding on the first stage, the final norm and the head on the last. Data
# parallelism over the rest of the world is FSDP2 (one way where pp x tp is the world), and strategy.tp > 1
# splits each stage's tensors as strategies/tp.py does: PP, PP x FSDP, PP x TP and PP x FSDP x TP on one
# (pp, shard, tp) mesh.
#
# Each rank keeps one model holding all of its stages' modules under their single-process names (layers.5 stays
# layers.5), so the optimizer, the checkpoint and the state counts see one module as for every other strategy;
# each of its stages runs through a view (_Stage) onto that model's modules, which is what PipelineStage and FSDP
# wrap. The global batch and trainer.micro_batch_size decide the micro-batches (the schedule's n_microbatches is
# the gradient accumulation count), so a step sees the same tokens as under every other strategy.
from __future__ import annotations

import contextlib
import functools
import operator
import time
from dataclasses import dataclass

from strategies.base import option, ranged
from strategies.fsdp import FSDP, FSDPConfig
from strategies.parallel_dims import ParallelDims
from strategies.tp import apply_tp, check_layout, check_splittable, tp_degree

# strategy.pp_schedule -> (torch's schedule class, stages per rank it takes: None = 2 or more)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", None),
    "interleaved_zero_bubble": ("ScheduleInterleavedZeroBubble", None),
    "zbv": (
        "ScheduleZBVZeroBubble",
        2,
    ),  # zero bubble, stages laid out in a V: rank r holds r and 2 pp - 1 - r
}


@dataclass
class PPConfig(FSDPConfig):
    name: str = "pp"
    pp: int = ranged(2, ">= 1")  # pipeline stages' ranks (the pipeline degree)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zero_bubble | zbv
    pp_stages_per_rank: int = ranged(1, ">= 1")  # 2 or more for the interleaved schedules, 2 for zbv
    # 0: the gradient accumulation count (global batch / data-parallel size / trainer.micro_batch_size); else
    # this many, which then sets the micro-batch where trainer.micro_batch_size is unset
    pp_microbatches: int = ranged(0, ">= 0")
    pp_split: list[int] | None = None  # layers per stage, e.g. [3, 3, 2]; None: as even as they divide
    tp: int = ranged(1, ">= 1")  # tensor parallelism inside each stage
    sequence_parallel: bool = True


def stages_of(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    # The stage indices a pipeline rank holds: in a loop (r, r + pp, ...), or in a V for zbv (r, 2 pp - 1 - r).
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def layer_split(n_layers: int, n_stages: int, split) -> list[int]:
    # Blocks per stage: strategy.pp_split, or as even as they divide (the first stages take one more).
    if split:
        return list(split)
    base, extra = divmod(n_layers, n_stages)
    return [base + (i < extra) for i in range(n_stages)]


def bubble_fraction(schedule: str, pp: int, per_rank: int, microbatches: int) -> float:
    # Idle time over a step's time, by the schedules' papers: GPipe and 1F1B (p - 1) / (m + p - 1); interleaved
    # with v stages per rank (p - 1) / (v m + p - 1) (Narayanan et al. 2021); the zero-bubble schedules fill the
    # bubble with weight gradients, leaving (p - 1) / (3 v m + p - 1) of a step, the warm-up their B/W split cannot
    # fill (Qi et al. 2023, ZB-V's handcrafted schedule: zero in the limit).
    p, m, v = pp, microbatches, per_rank
    if p == 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (3 * v * m + p - 1)


def in_flight(schedule: str, pp: int, per_rank: int, microbatches: int, pp_rank: int) -> list[list[int]]:
    # The micro-batches whose activations a pipeline rank holds at its fullest moments, per stage it holds (in
    # stages_of's order), by torch's own schedules (torch/distributed/pipelining/schedules.py): GPipe, every
    # micro-batch; 1F1B, pp - rank (its warm-up forwards and the first steady one before their backward);
    # interleaved, its warm-up forwards, (v - 1) x per-round + 2 (pp - 1 - rank), 1 x for zero bubble, plus one,
    # in rounds of per-round micro-batches per stage; ZBV: 2 pp - rank on its first stage while it holds rank on
    # its second, then one fewer and one more.
    p, v, m, r = pp, per_rank, microbatches, pp_rank
    if schedule == "gpipe":
        return [[m]]
    if schedule == "1f1b":
        return [[min(m, p - r)]]
    if schedule == "zbv":
        return [[min(m, 2 * p - r), min(m, r)], [min(m, 2 * p - r - 1), min(m, r + 1)]]
    per_round = m // max(1, m // p)
    factor = 2 if schedule == "interleaved_1f1b" else 1
    forwards = min(m * v, (v - 1) * per_round + factor * (p - 1 - r) + 1)
    counts = [0] * v
    for k in range(forwards):
        counts[(k // per_round) % v] += 1
    return [counts]


class PP(FSDP):
    name = "pp"
    schema = PPConfig
    needs_plan = True
    pipelined = True
    dp_dims = ("shard",)

    def dims(self, cfg, world_size, per_node=None, rank=0) -> ParallelDims:
        pp, tp = option(cfg, "pp", 2), option(cfg, "tp", 1)
        if world_size % pp:
            raise ValueError(
                f"strategy.pp={pp} does not divide the world size {world_size}: choose a pp that divides {world_size}"
            )
        tp = tp_degree({"tp": tp}, world_size // pp, per_node) if tp > 1 else 1
        return ParallelDims(
            dp_shard=world_size // (pp * tp), tp=tp, pp=pp, rank=rank, mesh_dims=("pp", "shard", "tp"),
            ranks_per_node=per_node, pp_microbatches=option(cfg, "pp_microbatches", 0),
        )  # fmt: skip

    def check(self, cfg, dims, micro, accum, args=None, plan=None) -> None:
        schedule, per_rank = cfg.pp_schedule, cfg.pp_stages_per_rank
        if schedule not in SCHEDULES:
            raise ValueError(
                f"unknown strategy.pp_schedule {schedule!r}: valid options are {', '.join(SCHEDULES)}"
            )
        takes = SCHEDULES[schedule][1]
        if takes is not None and per_rank != takes or takes is None and per_rank < 2:
            want = (
                f"strategy.pp_stages_per_rank={takes}" if takes else "strategy.pp_stages_per_rank=2 (or more)"
            )
            raise ValueError(
                f"strategy.pp_schedule={schedule} runs {takes or '2 or more'} stage(s) per rank, not "
                f"{per_rank}: set {want}"
            )
        stages = dims.pp * per_rank
        if (
            cfg.cpu_offload
        ):  # a pipeline stage's state is what the memory planner and the tests cover on the device
            raise ValueError(
                "strategy.cpu_offload=true with strategy=pp: pipeline stages keep their state on the device; set "
                "strategy.cpu_offload=false (a stage's share is 1/pp of the model), or use strategy=fsdp with offload"
            )
        if cfg.pp_microbatches and cfg.pp_microbatches != accum:
            raise ValueError(
                f"strategy.pp_microbatches={cfg.pp_microbatches} but the batch layout makes {accum} micro-batch(es) "
                f"of {micro} per data-parallel rank: set trainer.micro_batch_size={micro * accum // cfg.pp_microbatches}"
                " (or leave it unset), or strategy.pp_microbatches=0"
            )
        # torch's own rules: 1F1B (and here ZBV) needs a micro-batch per stage rank; the interleaved schedules run
        # rounds of max(1, m // pp) micro-batches, so the count must divide into them.
        rounds = max(1, accum // dims.pp)
        if schedule in ("1f1b", "zbv") and accum < dims.pp or takes is None and accum % rounds:
            need = f"at least {dims.pp} micro-batches (one per stage rank)" if takes else (
                f"a micro-batch count that divides into rounds of {dims.pp} (a multiple of {rounds})")  # fmt: skip
            raise ValueError(
                f"strategy.pp_schedule={schedule} needs {need}, got {accum} ({micro} sequence(s) each): lower "
                "trainer.micro_batch_size, or change trainer.global_batch_size"
            )
        if args is not None:
            if not cfg.pp_split and stages > args.n_layers:
                raise ValueError(
                    f"strategy.pp={dims.pp} x strategy.pp_stages_per_rank={per_rank} makes {stages} stages, more than "
                    f"the model's {args.n_layers} blocks: lower strategy.pp or strategy.pp_stages_per_rank (each stage "
                    "needs a block)"
                )
            split = layer_split(args.n_layers, stages, cfg.pp_split)
            if len(split) != stages or sum(split) != args.n_layers or min(split) < 1:
                raise ValueError(
                    f"strategy.pp_split={list(split)} must give each of the {stages} stages (strategy.pp x "
                    f"pp_stages_per_rank) at least one of the model's {args.n_layers} blocks, summing to {args.n_layers}"
                )
            if getattr(args, "tie_embeddings", False):
                raise ValueError(
                    "model.tie_embeddings=true with pipeline parallelism: the embedding (first stage) and the output "
                    "head (last stage) would share one weight across stages; set model.tie_embeddings=false"
                )
        if plan is not None and plan.unpiped:
            raise ValueError(f"strategy=pp cannot split this model into stages: {plan.unpiped}")
        if dims.tp > 1:
            check_layout(cfg, dims, wrapped=True)
            if args is not None and plan is not None:
                check_splittable(cfg, dims, args, plan)

    def plan_options(self, cfg) -> dict:
        split = cfg.get("pp_split")
        return {
            **super().plan_options(cfg),
            "sequence_parallel": bool(cfg.get("sequence_parallel", True)),
            "pp_schedule": cfg.get("pp_schedule", "1f1b"),
            "pp_stages_per_rank": cfg.get("pp_stages_per_rank", 1),
            "pp_split": tuple(split) if split else None,
        }

    def plan_layout(self, spec) -> str:
        d = spec.dims
        fsdp = f", FSDP over {d.dp_shard}" if d.dp_shard > 1 else ""
        tp = f", tensor parallel over {d.tp}" if d.tp > 1 else ""
        return f"pipeline of {d.pp} stage ranks{fsdp}{tp}, {d.world_size} ranks"

    def tune_presets(self, world_size, nnodes) -> list[str]:
        # Across nodes, where a pipeline's activations at stage boundaries cost less than FSDP's parameter
        # traffic; on one node by tune.strategies. Tune spreads it over tune.pp x tune.pp_schedules.
        return ["pp"] if nnodes > 1 else []

    def apply(self, model, dims, cfg, *, device, precision):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.pipelining import PipelineStage

        from strategies.common import apply_ac, apply_compile

        plan = model.parallel_plan
        pp_rank = dims.coords()["pp"]
        held = stages_of(pp_rank, dims.pp, cfg.pp_stages_per_rank, cfg.pp_schedule)
        n_stages = dims.pp * cfg.pp_stages_per_rank
        split = layer_split(len(plan.block_list(model)), n_stages, cfg.pp_split)
        starts = [sum(split[:i]) for i in range(n_stages + 1)]
        ranges = {s: [str(i) for i in range(starts[s], starts[s + 1])] for s in held}
        _prune(model, plan, {k for keys in ranges.values() for k in keys}, 0 in held, n_stages - 1 in held)
        if dims.tp > 1:
            apply_tp(model, dims.submesh(device.type, ("tp",)), bool(cfg.sequence_parallel))
        apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
        if cfg.compile:
            apply_compile(model)
        seq_shards = dims.tp if dims.tp > 1 and cfg.sequence_parallel else 1
        views = [stage_view(model, plan, ranges[s], s == 0, s == n_stages - 1, seq_shards) for s in held]
        mesh = dims.submesh(device.type, self.dp_dims)
        mp = MixedPrecisionPolicy(
            param_dtype=precision.compute_dtype if precision.autocast else None, reduce_dtype=torch.float32
        )
        for view in views:
            for block in view.layers.values():
                fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp)
            fully_shard(view, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
        group = dims.submesh(device.type, ("pp",)).get_group()
        stages = [
            PipelineStage(v, s, n_stages, device, group=group) for v, s in zip(views, held, strict=True)
        ]
        model.pipeline = Pipeline(stages, cfg.pp_schedule, split, dims, group, timed=device.type == "cpu")
        return model

    def norm_group(self, model):
        return model.pipeline.group  # each rank holds its stages' parameters: the norm sums over the pipeline

    def pipeline_facts(self, model, microbatches: int, warmup: int | None = None) -> dict:
        p = model.pipeline
        return {
            "schedule": p.schedule_name,
            "stages": [stages_of(r, p.dims.pp, len(p.stages), p.schedule_name) for r in range(p.dims.pp)],
            "layers_per_stage": p.split,
            "microbatches": microbatches,
            "bubble_fraction": p.bubble(microbatches, warmup),
        }

    def forward_backward(self, model, batches, accum, precision, device):
        return model.pipeline.step([(x.to(device), y.to(device)) for x, y in batches], precision)

    def eval_sums(self, model, chunks, precision, device):
        import torch

        total, count = model.pipeline.eval(
            [(c[:, :-1].to(device), c[:, 1:].to(device)) for c in chunks], precision
        )
        return torch.stack([total.double(), count.double()])

    def grad_sync(self, model, enabled: bool):
        return contextlib.nullcontext()  # each stage's schedule syncs its own FSDP gradients


def _prune(model, plan, keep: set[str], first: bool, last: bool) -> None:
    # The rank's model: its stages' blocks under their own indices, the first stage's and the last stage's
    # modules where it holds those stages, nothing else.
    from torch import nn

    blocks = plan.block_list(model)
    parent, _, name = plan.blocks.rpartition(".")
    owner = operator.attrgetter(parent)(model) if parent else model
    setattr(owner, name, nn.ModuleDict({str(i): b for i, b in enumerate(blocks) if str(i) in keep}))
    for path in (*(() if first else plan.first_stage), *(() if last else plan.last_stage)):
        parent, _, name = path.rpartition(".")
        setattr(operator.attrgetter(parent)(model) if parent else model, name, None)


@functools.cache
def _stage_class():
    from torch import nn

    class Stage(nn.Module):
        # One stage's view onto the rank's model: its blocks (and the embedding or the norm and head) as children,
        # so FSDP and PipelineStage see this stage's parameters only; forward is the model's own stage forward.
        def __init__(self, model, plan, keys: list[str], first: bool, last: bool, seq_shards: int):
            super().__init__()
            object.__setattr__(self, "_model", model)  # not a child: the model holds the other stages too
            self.first, self.last, self.seq_shards = first, last, seq_shards
            self.layers = nn.ModuleDict({k: plan.block_list(model)[k] for k in keys})
            parts = (plan.first_stage if first else ()) + (plan.last_stage if last else ())
            self.ends = nn.ModuleDict({p.replace(".", "_"): operator.attrgetter(p)(model) for p in parts})

        def forward(self, x):
            # After the first stage x is the residual stream, of T / seq_shards tokens under sequence parallelism.
            seq_len = None if self.first else x.shape[1] * self.seq_shards
            return self._model.forward_stage(x, list(self.layers.values()), self.first, self.last, seq_len)

    return Stage


def stage_view(model, plan, keys: list[str], first: bool, last: bool, seq_shards: int = 1):
    # An nn.Module, whose class is made where torch is imported (this file is imported before torch).
    return _stage_class()(model, plan, keys, first, last, seq_shards)


class Pipeline:
    # The rank's stages and its schedule (made at the first step, when the micro-batch count is known).
    def __init__(self, stages: list, schedule: str, split: list[int], dims: ParallelDims, group, timed: bool):
        self.stages, self.schedule_name, self.split, self.n_stages = stages, schedule, split, len(split)
        # timed: each step's wall time and the time this rank's stages compute in it, for the measured bubble.
        # On the CPU only: on a GPU the host returns before the kernels finish, so a host clock would not see it.
        self.busy, self.steps = 0.0, []
        if timed:
            for stage in stages:
                for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                    setattr(stage, name, self._timed(getattr(stage, name)))
        self.dims, self.group, self.tensor_parallel = dims, group, dims.tp > 1
        self.first = any(s.stage_index == 0 for s in stages)
        self.last = any(s.stage_index == self.n_stages - 1 for s in stages)
        self._schedules: dict[int, object] = {}

    def _timed(self, compute):
        @functools.wraps(compute)
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                return compute(*args, **kwargs)
            finally:
                self.busy += time.perf_counter() - began

        return run

    def schedule(self, microbatches: int):
        key = microbatches
        if key not in self._schedules:
            from torch.distributed.pipelining import schedules

            cls = getattr(schedules, SCHEDULES[self.schedule_name][0])
            stages = self.stages[0] if SCHEDULES[self.schedule_name][1] == 1 else self.stages
            schedule = cls(stages, microbatches, loss_fn=_mean_loss)
            self._schedules[key] = schedule
        return self._schedules[key]

    def _context(self):
        if not self.tensor_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def step(self, batches: list, precision):
        # One optimizer step's forward and backward over the micro-batches: -> this rank's mean loss times pp on a
        # last stage, zero elsewhere (a tensor), so that the loop's mean over all ranks is the mean loss: 1/pp of
        # the ranks hold a last stage.
        import torch

        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        losses: list = []
        began, busy = time.perf_counter(), self.busy
        with precision.context(), self._context():
            self.schedule(len(batches)).step(*((x,) if self.first else ()), target=y if self.last else None,
                                             losses=losses, return_outputs=False)  # fmt: skip
        self.steps.append((time.perf_counter() - began, self.busy - busy))
        return _mean(losses, x.device) * self.dims.pp

    def eval(self, batches: list, precision):
        # -> (the sum of the target tokens' losses, their count) on a last stage, zeros elsewhere.
        import torch

        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        losses: list = []
        # torch 2.13's ZBV schedule runs its backward actions in eval() too, and fails ("can't steal_bwd_input if
        # this stage doesn't have backward"); its forward-only order fails torch's own validation. So ZBV
        # evaluates by a training step whose gradients are dropped: the same losses, at a training step's cost.
        full = self.schedule_name == "zbv"
        with torch.enable_grad() if full else torch.no_grad(), precision.context(), self._context():
            run = self.schedule(len(batches)).step if full else self.schedule(len(batches)).eval
            run(
                *((x,) if self.first else ()),
                target=y if self.last else None,
                losses=losses,
                return_outputs=False,
            )
        if full:
            for stage in self.stages:
                stage.submod.zero_grad(set_to_none=True)
        per_micro = y.numel() / len(batches)
        total = _mean(losses, x.device) * len(batches) * per_micro
        return total, torch.tensor(float(y.numel()) if self.last else 0.0, device=x.device)

    def bubble(self, microbatches: int, warmup: int | None = None) -> dict:
        # The schedule's bubble fraction by the arithmetic; with warmup (the steps to leave out), also as measured:
        # one minus the stages' compute time over the steps' wall time, summed over the steps after warm-up and
        # over every rank (a collective: every rank calls it).
        out = {
            "arithmetic": bubble_fraction(self.schedule_name, self.dims.pp, len(self.stages), microbatches)
        }
        if warmup is not None and self.steps[warmup:]:
            import torch
            import torch.distributed as dist

            wall, busy = torch.tensor(
                [sum(col) for col in zip(*self.steps[warmup:], strict=True)], dtype=torch.float64
            )
            totals = torch.stack([wall, busy])
            dist.all_reduce(totals)
            out["measured"] = float(1 - totals[1] / totals[0])
        return out


def _mean_loss(output, target):
    import torch.nn.functional as F

    return F.cross_entropy(output.float().flatten(0, 1), target.flatten())


def _mean(losses: list, device):
    import torch

    if not losses:
        return torch.zeros((), device=device)
    values = [loss.full_tensor() if hasattr(loss, "full_tensor") else loss for loss in losses]
    return torch.stack([v.detach().float() for v in values]).mean()
