# The memory planner and its measurement: spec.py (what a run's config says), activations.py (what autograd
# saves), plan.py (model state and the step's peak moments), suggest.py (the cheapest changes that fit),
# measure.py (one step measured by PyTorch's MemTracker; imported only when a run asks for it).
from trainer.memory.plan import MemoryPlan, memory_summary, model_state, plan_for_run, plan_memory
from trainer.memory.spec import GB, PlanSpec, precision_bytes, spec_from_config

__all__ = [
    "GB",
    "MemoryPlan",
    "PlanSpec",
    "memory_summary",
    "model_state",
    "plan_for_run",
    "plan_memory",
    "precision_bytes",
    "spec_from_config",
]
