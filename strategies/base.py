# What every strategy is asked. One object per strategy (a file each: single.py, ddp.py, fsdp.py, hsdp.py) holds
# all of its facts: its config schema and checks, its parallel dimensions and device mesh, how it wraps and
# materialises a model, whether it builds on meta, what the memory planner must know of it (which state it
# shards, over which dimension), what tune tries of it and what describe reports. The loop, the planner and
# tune ask the object; none of them compares strategy names.
#
# Torch-free at import: Hydra registers each strategy's schema before the command line is parsed (train.py
# --help imports no torch), and the launcher's parent checks a strategy's config before any worker starts.
# torch (and FSDP2, DTensor) come in with the methods that wrap a model.
from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strategies.parallel_dims import ParallelDims

if TYPE_CHECKING:
    import torch
    from torch import nn


# A numeric option's valid range: ">= 1", "> 0", "[0, 1)", "[0, 1]". trainer/config.py checks every schema's.
RANGE_RULE = re.compile(r"^(>=|>) (-?[\d.e+-]+)$|^([\[(])(-?[\d.]+), (-?[\d.]+)([\])])$")


def ranged(default, rule: str):
    # A numeric field and its valid range. None (unset) is always valid.
    if not RANGE_RULE.match(rule):
        raise ValueError(f"bad range rule {rule!r}")
    return field(default=default, metadata={"range": rule})


def one_of(key: str, value, valid) -> None:
    # A name that picks one of a registry's entries; trainer/ and the layers above use this one too (models/, which
    # imports nothing of ours, has its own in models/attention.py).
    if value not in valid:
        raise ValueError(f"unknown {key} {value!r}: valid options are {', '.join(valid)}")


@dataclass
class StrategyConfig:
    name: str = "single"
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = ranged(2, ">= 1")  # selective: checkpoint every n-th block
    compile: bool = False  # torch.compile each block


AC_MODES = ("none", "full", "selective")


def checkpointed(mode: str, every: int, n_layers: int) -> list[bool]:
    # Which blocks recompute their activations in backward (keeping only their input): full, every one;
    # selective, every `every`-th, trading some memory back for speed. The memory planner reads the same.
    one_of("strategy.activation_checkpointing", mode, AC_MODES)
    return [mode == "full" or (mode == "selective" and i % every == 0) for i in range(n_layers)]


