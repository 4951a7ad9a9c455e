# Tensor parallelism through DTensor (torch.distributed.tensor.parallel), as torchtitan applies it, from the
# model's own parallel plan (models/plan.py): in every block q, k, v and the MLP's gate and up projections are
# column-parallel (each rank computes n_heads / tp heads and ffn / tp hidden units), the attention output and
# the MLP's down projection row-parallel (their partial sums all-reduced, or reduce-scattered over the sequence
# under sequence parallelism); the embedding is row-parallel over the vocabulary, and the output head
# column-parallel with its logits left sharded over the vocabulary for loss_parallel's cross-entropy, so the
# full-vocabulary logits never exist on one rank. With strategy.sequence_parallel (the default, as in
# torchtitan) the norms and the residual stream between blocks are sharded over the sequence.
#   tp       one tensor-parallel group of strategy.tp ranks (the world)
#   fsdp_tp  FSDP2 over the data-parallel dimension, TP inside: a (dp, tp) mesh
#   hsdp_tp  HSDP over (replicate, shard), TP inside: a 3-D mesh
# Order inside: TP -> activation checkpointing -> compile -> FSDP (TP addresses modules by the plan's names,
# which the AC and compile wrappers would change).
from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass

from strategies.base import Strategy, StrategyConfig, option, ranged
from strategies.fsdp import FSDP, FSDPConfig
from strategies.hsdp import HSDP, HSDPConfig
from strategies.parallel_dims import ParallelDims

logger = logging.getLogger(__name__)


@dataclass
class TPConfig(StrategyConfig):
    name: str = "tp"
    tp: int = ranged(0, ">= 0")  # the tensor-parallel degree; 0: every rank of a node
    sequence_parallel: bool = True  # norms and the residual stream sharded over the sequence


@dataclass
class FSDPTPConfig(FSDPConfig):
    name: str = "fsdp_tp"
    tp: int = ranged(2, ">= 1")
    sequence_parallel: bool = True


@dataclass
class HSDPTPConfig(HSDPConfig):
    name: str = "hsdp_tp"
    tp: int = ranged(2, ">= 1")
    sequence_parallel: bool = True


def tp_degree(cfg, world_size: int, per_node: int | None) -> int:
    tp = option(cfg, "tp", 0) or per_node or world_size
    if tp > world_size or world_size % tp:
        raise ValueError(
            f"strategy.tp={tp} does not divide the world size {world_size}: choose a tp that divides {world_size} "
            "(the world is data-parallel size x tp)"
        )
    if per_node and tp < per_node and per_node % tp:
        raise ValueError(
            f"strategy.tp={tp} does not divide the {per_node} ranks of a node: a tensor-parallel group must not "
            f"straddle two nodes; choose a tp that divides {per_node}"
        )
    return tp


def check_layout(cfg, dims: ParallelDims, wrapped: bool) -> None:
    # What torch 2.13 refuses of tensor parallelism's combinations (seen on the CPU, gloo), and a warning where
    # TP spans nodes. wrapped: FSDP goes on top of TP.
    name = cfg.name
    if cfg.compile and not wrapped:
        raise ValueError(
            f"strategy={name} with strategy.compile=true fails in torch 2.13 (the compiled DTensor blocks raise "
            "AttributeError: 'Tensor' object has no attribute '_local_tensor'): set strategy.compile=false, or "
            "use strategy=fsdp_tp, whose compiled blocks run"
        )
    if cfg.compile and cfg.activation_checkpointing != "none":
        raise ValueError(
            f"strategy={name} with strategy.compile=true and strategy.activation_checkpointing="
            f"{cfg.activation_checkpointing} fails in torch 2.13 (its compiled autograd asserts on the checkpointed "
            "DTensor blocks): drop one of the two"
        )
    if dims.ranks_per_node and dims.tp > dims.ranks_per_node:
        logger.warning(
            "strategy.tp=%d spans nodes of %d ranks: every block's all-reduce then crosses the network; "
            "a tp within a node (and data parallelism across nodes) is usually faster",
            dims.tp,
            dims.ranks_per_node,
        )


