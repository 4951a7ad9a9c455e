# Where a job runs, in the spirit of Lightning's plugins/environments: one class per kind of place, each
# detecting itself from the variables that place sets, and each answering the same questions: the world
# (nodes, processes per node) and this process's ranks, the rendezvous, the run id every process of the job
# agrees on, the signals that mean preemption, and whether shardlab creates the worker processes itself.
#   Torchrun  the workers exist: torchrun, or the elastic agent shardlab starts (TORCHELASTIC_RUN_ID and RANK)
#   Slurm     inside a SLURM allocation (SLURM_JOB_ID): one task per node runs shardlab's launcher
#   Pods      plain variables, as Kubernetes operators set them for each pod (PyTorchJob, Kubeflow TrainJob;
#             SageMaker and other platforms alike): MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, and PET_NNODES /
#             PET_NODE_RANK / PET_NPROC_PER_NODE (PET_MASTER_ADDR / PET_MASTER_PORT). A pod is a node: its
#             launcher starts the pod's workers, unless LOCAL_RANK says each process is a worker already.
#   RayWorker a worker of a Ray Train run (hydra/launcher=ray): Ray Train made the process group and its ranks
#   RayJob    a job's Ray task (hydra/launcher=ray): its workers are a Ray Train run, not an elastic launch
#   Local     none of these: this machine, the config says the rest
# detect() is the one place that decides, in that order of precedence; current() is this process's answer.
# Under torchrun the scheduler around it (SLURM, pods) still says what preemption and a requeue are.
# Here and not in launcher/: the workers ask it too (preemption signals, requeued restarts, the job id in
# summary.json). Standard library only: train.py asks it before torch is imported.
import os
import signal
import subprocess
from datetime import datetime

PORT_BASE, PORT_SPAN = 20000, 20000  # a SLURM job's rendezvous port: the same on every node, from its id


# Set by hydra_plugins/shardlab_ray for a job's Ray task (the cluster's address), and by launcher/ray_train.py in each
# worker of its Ray Train run (the attempt: 0, then one more for each restart of the worker group), with the run's id.
RAY_JOB, RAY_ATTEMPT, RAY_RUN_ID = "SHARDLAB_RAY_ADDRESS", "SHARDLAB_RAY_ATTEMPT", "SHARDLAB_RAY_RUN_ID"


class Environment:
    name = "local"
    creates_processes = True  # False: the worker processes exist already
    workers_by = (
        "elastic"  # who starts them where creates_processes: torch's elastic agent, or "ray" (Ray Train)
    )
    job_field = "slurm_job_id"  # summary.json's name for job_id()
    preemption_signals: tuple[signal.Signals, ...] = ()  # caught by the workers: checkpoint, then stop

    def __init__(self, environ):
        self.env = dict(environ)

    @classmethod
    def detect(cls, environ) -> bool:
        return True

    def rank(self) -> int:
        # This process's rank before any process group exists (a worker's world rank, a node launcher's node
        # rank): only rank 0 writes the run's Hydra files.
        return 0

    def ranks(self) -> tuple[int, int, int, int]:
        # A worker's (rank, local rank, world size, local world size): one process of its own here.
        return 0, 0, 1, 1

    def run_path(self) -> str | None:
        # The run directory under outputs/ that every process of the job agrees on before any can talk; None:
        # a new one of this process's own (or the launcher names it: hydra.run.dir).
        return None

    def multi_node(self) -> bool:
        # Whether the job spans nodes, as far as the variables say before the config is read.
        return False

    def fill_launcher(self, launcher_cfg) -> None:
        # The launcher's world and rendezvous from what this place says; a variable that contradicts the config
        # is refused in one ValueError naming both.
        return None

    def job_id(self) -> str | None:
        # The scheduler's name for this job (summary.json: slurm_job_id).
        return None

    def restarted(self) -> bool:
        # A run of the job after a failure or a requeue: it resumes from its own newest checkpoint.
        return False


Local = Environment


