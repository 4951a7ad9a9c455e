# shardlab entry point: Hydra composes the config, then the launcher runs it.
#   python train.py model=debug attention=standard data=synthetic trainer.max_steps=20
#   torchrun --nproc_per_node=2 train.py strategy=fsdp
# Nothing heavy is imported before Hydra has parsed the command line: `--help`, a bad override and `-m`'s
# parent cost no torch import. The spawned workers of a launch import this file again (as __mp_main__).
import signal
import sys

import hydra
from hydra.core.plugins import Plugins
from omegaconf import DictConfig

from hydra_plugins.shardlab_ray.ray_launcher import register as register_ray_launcher
from hydra_plugins.shardlab_slurm.submitit_slurm import register as register_slurm_launcher
from launcher.compose import check_output_dirs, setup_hydra
from launcher.errors import one_line_errors
from launcher.prefork import warm_workers, will_launch

setup_hydra()
# hydra/launcher=submitit_slurm and hydra/launcher=ray: shardlab's subclasses of Hydra's submitit and Ray launchers,
# stored over the plugins' own entries once Hydra's plugin scan (which runs their modules, and so their stores) is done.
Plugins.instance()
register_slurm_launcher()
register_ray_launcher()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if will_launch(cfg, HydraConfig.get().mode == RunMode.MULTIRUN):
        warm_workers()  # the workers' imports start now, beside this process's own
    from launcher.main import main as run  # torch and the trainer: only once there is a run

    return run(cfg)


if __name__ == "__main__":
    # Ctrl-C stops a run (one line, exit 130) even where a script started it with SIGINT ignored, as `nohup` and a
    # shell's `cmd &` do: Python then never arms it, and the workers would inherit the ignore and train on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    check_output_dirs(sys.argv[1:])
    with one_line_errors():  # a bad override: one line and exit code 2, not Hydra's multi-line report
        main()
