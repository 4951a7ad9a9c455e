# One training step's memory on this rank, measured by PyTorch's own trackers: MemTracker (a
# TorchDispatchMode that sees every tensor storage created inside it and names it parameter, gradient,
# activation, temporary or optimizer state) and, under FSDP2, FSDPMemTracker, which also tells sharded from
# gathered parameters and gradients. Both run on CPU as well as CUDA. plan.py predicts the same categories;
# the two meet in summary.json (metrics.memory_breakdown=true). Imported only when a run asks for that.
import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import _pop_mode_temporarily

# The trackers' categories (their enum values) -> ours. Gathered (unsharded) parameters and the
# all-gather buffers are communication memory; gradients of activations, unsharded gradients before
# their reduce-scatter and its buffer are temporaries. "Other" only holds what _Tracker reveals (below).
CATEGORIES = {
    "Parameter": "params",
    "Sharded Param": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Sharded Grad": "grads",
    "Optstate": "optimizer",
    "OptState": "optimizer",
    "Activation": "activations",
    "Unsharded Param": "gathered_params",
    "All Gather": "gathered_params",
    "Temp": "temporaries",
    "Unsharded Grad": "temporaries",
    "Reduce Scatter": "temporaries",
    "Inputs": "temporaries",
    "Other": "ddp_buckets",
}
KEYS = (
    "params",
    "buffers",
    "grads",
    "optimizer",
    "activations",
    "gathered_params",
    "temporaries",
    "ddp_buckets",
)


def _ours(snapshot: dict) -> dict[str, int]:
    out = dict.fromkeys(KEYS, 0)
    for key, value in snapshot.items():
        name = getattr(key, "value", key)
        if name in CATEGORIES:
            out[CATEGORIES[name]] += value
    return out


def ddp_bucket_bytes(model: nn.Module) -> int:
    # DDP's C++ Reducer allocates its gradient buckets (one element per parameter element, in the
    # parameter dtype) when DDP is constructed, before any tracker starts, and no Python object holds
    # them; the Reducer's own record of their sizes is the measurement. 0 with gradient_as_bucket_view.
    if not isinstance(model, DistributedDataParallel):
        return 0
    data = model._get_ddp_logging_data()
    if data.get("gradient_as_bucket_view"):
        return 0
    return sum(int(s) for s in str(data.get("bucket_sizes", "")).split(",") if s.strip())


def _with_own_peak(base: type[MemTracker]) -> type[MemTracker]:
    # The trackers keep the breakdown at their peak only, and cannot see memory allocated before they
    # started that no Python object reaches: DDP's buckets. They meet a bucket only when the Reducer first
    # writes a gradient into it (mul.out in backward) and then book it as a new temporary. So: an op that
    # writes into a storage never seen before reveals such memory; it is booked as "Other", and the
    # buckets (hidden_bytes, known from DDP's own record) count in full at every moment instead. Each
    # category's own maximum is kept too (activations peak at the start of backward, gradients at its end).
    class Tracker(base):
        hidden_bytes = 0
        saved = None
        _func = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._func = func
            if self.saved is None and torch._C._current_graph_task_id() != -1:
                # The first op of backward: what forward left for it is exactly the saved activations.
                self.saved = _ours(self._curr_mem_snap.get(self.device, {}))["activations"]
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _track(self, reftype, t: torch.Tensor) -> None:
            if self.hidden_bytes and self._func is not None and self._func._schema.is_mutable:
                if any(st not in self._WINFO for st in get_untyped_storages(t)):
                    reftype = _MemRefType.OTH
            super()._track(reftype, t)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # MemTracker hooks every parameter's gradient, and a frozen one (finetune=lora's base) refuses a hook:
            # it is entered as hooked already, with nothing to remove (it never gets a gradient).
            for p in module.parameters():
                if not p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                    self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            snap = _ours(self._curr_mem_snap.get(self.device, {}))
            snap["ddp_buckets"] = self.hidden_bytes
            for key, value in snap.items():
                self.maxima[key] = max(self.maxima.get(key, 0), value)
            if sum(snap.values()) > sum(self.own_peak.values()):
                self.own_peak = snap

    return Tracker


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()
_Tracker = _with_own_peak(MemTracker)
_FSDPTracker = _with_own_peak(FSDPMemTracker)


def _reset_on_root_forward(tracker: MemTracker, model: nn.Module):
    # The trackers refuse a second top-level forward of a module (they take it for a second iteration);
    # gradient accumulation does exactly that within one step (the model), as does a pipeline's schedule (each
    # stage, once per micro-batch, while earlier micro-batches still await their backward). Forgetting that
    # module's own statistics before it runs again keeps the totals, which are all we read, and every other
    # module's, which the backward of the micro-batches in flight still looks up. A global pre-hook registered
    # before the tracker's own runs before it.
    seen: set[int] = set()

    def hook(module, args):
        if id(module) in seen and not set(tracker._mod_tracker.parents) - {"Global"}:
            tracker.memory_tracking.pop(module, None)
        seen.add(id(module))

    return torch.nn.modules.module.register_module_forward_pre_hook(hook)