class Slurm(Environment):
    name = "slurm"
    # SLURM's SIGTERM (preemption, `scontrol requeue`, scancel) and the pre-timeout signal submitit asks for
    # (SIGUSR2, `--signal=USR2@<hydra.launcher.signal_delay_s>`) reach every process of a job.
    preemption_signals = (signal.SIGUSR2, signal.SIGTERM)

    @classmethod
    def detect(cls, environ) -> bool:
        return "SLURM_JOB_ID" in environ

    def rank(self) -> int:
        return int(self.env.get("SLURM_PROCID") or 0)

    def tasks(self) -> int:
        # Tasks of this srun step (one per node); a batch script's own shell is one process on one node.
        return int(self.env.get("SLURM_STEP_NUM_TASKS") or 1)

    def multi_node(self) -> bool:
        return self.tasks() > 1

    def under_submitit(self) -> bool:
        return "SUBMITIT_FOLDER" in self.env  # set by submitit's job runner before it calls the job

    def first_node(self) -> str:
        nodes = self.env.get("SLURM_STEP_NODELIST") or self.env["SLURM_JOB_NODELIST"]
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]

    def fill_launcher(self, launcher_cfg) -> None:
        # Inside an srun step of several tasks: launcher.nnodes must be that count, and an empty
        # launcher.rdzv_endpoint / rdzv_id comes from the allocation (the first node; the job id).
        tasks = self.tasks()
        if tasks == 1 and launcher_cfg.nnodes == 1:
            return
        if launcher_cfg.nnodes != tasks:
            raise ValueError(
                f"launcher.nnodes={launcher_cfg.nnodes}, but this SLURM job step runs {tasks} task(s), one per node: "
                f"set launcher.nnodes={tasks}, or request launcher.nnodes nodes (hydra.launcher.nodes, sbatch --nodes) "
                "with one task each"
            )
        if not launcher_cfg.rdzv_endpoint:
            port = PORT_BASE + int(self.env["SLURM_JOB_ID"]) % PORT_SPAN
            launcher_cfg.rdzv_endpoint = f"{self.first_node()}:{port}"
        if not launcher_cfg.rdzv_id:
            launcher_cfg.rdzv_id = f"slurm-{self.env['SLURM_JOB_ID']}"

    def job_id(self) -> str:
        # As sacct and squeue name it: "<array job>_<task>" for a job of an array (a sweep), else the job id.
        array, task = self.env.get("SLURM_ARRAY_JOB_ID"), self.env.get("SLURM_ARRAY_TASK_ID")
        return f"{array}_{task}" if array and task else self.env["SLURM_JOB_ID"]

    def restarted(self) -> bool:
        # A requeued SLURM job runs again from its start; SLURM counts the restarts.
        return int(self.env.get("SLURM_RESTART_COUNT") or 0) > 0


