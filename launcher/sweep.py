# End-of-sweep work for `python train.py -m ...`, as a Hydra callback (hydra.callbacks in conf/config.yaml).
# Each job returns its summary (or a failure) as a result, never an exception, so Hydra reaches
# on_multirun_end; there the report is written and a failed job makes the sweep exit non-zero.
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.outcomes: list[dict] = []

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        summary = job_return.return_value if job_return is not None else None
        if isinstance(summary, dict):
            self.outcomes.append(summary)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = [o for o in self.outcomes if o.get("status") != "ok"]
        print(
            f"shardlab: sweep {sweep_dir}: {len(self.outcomes) - len(failed)} ok, {len(failed)} failed",
            flush=True,
        )
        if failed:
            raise SystemExit(1)