def measure_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_step: Callable[[], Any],
    fsdp: bool,
    device: torch.device | None = None,
) -> tuple[dict, Any]:
    # -> (bytes on this rank, what run_step returned). Measure a step after the first two: the optimizer
    # state then exists from the start and DDP has rebuilt its buckets, as in every later step (the
    # planner predicts that steady state). `device`: whose memory to report (default: the parameters');
    # CPU-offloaded state is left out of a CUDA device's figures.
    from torch._dynamo.eval_frame import OptimizedModule  # dynamo is slow to import: only here

    if any(isinstance(m, OptimizedModule) for m in model.modules()):
        raise ValueError(
            "metrics.memory_breakdown measures with PyTorch's MemTracker, a TorchDispatchMode, under which "
            "torch.compile cannot run: set strategy.compile=false for the measured run"
        )
    if device is None:
        p = next(model.parameters())
        device = p.to_local().device if hasattr(p, "to_local") else p.device
    from torch.distributed.fsdp import FSDPModule

    # FSDPMemTracker takes an FSDP root; a pipeline rank's model is not one (its stages are): MemTracker then.
    if fsdp and isinstance(model, FSDPModule):
        tracker = _FSDPTracker(model, optimizer)
    else:
        tracker = _Tracker()
        tracker.track_external(model, optimizer)
    tracker.device, tracker.maxima, tracker.own_peak = device, {}, {}
    tracker.hidden_bytes = ddp_bucket_bytes(model)
    # Gradients are complete when the optimizer step begins; their running maximum would also count
    # moments where autograd holds a gradient and its accumulated copy at once.
    at_step: dict[str, int] = {}
    # torch.compile refuses to run under a TorchDispatchMode, and torchao's optimizers compile their step:
    # theirs runs with the tracker set aside (the state is tracked before and after, the step's scratch not).
    compiled_step = not type(optimizer).__module__.startswith("torch.optim")
    paused = contextlib.ExitStack()

    def before_step(*_):
        at_step.update(_ours(tracker.get_tracker_snapshot().get(device, {})))
        if compiled_step:
            paused.enter_context(_pop_mode_temporarily())

    hooks = [
        _reset_on_root_forward(tracker, model),
        optimizer.register_step_pre_hook(before_step),
        optimizer.register_step_post_hook(lambda *_: paused.close()),
    ]
    try:
        with tracker:
            result = run_step()
    finally:
        paused.close()
        for hook in hooks:
            hook.remove()
    at_peak, maxima = dict(tracker.own_peak), tracker.maxima
    # Optimizer state: what persists after the step. Anything more that the tracker booked as optimizer
    # memory at the peak was the step's own scratch (foreach intermediates): a temporary.
    optimizer_state = _ours(tracker.get_tracker_snapshot().get(device, {}))["optimizer"]
    scratch = max(0, at_peak.get("optimizer", 0) - optimizer_state)
    at_peak["optimizer"] = at_peak.get("optimizer", 0) - scratch
    at_peak["temporaries"] = at_peak.get("temporaries", 0) + scratch
    return {
        "peak_bytes": sum(at_peak.values()),
        "params_bytes": maxima.get("params", 0),
        "buffers_bytes": maxima.get("buffers", 0),
        "grads_bytes": at_step.get("grads", maxima.get("grads", 0)),
        "optimizer_bytes": optimizer_state,
        # Saved for backward when backward starts (the loop's logits included); forward's transients and
        # the backward recomputation of checkpointed blocks also count as activations at their peak.
        "activations_bytes": tracker.saved or 0,
        "activations_max_bytes": maxima.get("activations", 0),
        "temporaries_bytes": at_peak["temporaries"]
        + at_peak.get("gathered_params", 0)
        + tracker.hidden_bytes,
        "ddp_buckets_bytes": tracker.hidden_bytes,
        "at_peak": at_peak,
        "device": str(device),
        "tracker": _tracker_name(tracker),
    }, result


def _tracker_name(tracker: MemTracker) -> str:
    return "FSDPMemTracker" if isinstance(tracker, FSDPMemTracker) else "MemTracker"


def breakdown_record(measured: dict, plan, step: int) -> dict:
    # summary.json's memory_breakdown: this rank's measured step next to the planner's prediction for the
    # same config (plan: a MemoryPlan, or None where the planner cannot plan the model),
    # and predicted / measured per category.
    keys = ("peak", "params", "grads", "optimizer", "activations", "temporaries")
    record = {"step": step, "measured": {k: v for k, v in measured.items()}, "predicted": None, "ratio": None}
    if plan is not None:
        predicted = {
            "peak_bytes": plan.peak,
            "params_bytes": plan.params,
            "grads_bytes": plan.grads,
            "optimizer_bytes": plan.optimizer,
            "activations_bytes": plan.activations,
            "temporaries_bytes": sum(plan.temporaries.values()),
            "peak_event": plan.peak_event,
            "at_peak": dict(plan.events[plan.peak_event]),
        }
        record["predicted"] = predicted
        record["ratio"] = {
            k: predicted[f"{k}_bytes"] / measured[f"{k}_bytes"] if measured.get(f"{k}_bytes") else None
            for k in keys
        }
    return record


def measure_breakdown(model, optimizer, run_step: Callable[[], Any], step: int, fsdp: bool, device, plan):
    # -> (summary.json's memory_breakdown for this rank, what run_step returned).
    measured, result = measure_step(model, optimizer, run_step, fsdp=fsdp, device=device)
    return breakdown_record(measured, plan, step), result