class Pods(Environment):
    name = "pods"

    @classmethod
    def detect(cls, environ) -> bool:
        has_master = "MASTER_ADDR" in environ or "PET_MASTER_ADDR" in environ
        return has_master and ("WORLD_SIZE" in environ or "PET_NNODES" in environ)

    def __init__(self, environ):
        super().__init__(environ)
        # LOCAL_RANK: each process is a worker already (RANK and WORLD_SIZE count processes); else a pod is a
        # node whose launcher starts its workers (RANK and WORLD_SIZE count pods, where no PET_ variable does).
        self.creates_processes = "LOCAL_RANK" not in self.env

    def _int(self, key: str) -> int | None:
        value = self.env.get(key)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(
                f"{key}={value!r} is not a whole number: the pod's launcher set it wrongly"
            ) from None

    def rank(self) -> int:
        return self.node_rank() if self.creates_processes else self.ranks()[0]

    def ranks(self) -> tuple[int, int, int, int]:
        world = self._int("WORLD_SIZE") or 1
        return (
            self._int("RANK") or 0,
            self._int("LOCAL_RANK") or 0,
            world,
            self._int("LOCAL_WORLD_SIZE") or world,
        )

    def endpoint(self) -> str:
        addr = self.env.get("PET_MASTER_ADDR") or self.env["MASTER_ADDR"]
        port = self.env.get("PET_MASTER_PORT") or self.env.get("MASTER_PORT", "29500")
        return f"{addr}:{port}"

    def run_path(self) -> str:
        return f"multinode/pods-{self.endpoint().replace(':', '-')}"

    def nnodes(self) -> int:
        nnodes = self._int("PET_NNODES")
        return nnodes if nnodes is not None else (self._int("WORLD_SIZE") or 1)

    def node_rank(self) -> int:
        node, rank = self._int("PET_NODE_RANK"), self._int("RANK")
        if node is not None and rank is not None and node != rank:
            raise ValueError(
                f"PET_NODE_RANK={node} and RANK={rank} disagree on this pod's rank: set only one"
            )
        return node if node is not None else (rank or 0)

    def multi_node(self) -> bool:
        try:
            return self.nnodes() > 1
        except ValueError:
            return True  # the launcher says what is wrong with it

    def fill_launcher(self, launcher_cfg) -> None:
        # One pod, one node: launcher.nnodes and nproc_per_node from the pod's variables where the config leaves
        # them at their defaults (1), refused where it says otherwise; the rendezvous at the master pod.
        nnodes, node = self.nnodes(), self.node_rank()
        if not 0 <= node < nnodes:
            raise ValueError(
                f"this pod's rank {node} is outside the {nnodes} pod(s) of the job (PET_NNODES / WORLD_SIZE)"
            )
        given = str(launcher_cfg.nproc_per_node)
        nproc = self.env.get("PET_NPROC_PER_NODE")
        if nproc is not None and given not in ("1", nproc):
            raise ValueError(
                f"launcher.nproc_per_node={given}, but the pod's PET_NPROC_PER_NODE={nproc}: set "
                f"launcher.nproc_per_node={nproc}, or leave it unset"
            )
        if launcher_cfg.nnodes not in (1, nnodes):
            raise ValueError(
                f"launcher.nnodes={launcher_cfg.nnodes}, but the job has {nnodes} pod(s) (PET_NNODES / WORLD_SIZE): "
                f"set launcher.nnodes={nnodes}, or leave it unset"
            )
        per_node = nproc if nproc is not None else given
        world = self._int("WORLD_SIZE")
        if "PET_NNODES" in self.env and world is not None and per_node.isdigit():
            if world not in (nnodes, nnodes * int(per_node)):  # the pods, or (newer operators) the processes
                raise ValueError(
                    f"WORLD_SIZE={world} is neither the {nnodes} pod(s) of PET_NNODES nor their "
                    f"{nnodes * int(per_node)} processes: the pod's variables contradict each other"
                )
        if launcher_cfg.rdzv_endpoint and launcher_cfg.rdzv_endpoint != self.endpoint():
            raise ValueError(
                f"launcher.rdzv_endpoint={launcher_cfg.rdzv_endpoint}, but the pod's master is {self.endpoint()} "
                "(MASTER_ADDR:MASTER_PORT): leave launcher.rdzv_endpoint unset"
            )
        launcher_cfg.nproc_per_node, launcher_cfg.nnodes = per_node, nnodes
        if nnodes > 1:
            launcher_cfg.rdzv_endpoint = self.endpoint()
            launcher_cfg.rdzv_id = launcher_cfg.rdzv_id or self.run_path().rpartition("/")[2]