def indivisible(args, plan, tp: int) -> str | None:
    # Why tensor parallelism of degree tp cannot split this model (its plan, and every split dimension divisible by
    # tp), in one line; None where it can.
    if plan.unsplit:
        return plan.unsplit
    shapes = {
        "model.n_heads (query heads)": args.n_heads,
        "the K/V head count": args.kv_heads,
        "model.dim": args.dim,
        "the MLP hidden size": args.ffn_hidden_dim,
        "model.vocab_size": args.vocab_size,
    }
    for what, n in shapes.items():
        if n % tp:
            return (
                f"strategy.tp={tp} does not divide {what} ({n}): each tensor-parallel rank holds 1/tp of it; choose "
                f"a strategy.tp that divides {n}"
            )
    return None


def check_splittable(cfg, dims: ParallelDims, args, plan) -> None:
    # What tensor parallelism needs of the model, before any worker starts.
    if plan.unsplit:
        raise ValueError(f"strategy={cfg.name} cannot split this model: {plan.unsplit}")
    if (why := indivisible(args, plan, dims.tp)) is not None:
        raise ValueError(why)
    if cfg.get("sequence_parallel") and getattr(args, "config", None) is not None:
        # transformers' decoder numbers the positions of the sequence it is given: a sequence-sharded input
        # would get positions 0 .. T/tp on every rank.
        raise ValueError(
            "strategy.sequence_parallel=true with model=hf: transformers' decoder takes its positions from the "
            "sequence it is given, which sequence parallelism shards; set strategy.sequence_parallel=false"
        )


class _TPMixin:
    # What every layout with a tensor-parallel dimension shares; combined with a data-parallel strategy below.
    splits_tensors = True
    needs_plan = True
    on_meta = True  # built on meta, then each rank's shards materialised (strategies/fsdp.py's materialize)

    def check_tp(self, cfg, dims: ParallelDims, args, plan) -> None:
        check_layout(cfg, dims, wrapped=self.shards_state)
        if args is not None and plan is not None:
            check_splittable(cfg, dims, args, plan)

    def loss_parallel(self, model):
        # The cross-entropy over vocabulary-sharded logits (and its backward): no rank gathers the full logits.
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def before_wrap(self, model, dims: ParallelDims, cfg, device) -> None:
        apply_tp(model, dims.submesh(device.type, ("tp",)), bool(cfg.get("sequence_parallel")))


class TP(_TPMixin, Strategy):
    name = "tp"
    schema = TPConfig
    casts_params = False

    def dims(self, cfg, world_size, per_node=None, rank=0) -> ParallelDims:
        tp = tp_degree(cfg, world_size, per_node)
        return ParallelDims(
            dp_replicate=world_size // tp, tp=tp, rank=rank, mesh_dims=("tp",), ranks_per_node=per_node
        )

    def check(self, cfg, dims, micro, accum, args=None, plan=None) -> None:
        if dims.dp_size > 1:
            raise ValueError(
                f"strategy=tp is one tensor-parallel group, but the world has {dims.world_size} ranks for "
                f"strategy.tp={dims.tp}: use strategy=fsdp_tp for data parallelism across the groups, or "
                f"strategy.tp={dims.world_size}"
            )
        self.check_tp(cfg, dims, args, plan)

    def plan_options(self, cfg) -> dict:
        return {"sequence_parallel": bool(cfg.get("sequence_parallel", True))}

    def plan_layout(self, spec) -> str:
        sp = ", sequence parallel" if spec.sequence_parallel else ""
        return f"tensor parallel over {spec.dims.tp} rank(s){sp}"

    def tune_presets(self, world_size, nnodes) -> list[str]:
        return ["tp"] if 1 < world_size and nnodes == 1 else []

    def apply(self, model, dims, cfg, *, device, precision):
        from strategies.common import apply_ac, apply_compile

        self.before_wrap(model, dims, cfg, device)
        apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
        if cfg.compile:
            apply_compile(model)
        return model

    def materialize(self, model, device, seed, cfg) -> None:
        from strategies.fsdp import materialize

        materialize(model, device, seed, cpu_offload=False)

    def grad_sync(self, model, enabled: bool):
        return contextlib.nullcontext()  # one group: no data-parallel reduction to defer


