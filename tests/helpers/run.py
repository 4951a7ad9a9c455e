# The real config composed by Hydra with tiny CPU overrides, an in-process run the way launcher/main.py's
# in-process branch runs it, and what a run leaves on disk.
import json
from pathlib import Path

from omegaconf import DictConfig

from launcher.compose import compose_config as compose
from trainer.summary import RunSummary

REPO = Path(__file__).resolve().parent.parent.parent

# Small enough that a step takes milliseconds on one CPU core; metrics.warmup_steps=1 so 2 steps suffice.
TINY = (
    "model=debug",
    "data=synthetic",
    "trainer.device=cpu",
    "trainer.max_steps=3",
    "trainer.global_batch_size=2",
    "trainer.seq_len=32",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "metrics.warmup_steps=1",
    "eval.batches=2",
)


def compose_config(*overrides: str, tiny: bool = True) -> DictConfig:
    # The config train.py would get (cfg.choices filled in as launcher.main.stamp_run does), without a run dir.
    return compose([*(TINY if tiny else ()), *overrides])


def build_for(cfg: DictConfig, env, args=None, precision=None, finetune_cfg=None):
    # -> (the model as train() builds it for cfg's strategy on this process group, the precision as it leaves it)
    from trainer.checks import model_args, run_dims
    from trainer.loop import build_parallel_model
    from trainer.precision import build_precision

    dims = run_dims(cfg.strategy, env.world_size, env.per_node, env.rank)
    precision = precision or build_precision(cfg.precision.name, env.device)
    return build_parallel_model(
        args or model_args(cfg),
        cfg.strategy,
        dims,
        env.device,
        cfg.trainer.seed,
        precision,
        finetune_cfg,
        cfg.model.get("init_from"),
    )


def train_in_process(cfg: DictConfig, run_dir: Path) -> RunSummary:
    # World size 1 in this process, as `python train.py` runs it: config.yaml, then train(), then summary.
    from launcher.worker import run_worker
    from trainer.checks import model_args
    from trainer.dist import init_run

    cfg.run_dir = str(run_dir)
    env = init_run(cfg)
    return run_worker(cfg, env, model_args(cfg))


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_summary(run_dir: Path) -> RunSummary | None:
    return RunSummary.read(run_dir)