class Torchrun(Environment):
    name = "torchrun"
    creates_processes = False

    @classmethod
    def detect(cls, environ) -> bool:
        return "TORCHELASTIC_RUN_ID" in environ and "RANK" in environ

    def __init__(self, environ, scheduler: Environment):
        super().__init__(environ)
        self.scheduler = scheduler  # where the torchrun itself runs: what preemption and a requeue are
        self.preemption_signals = scheduler.preemption_signals

    def rank(self) -> int:
        return int(self.env["RANK"])

    def ranks(self) -> tuple[int, int, int, int]:
        world = int(self.env.get("WORLD_SIZE", "1"))
        local_world = int(self.env.get("LOCAL_WORLD_SIZE", world))
        return int(self.env["RANK"]), int(self.env.get("LOCAL_RANK", "0")), world, local_world

    def run_path(self) -> str:
        # Every rank of one torchrun job agrees on this before any communication exists. A multi-node job has a
        # shared rendezvous id; a single-node `torchrun` without --rdzv-id/--standalone reports "none", so it is
        # what its local workers share: the agent process (our parent) and its start.
        run_id = self.env.get("TORCHELASTIC_RUN_ID", "none")
        if run_id in ("", "none"):
            import psutil

            agent = psutil.Process(os.getppid())
            run_id = f"{datetime.fromtimestamp(agent.create_time()):%Y-%m-%d_%H-%M-%S}-{agent.pid}"
        return f"torchrun/{run_id}"

    def job_id(self) -> str | None:
        return self.scheduler.job_id()

    def restarted(self) -> bool:
        # The elastic agent (launcher.max_restarts, torchrun --max-restarts) counts the group's restarts.
        return int(self.env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 or self.scheduler.restarted()


class RayJob(Environment):
    # A job of a sweep on a Ray cluster, in the Ray task that hydra_plugins/shardlab_ray starts for it: the job's
    # launcher starts its workers as one Ray Train run (launcher/ray_train.py) on whichever nodes Ray places them.
    name = "ray"
    workers_by = "ray"
    job_field = "ray_run_id"

    @classmethod
    def detect(cls, environ) -> bool:
        return RAY_JOB in environ

    def job_id(self) -> str | None:
        # Known once the job's run has started (launcher/ray_train.py sets it): a failed row names its run.
        return os.environ.get(RAY_RUN_ID)

    def fill_launcher(self, launcher_cfg) -> None:
        if not str(launcher_cfg.nproc_per_node).isdigit():
            raise ValueError(
                f"launcher.nproc_per_node={launcher_cfg.nproc_per_node} counts the GPUs of the machine it runs on, "
                "but under hydra/launcher=ray the workers are placed by Ray: give workers per node as a number"
            )


class RayWorker(Environment):
    # A worker of a job's Ray Train run. Ray Train set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and
    # MASTER_ADDR/PORT and made the process group before the worker's function runs; that function runs in a thread
    # of Ray's worker process, not its main thread, so no signal handler can be set there, and none is needed: Ray
    # ends the workers itself.
    name = "ray"
    creates_processes = False
    job_field = "ray_run_id"

    @classmethod
    def detect(cls, environ) -> bool:
        return RAY_ATTEMPT in environ

    def rank(self) -> int:
        return int(self.env["RANK"])

    def ranks(self) -> tuple[int, int, int, int]:
        world = int(self.env["WORLD_SIZE"])
        local_world = int(self.env.get("LOCAL_WORLD_SIZE", world))
        return int(self.env["RANK"]), int(self.env.get("LOCAL_RANK", "0")), world, local_world

    def job_id(self) -> str | None:
        return self.env.get(RAY_RUN_ID)

    def restarted(self) -> bool:
        # Ray Train's FailureConfig(max_failures) started the worker group again after a worker died.
        return int(self.env[RAY_ATTEMPT]) > 0


SCHEDULERS = (
    RayWorker,
    RayJob,
    Slurm,
    Pods,
    Local,
)  # in order of precedence; Torchrun comes first, inside whichever holds


def detect(environ=None) -> Environment:
    environ = os.environ if environ is None else environ
    scheduler = next(cls(environ) for cls in SCHEDULERS if cls.detect(environ))
    return Torchrun(environ, scheduler) if Torchrun.detect(environ) else scheduler


_current: tuple[int, Environment] | None = None


def current() -> Environment:
    # This process's environment, detected once (per process: a forked worker detects its own).
    global _current
    if _current is None or _current[0] != os.getpid():
        _current = (os.getpid(), detect())
    return _current[1]


def redetect() -> Environment:
    # After this process's variables changed (a Ray Train worker learns what it is only once its function runs).
    global _current
    _current = None
    return current()
