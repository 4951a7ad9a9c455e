# Workers start from a forkserver rather than spawn: a fresh interpreter that imports torch and the trainer
# once, started as early as the parent knows it will launch workers (train.py, right after Hydra composed the
# config), so that those imports run beside the parent's own instead of after them; each worker is then a
# fork of the server and imports nothing. Spawned workers would each import all of it once the parent had
# finished: seconds before the first step, in every job of a sweep. The server only imports (no CUDA, no
# threads), so forking it is safe. Standard library only: train.py calls this before torch is imported.
import multiprocessing
import multiprocessing.forkserver

from launcher.slurm import ignored_in_children
from trainer.environments import current

# The entry script (which every worker would import again) and the trainer.
WORKER_MODULES = ("__main__", "launcher.worker")


def warm_workers(modules: tuple[str, ...] = WORKER_MODULES) -> None:
    # Idempotent: one server per process, for every launch it makes; the first call's modules are preloaded.
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(modules))
    # In a SLURM job the workers catch its signals themselves (launcher/slurm.py).
    with ignored_in_children():
        multiprocessing.forkserver.ensure_running()


def will_launch(cfg, multirun: bool) -> bool:
    # Whether this process will start workers (styles 2 and 3), as far as the config and the environment say
    # before torch loads: nproc_per_node=auto counts as more than one. Not where the workers exist (style 1).
    where = current()
    if not where.creates_processes or where.workers_by != "elastic":
        return False
    launcher = cfg.launcher
    return multirun or str(launcher.nproc_per_node) != "1" or launcher.nnodes > 1 or where.multi_node()
