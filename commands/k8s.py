# A Kubeflow Trainer TrainJob manifest for a config, for users who submit to Kubernetes:
#   python -m commands.k8s model=llama_1b strategy=fsdp launcher.nproc_per_node=8 launcher.nnodes=2 \
#       --image registry.example.com/shardlab:0.1 --namespace ml > train.yaml && kubectl apply -f train.yaml
# The job runs on Kubeflow Trainer's `torch-distributed` runtime (trainer.kubeflow.org/v1alpha1, Trainer v2.2 and
# later): one pod per node (numNodes = launcher.nnodes), each `torchrun train.py <overrides>`. The runtime sets
# PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in every pod and runs the
# command as given, so the command calls torchrun, which reads those variables as its arguments; inside, shardlab
# is under torchrun (trainer/environments.py) like any torchrun job. The run directory is on a volume every pod
# mounts (a ReadWriteMany PersistentVolumeClaim, --pvc) and named after the job, so a restarted pod finds its
# checkpoints and rank 0's summary.json is where the user looks. Resources per node follow the config as
# commands.sbatch's do: GPUs = launcher.nproc_per_node (none for trainer.device=cpu), a CPU per worker unless told.
# Not run against a live cluster here: the manifest follows the TrainJob API (its Go types, trainjob_types.go), and
# tests/test_k8s.py checks those fields and runs the manifest's command under the variables the runtime sets.
import argparse
import re
import shlex
import sys

import yaml

from commands.cli import Parser
from launcher.compose import compose_config
from launcher.errors import command_errors
from launcher.slurm import per_node, slurm_gpus
from trainer.checks import validate

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs for PyTorch
CONTAINER = "node"  # the torch runtime's replicated job and its container, which runtimePatches name
WORKDIR = "/workspace/shardlab"  # the Dockerfile's
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035 label: TrainJob names, and namespaces


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = Parser(
        prog="python -m commands.k8s",
        description="print a Kubeflow Trainer TrainJob manifest for a config: launcher.nnodes pods, each torchrun "
        "train.py with the given overrides; resources follow launcher.nnodes and launcher.nproc_per_node",
    )
    ap.add_argument(
        "--image",
        required=True,
        help="the image built from this repo's Dockerfile, where the cluster pulls it",
    )
    ap.add_argument(
        "--name", default="shardlab", help="the TrainJob's name, and its run directory's (default shardlab)"
    )
    ap.add_argument("--namespace", help="the TrainJob's namespace (default: kubectl's current one)")
    ap.add_argument(
        "--gpus-per-node", type=int, help="GPUs per pod (default: launcher.nproc_per_node; 0 on CPU)"
    )
    ap.add_argument("--cpus-per-node", type=int, help="CPUs per pod (default: one per worker)")
    ap.add_argument("--memory-gb", type=int, help="memory per pod, GiB (default: none asked)")
    ap.add_argument(
        "--pvc", default="shardlab-runs", help="a ReadWriteMany PersistentVolumeClaim for the runs"
    )
    ap.add_argument("--runtime", default=RUNTIME, help=f"the ClusterTrainingRuntime (default {RUNTIME})")
    ap.add_argument("--debug", action="store_true", help="a traceback instead of one line on bad input")
    return ap.parse_with_overrides(argv)


def check_options(opts: argparse.Namespace) -> None:
    for flag, value in (("--name", opts.name), ("--namespace", opts.namespace)):
        if value is not None and not NAME.match(value):
            raise ValueError(
                f"{flag}={value!r} is not a Kubernetes name: lower-case letters, digits and '-', starting with a "
                "letter, at most 63 characters"
            )
    for flag, value in (("--cpus-per-node", opts.cpus_per_node), ("--memory-gb", opts.memory_gb)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}: leave it out for the default")
    if opts.gpus_per_node is not None and opts.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be 0 or more, got {opts.gpus_per_node}")
    if not opts.image.strip() or any(c.isspace() for c in opts.image):
        raise ValueError(
            f"--image={opts.image!r} is not an image reference: e.g. registry.example.com/shardlab:0.1"
        )


def command(overrides: list[str], name: str) -> list[str]:
    # torchrun takes nnodes, nproc_per_node, node_rank and the master from the runtime's PET_ variables.
    return ["torchrun", "train.py", *overrides, f"hydra.run.dir=outputs/k8s/{name}"]


def manifest(opts: argparse.Namespace, overrides: list[str], cfg) -> dict:
    nproc = per_node(cfg.launcher.nproc_per_node) or 1
    gpus = (
        opts.gpus_per_node if opts.gpus_per_node is not None else (slurm_gpus(nproc, cfg.trainer.device) or 0)
    )
    if gpus and gpus < nproc:
        raise ValueError(
            f"--gpus-per-node={gpus}, but launcher.nproc_per_node={nproc} starts a worker per GPU: ask for {nproc}"
        )
    limits = {"cpu": str(opts.cpus_per_node or nproc)}
    if opts.memory_gb:
        limits["memory"] = f"{opts.memory_gb}Gi"
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    metadata = {"name": opts.name, **({"namespace": opts.namespace} if opts.namespace else {})}
    volume = {"name": "runs", "persistentVolumeClaim": {"claimName": opts.pvc}}
    mount = {"name": "runs", "mountPath": f"{WORKDIR}/outputs"}  # the run directories, under outputs/
    pod_spec = {"volumes": [volume], "containers": [{"name": CONTAINER, "volumeMounts": [mount]}]}
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {
                "name": opts.runtime,
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
            },
            "trainer": {
                "image": opts.image,
                "command": command(overrides, opts.name),
                "numNodes": int(cfg.launcher.nnodes),
                "numProcPerNode": nproc,
                "resourcesPerNode": {"limits": limits, "requests": dict(limits)},
            },
            # Trainer v2.2's way to add a volume to the runtime's pods (v2.1 called it podTemplateOverrides).
            "runtimePatches": [
                {
                    "manager": "shardlab.dev/k8s",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {
                                        "name": CONTAINER,
                                        "template": {"spec": {"template": {"spec": pod_spec}}},
                                    }
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, overrides = parse(argv)
    with command_errors(opts.debug):
        check_options(opts)
        cfg = compose_config(overrides)
        nproc = per_node(cfg.launcher.nproc_per_node)
        if nproc is None:
            raise ValueError(
                "launcher.nproc_per_node=auto: give the workers per pod as a number (the manifest asks for them)"
            )
        validate(
            cfg,
            nproc * cfg.launcher.nnodes,
            "cpu" if cfg.trainer.device == "cpu" else "cuda",
            None,
            per_node=nproc,
        )
        out = manifest(opts, overrides, cfg)
    print(f"# shardlab: python -m commands.k8s {shlex.join(argv)}")
    print(yaml.safe_dump(out, sort_keys=False), end="")


if __name__ == "__main__":
    main()
