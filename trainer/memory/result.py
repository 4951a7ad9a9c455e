# What the memory planner returns (MemoryPlan), and the optimizer step's scratch that every plan counts.
from dataclasses import dataclass, field

from trainer.memory.activations import elements, widths
from trainer.memory.spec import PlanSpec, precision_bytes
from trainer.optim import implementation


@dataclass
class MemoryPlan:
    spec: PlanSpec
    n_params: int
    params: float  # bytes on this rank's device
    grads: float
    optimizer: float
    buffers: float
    host: float  # model state offloaded to host memory (cpu_offload), not on the device
    layer_terms: dict[str, float]  # one block without checkpointing
    layer_bytes: list[float]  # each block as configured (a checkpointed block keeps its input only)
    head_terms: dict[str, float]
    events: dict[str, dict[str, float]] = field(default_factory=dict)  # moment -> bytes by category
    peak_event: str = ""
    # pipeline parallelism: every pipeline rank's peak, and which rank this plan is (the worst)
    stage_peaks: list[float] | None = None
    stage: int | None = None

    @property
    def activations(self) -> float:
        return sum(self.layer_bytes) + sum(self.head_terms.values())

    @property
    def peak(self) -> float:
        return sum(self.events[self.peak_event].values())

    @property
    def temporaries(self) -> dict[str, float]:
        # What the peak moment holds besides model state and saved activations.
        state = ("params", "buffers", "grads", "optimizer", "activations")
        return {k: v for k, v in self.events[self.peak_event].items() if k not in state and v}


def optimizer_scratch(spec: PlanSpec, shapes: list[tuple]) -> float:
    # foreach AdamW (the CPU default) allocates sqrt(exp_avg_sq) for a whole parameter group at once, the
    # matrices (weight-decayed) being the larger group; for_loop one parameter's worth at a time; fused
    # AdamW (the CUDA default) and torchao's compiled AdamW8bit step nothing measurable. shapes: the rank's
    # parameters, each sharded over spec.shard.
    impl = implementation(spec.optim_impl, spec.device)
    if spec.optim != "adamw" or impl == "fused":
        return 0.0
    width, local = precision_bytes(spec.precision).weights, [elements(s, spec.shard) for s in shapes]
    if impl == "foreach":
        return width * sum(n for n, s in zip(local, shapes, strict=True) if len(s) >= 2)
    return 2 * width * max(local)


def reduce_scatter_bytes(spec: PlanSpec, numel: int) -> float:
    # FSDP2's post-backward (foreach_reduce) for numel gathered elements: their unsharded gradients (gathered
    # dtype) are copied into the fp32 reduce-scatter input (on CPU torch._chunk_cat builds the fp32
    # concatenation in a temporary first; CUDA's kernel writes in place), then freed before the output
    # (one shard) is allocated.
    _, c, _ = widths(spec)
    return max(c + 4 + (4 if spec.device == "cpu" else 0), 4 + 4 / spec.shard) * numel