class FSDPTP(_TPMixin, FSDP):
    name = "fsdp_tp"
    schema = FSDPTPConfig
    dp_dims = ("shard",)

    def dims(self, cfg, world_size, per_node=None, rank=0) -> ParallelDims:
        tp = tp_degree(cfg, world_size, per_node)
        return ParallelDims(
            dp_shard=world_size // tp, tp=tp, rank=rank, mesh_dims=("shard", "tp"), ranks_per_node=per_node
        )

    def check(self, cfg, dims, micro, accum, args=None, plan=None) -> None:
        self.check_tp(cfg, dims, args, plan)

    def plan_options(self, cfg) -> dict:
        return {**super().plan_options(cfg), "sequence_parallel": bool(cfg.get("sequence_parallel", True))}

    def plan_layout(self, spec) -> str:
        return f"{super().plan_layout(spec)}, tensor parallel over {spec.dims.tp}"

    def tune_presets(self, world_size, nnodes) -> list[str]:
        return ["fsdp_tp"] if world_size >= 4 else []


class HSDPTP(FSDPTP, HSDP):
    name = "hsdp_tp"
    schema = HSDPTPConfig
    dp_dims = ("replicate", "shard")

    def dims(self, cfg, world_size, per_node=None, rank=0) -> ParallelDims:
        # HSDP's (replicate, shard) over the data-parallel ranks; shard_size 0: the data-parallel ranks of a node.
        tp = tp_degree(cfg, world_size, per_node)
        dp = HSDP.dims(self, cfg, world_size // tp, per_node // tp if per_node else None)
        mesh_dims = ("replicate", "shard", "tp")
        return ParallelDims(
            dp.dp_replicate, dp.dp_shard, tp, rank=rank, mesh_dims=mesh_dims, ranks_per_node=per_node
        )

    def tune_presets(self, world_size, nnodes) -> list[str]:
        return ["hsdp_tp"] if nnodes > 1 else []


def apply_tp(model, mesh, sequence_parallel: bool) -> None:
    # The model's parallel plan as torch's parallel styles, applied in place on the tp mesh.
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan = model.parallel_plan
    seq = Shard(1) if sequence_parallel else Replicate()  # the residual stream between blocks: (B, T, D)
    root = {
        plan.embedding: RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        # Logits stay a DTensor sharded over the vocabulary, for loss_parallel.
        plan.head: ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:
        root[plan.final_norm] = SequenceParallel()
    # a pipeline rank holds the embedding only on the first stage, the norm and the head only on the last
    root = {path: style for path, style in root.items() if operator.attrgetter(path)(model) is not None}
    parallelize_module(model, mesh, root)
    for _, block in plan.indexed_blocks(model):
        styles = {name: ColwiseParallel() for name in plan.colwise}
        styles |= {name: RowwiseParallel(output_layouts=seq) for name in plan.rowwise}
        if sequence_parallel:
            styles |= {name: SequenceParallel() for name in plan.norms}
            # The attention and the MLP read the whole sequence: gathered on the way in (the attention's
            # other inputs, RoPE's cos and sin, are the same on every rank).
            for name, n_inputs in plan.sp_inputs:
                rest = (None,) * (n_inputs - 1)
                styles[name] = PrepareModuleInput(
                    input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest)
                )
        parallelize_module(block, mesh, styles)
