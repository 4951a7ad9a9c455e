# summary.json as one typed record: what a run measured and how it ended, written by rank 0 (or by the rank whose
# failure came first) and read back by the console, the sweep report, tune, the SLURM plugin and the tests, all
# through RunSummary's fields. A successful run's file holds every field below that is not marked optional
# (null where not measured, e.g. mfu on a CPU); optional fields, and every field of a failed run, only when set.
# Unknown keys in a file (a newer or an older shardlab's) are ignored on reading.
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OK, FAILED, PREEMPTED = "ok", "failed", "preempted"


def optional():
    return field(default=None, metadata={"optional": True})


@dataclass
class RunSummary:
    status: str = OK  # ok | failed | preempted
    error: str | None = optional()  # failed: the run's first failure, in one line
    run_dir: str | None = None
    # steps and throughput: medians over the steps after warm-up (trainer/metrics.py)
    steps: int | None = None
    warmup_steps: int | None = None
    warmup_time_s: float | None = None
    tokens_per_s_median: float | None = None
    tokens_per_s_p10: float | None = None
    tokens_per_s_p90: float | None = None
    tokens_per_s_std: float | None = None
    tokens_per_s_mean: float | None = None  # total tokens / total time: what a wall clock sees
    tokens_per_s_per_device: float | None = None
    tflops_per_device: float | None = None
    mfu: float | None = None
    mfu_peak_tflops: float | None = None
    mfu_peak_source: str | None = None
    mfu_low_precision: float | None = None  # fp8 / int8: against their own tensor cores' peak
    mfu_low_precision_peak_tflops: float | None = None
    mfu_measured: float | None = (
        None  # against this machine's measured matmul peak (trainer/speed/calibration.py)
    )
    mfu_measured_peak_tflops: float | None = None
    mfu_measured_source: str | None = None  # calibration | probe
    step_time_s_median: float | None = None
    step_time_s_predicted: float | None = (
        optional()
    )  # the time model (trainer/speed/model.py), where calibrated
    tokens_per_s_predicted: float | None = optional()
    time_model: dict[str, float] | None = optional()  # its terms, seconds per step
    step_time_s_median_max: float | None = optional()  # over ranks
    step_time_s_median_min: float | None = optional()
    throughput_note: str | None = optional()  # why there is no throughput (every step was warm-up)
    # memory: CUDA's allocator peaks, or the process's peak RSS on a CPU (max and min over ranks)
    memory_kind: str | None = None  # cuda | cpu_peak_rss
    peak_rss_gb_max: float | None = optional()
    peak_rss_gb_min: float | None = optional()
    mem_allocated_peak_gb_max: float | None = optional()
    mem_allocated_peak_gb_min: float | None = optional()
    mem_reserved_peak_gb_max: float | None = optional()
    mem_reserved_peak_gb_min: float | None = optional()
    mem_peak_pct_max: float | None = optional()
    mem_peak_pct_min: float | None = optional()
    # losses and validation
    first_loss: float | None = None
    final_loss: float | None = None
    val_loss: float | None = optional()
    val_ppl: float | None = optional()
    val_step: int | None = optional()
    best_val_loss: float | None = optional()
    best_val_step: int | None = optional()
    evals: int | None = optional()
    eval_time_s: float | None = optional()
    # the run
    device_name: str | None = None
    world_size: int | None = None
    precision: str | None = None
    flops_per_token: float | None = None
    slurm_job_id: str | None = optional()
    ray_run_id: str | None = optional()  # hydra/launcher=ray: the job's Ray Train run
    choices: dict[str, str] | None = None  # the option of each config group
    micro_batch_size: int | None = None
    grad_accum_steps: int | None = None
    tokens_per_step: int | None = None
    n_params: int | None = None
    n_params_non_embedding: int | None = None
    n_params_trainable: int | None = None  # finetune=lora: the adapters' (the base is frozen)
    data: str | None = None
    resumed_from: str | None = None
    strategy_applied: dict[str, Any] | None = None
    # pipeline parallelism: the schedule, each pipeline rank's stages, the layers per stage, the micro-batches and
    # the bubble fraction (by the schedule's arithmetic, and measured on the CPU: 1 - compute time / step time),
    # each rank's peak memory
    pipeline: dict[str, Any] | None = optional()
    state_bytes_per_rank: dict[str, int] | None = None
    precision_applied: dict[str, Any] | None = None
    emulated: bool | None = None  # fp8 off CUDA: fp8's numerics, not its speed or memory
    skipped_steps: int | None = None  # fp16-mixed: steps skipped for inf/nan gradients
    nonfinite_skipped_steps: int | None = None  # trainer.on_nonfinite=skip
    memory_breakdown: dict[str, Any] | None = None  # metrics.memory_breakdown: MemTracker's step and the plan
    memory_predicted_peak_gb: float | None = None
    memory_predicted_peak_at: str | None = None
    memory_measured_peak_gb: float | None = optional()
    memory_peak_ratio: float | None = optional()
    # a run stopped by a preemption signal (launcher/main.py records it as failed until a requeue finishes it)
    signal: str | None = optional()
    step: int | None = optional()
    checkpoint: str | None = optional()
    reused_from: str | None = optional()  # sweep.resume=true: the earlier run whose result this is

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or (self.ok and not f.metadata.get("optional")):
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict) -> "RunSummary":
        # A file without a status is not a run's record of its own end: it reads as failed, never as a success.
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"status": FAILED, **{k: v for k, v in data.items() if k in names}})

    @classmethod
    def read(cls, path: Path) -> "RunSummary | None":
        # A run directory's summary.json (or the file itself); None where there is none. A file that is not
        # JSON raises (json.JSONDecodeError): the caller says what it means there.
        path = Path(path)
        path = path / "summary.json" if path.is_dir() else path
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def replace(self, **changes) -> "RunSummary":
        return dataclasses.replace(self, **changes)

    def write(self, run_dir: Path) -> None:
        from trainer.loggers import write_json_atomic  # omegaconf and tqdm: not for a reader of summaries

        write_json_atomic(Path(run_dir) / "summary.json", self.to_json())
