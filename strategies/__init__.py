# How a model is spread over ranks. One registry: each strategy is an object of its own file that holds all of
# its facts (strategies/base.py says which); a new strategy is its file, its conf/strategy YAML, a line here
# and its tests. Torch-free at import (the schemas are registered with Hydra before the command line is
# parsed); FSDP2 and DTensor load only in a run that uses them.
from strategies.base import Strategy, StrategyConfig, checkpointed, one_of
from strategies.ddp import DDP
from strategies.fsdp import FSDP
from strategies.hsdp import HSDP
from strategies.parallel_dims import ParallelDims
from strategies.pp import PP
from strategies.single import Single
from strategies.tp import FSDPTP, HSDPTP, TP

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (Single(), DDP(), FSDP(), HSDP(), TP(), FSDPTP(), HSDPTP(), PP())
}


def get_strategy(name: str) -> Strategy:
    one_of("strategy", name, STRATEGIES)
    return STRATEGIES[name]


def schemas() -> dict[str, type]:
    # conf/strategy/<option>.yaml extends /schema/strategy_<name> (single: /schema/strategy, the base).
    return {f"strategy_{name}": s.schema for name, s in STRATEGIES.items() if s.schema is not StrategyConfig}


def check_config(cfg, dims: ParallelDims, micro: int, accum: int, args=None, plan=None) -> None:
    # The strategy sub-config against the layout it will run in (and the model: its arguments and parallel plan,
    # where known), before any worker starts.
    checkpointed(cfg.activation_checkpointing, cfg.ac_every, 0)  # the mode's name
    get_strategy(cfg.name).check(cfg, dims, micro, accum, args, plan)


__all__ = [
    "STRATEGIES",
    "ParallelDims",
    "Strategy",
    "StrategyConfig",
    "check_config",
    "get_strategy",
    "schemas",
]