class Strategy:
    name: str = ""
    schema: type = StrategyConfig  # conf/strategy/<option>.yaml extends /schema/strategy_<name>
    on_meta: bool = False  # built on the meta device, then only local shards are materialised
    shards_state: bool = False  # parameters, gradients and optimizer state split over dp_shard (FSDP)
    grad_buckets: bool = False  # a second copy of the gradients in communication buckets (DDP)
    casts_params: bool = (
        False  # casts parameters for compute itself (FSDP's MixedPrecisionPolicy): no autocast
    )
    needs_group: bool = True  # a process group even in a world of one
    splits_tensors: bool = (
        False  # tensor parallel: checked against the model's parallel plan (models/plan.py)
    )
    needs_plan: bool = False  # checked against the model's parallel plan before launch (TP, PP)
    pipelined: bool = False  # the model runs in stages over the ranks (PP): the planner plans each stage

    # ---------------------------------------------------------------- the layout, before any worker starts
    def dims(self, cfg: Any, world_size: int, per_node: int | None = None, rank: int = 0) -> ParallelDims:
        # cfg: the strategy's sub-config (or a mapping of its options); per_node: ranks per node (None: all).
        raise NotImplementedError

    def check(self, cfg: Any, dims: ParallelDims, micro: int, accum: int, args=None, plan=None) -> None:
        # What the strategy cannot run, in one ValueError naming the fix (micro-batches of `micro` sequences per
        # rank, `accum` of them a step; args and plan: the model's arguments and parallel plan, where known).
        return None

    def plan_options(self, cfg: Any) -> dict:
        # The options the memory planner reads (trainer/memory/spec.py's PlanSpec fields).
        return {}

    def plan_layout(self, spec) -> str:
        # How `python -m commands.plan` names the layout: "replicated on 8 rank(s)".
        raise NotImplementedError

    def tune_presets(self, world_size: int, nnodes: int) -> list[str]:
        # The conf/strategy options of this strategy that `python -m commands.tune` tries unless told otherwise.
        return []

    # ---------------------------------------------------------------- in a worker
    def apply(self, model: nn.Module, dims: ParallelDims, cfg: Any, *, device, precision) -> nn.Module:
        # AC -> compile -> the wrapper, in that order; returns the model to train.
        raise NotImplementedError

    def materialize(self, model: nn.Module, device: torch.device, seed: int, cfg: Any) -> None:
        # on_meta strategies: real storage for the local shards, filled as a single process initialises.
        raise NotImplementedError

    def before_wrap(self, model: nn.Module, dims: ParallelDims, cfg: Any, device) -> None:
        # What a layout does to the bare model before activation checkpointing, compile and the wrapper (TP).
        return None

    def loss_parallel(self, model: nn.Module):
        # Around the loss and its backward: tensor parallelism's cross-entropy over vocabulary-sharded logits.
        return contextlib.nullcontext()

    def grad_sync(self, model: nn.Module, enabled: bool):
        # Gradient accumulation: reduce across ranks only on the last micro-batch of a step.
        return contextlib.nullcontext()

    def forward_backward(self, model: nn.Module, batches, accum: int, precision, device) -> torch.Tensor:
        # One step's forward and backward over its `accum` micro-batches (an iterable of (x, y)): -> this rank's
        # share of the step's mean loss, whose mean over all ranks is the step's loss (every rank's own mean here).
        import torch
        import torch.nn.functional as F

        loss_sum = torch.zeros((), device=device)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Gradients are reduced across ranks only on the last micro-batch of the step.
            with self.grad_sync(model, enabled=i == accum - 1), self.loss_parallel(model):
                with precision.context():
                    logits = model(x)  # (micro, T, vocab); under TP a DTensor sharded over the vocabulary
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                precision.backward(loss / accum)  # fp16-mixed: scaled
            loss_sum += as_tensor(loss.detach())
        return loss_sum / accum

    def eval_sums(self, model: nn.Module, chunks: list, precision, device) -> torch.Tensor:
        # One held-out batch's micro-batches of (B, T + 1) rows: -> (the sum of its target tokens' losses, their
        # count) as counted on this rank, float64; summed over the ranks, their ratio is the loss.
        import torch
        import torch.nn.functional as F

        totals = torch.zeros(2, dtype=torch.float64, device=device)
        for chunk in chunks:
            x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)
            with precision.context(), self.loss_parallel(model):
                logits = model(x)  # (micro, T, vocab)
                loss = as_tensor(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
            totals += torch.stack(
                [loss.double(), torch.tensor(y.numel(), dtype=torch.float64, device=device)]
            )
        return totals

    def norm_group(self, model: nn.Module):
        # The process group over which the gradient norm also sums (the ranks holding the model's other parts).
        return None

    def pipeline_facts(self, model: nn.Module, microbatches: int, warmup: int | None = None) -> dict | None:
        # The pipeline's schedule, stages and bubble, for summary.json (None: no pipeline); with warmup, the bubble
        # measured over the steps after the first `warmup` (a collective).
        return None

    def describe(self, model: nn.Module, cfg: Any, dims: ParallelDims) -> dict:
        # What was actually applied, for summary.json.
        out = {k: v for k, v in cfg.items()}
        if dims.mesh_dims:
            out["mesh"] = dims.describe()
        out["wrapper"] = type(model).__name__
        return out


def option(cfg: Any, key: str, default=None):
    # A strategy option from its DictConfig or a plain mapping (the planner's candidates), the schema's default
    # where it is not given.
    return cfg.get(key, default) if cfg is not None else default


def as_tensor(t: torch.Tensor) -> torch.Tensor:
    # A DTensor's full value (tensor parallelism's loss is one, replicated), a plain tensor as it is.
    return t.full_tensor() if instance_of(t, "torch.distributed.tensor", "DTensor") else t


def instance_of(obj, module: str, name: str) -> bool:
    # isinstance against a class of a module that is imported only where it is used (FSDP2, DTensor):
    # until that module is loaded, nothing can be an instance of its class, and nothing need load it.
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(obj, getattr(loaded, name))
