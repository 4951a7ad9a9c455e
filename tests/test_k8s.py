# `python -m commands.k8s`: a Kubeflow Trainer TrainJob manifest (trainer.kubeflow.org/v1alpha1, Trainer v2.2+). No
# Kubernetes here: the manifest is checked against the fields of the TrainJob API (its Go types, trainjob_types.go),
# and its command is run as the torch runtime runs it in each pod: two processes standing in for two pods, each with
# exactly the variables the runtime sets (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR,
# PET_MASTER_PORT) and nothing else of torch's, train as one world.
import socket
import sys
from pathlib import Path

import yaml

from commands.k8s import NAME, main
from tests.helpers.cli import cli_env, finish, start
from tests.helpers.run import REPO, TINY
from trainer.summary import RunSummary

# The TrainJob API's fields (v1alpha1 as of Trainer v2.2): what the manifest may use.
SPEC_FIELDS = {
    "runtimeRef",
    "initializer",
    "trainer",
    "runtimePatches",
    "suspend",
    "activeDeadlineSeconds",
    "managedBy",
}
TRAINER_FIELDS = {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"}


def manifest(capsys, *argv: str) -> tuple[str, dict]:
    main(list(argv))
    out = capsys.readouterr().out
    return out, yaml.safe_load(out)


def test_the_manifest_carries_the_trainjob_fields_the_config_needs(capsys):
    text, job = manifest(capsys, "strategy=fsdp", "launcher.nproc_per_node=8", "launcher.nnodes=2", "model=llama_1b",
                         "--image", "registry.example.com/shardlab:0.1", "--namespace", "ml", "--memory-gb", "200",
                         "--name", "llama-fsdp")  # fmt: skip
    assert text.startswith("# shardlab: python -m commands.k8s strategy=fsdp")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"] == {"name": "llama-fsdp", "namespace": "ml"} and NAME.match(
        job["metadata"]["name"]
    )
    spec = job["spec"]
    assert set(spec) <= SPEC_FIELDS and set(spec["trainer"]) <= TRAINER_FIELDS, spec
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}  # fmt: skip
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example.com/shardlab:0.1"
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "200Gi", "nvidia.com/gpu": "8"}
    assert trainer["resourcesPerNode"]["requests"] == trainer["resourcesPerNode"]["limits"]
    assert trainer["command"] == ["torchrun", "train.py", "strategy=fsdp", "launcher.nproc_per_node=8",
                                  "launcher.nnodes=2", "model=llama_1b", "hydra.run.dir=outputs/k8s/llama-fsdp"]  # fmt: skip
    # the run directory on a volume every pod mounts, patched into the runtime's `node` job and container
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "shardlab.dev/k8s"
    (job_patch,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job_patch["template"]["spec"]["template"]["spec"]
    assert job_patch["name"] == "node" and pod["containers"][0]["name"] == "node"
    assert pod["volumes"] == [{"name": "runs", "persistentVolumeClaim": {"claimName": "shardlab-runs"}}]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": "runs", "mountPath": "/workspace/shardlab/outputs"}
    ]
    # a CPU job asks for no GPU
    _, cpu = manifest(capsys, *TINY, "strategy=ddp", "launcher.nproc_per_node=2", "--image", "shardlab:dev")
    assert cpu["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"cpu": "2"}


def test_the_manifests_command_under_the_torch_runtimes_variables_trains_as_one_world(capsys, tmp_path):
    # Two pods of launcher.nnodes=2, one worker each: the manifest's command as the runtime runs it (torchrun reads
    # the PET_ variables as its arguments), from a working directory of the test's (train.py by its path here).
    _, job = manifest(
        capsys, *TINY, "strategy=ddp", "launcher.nnodes=2", "--image", "shardlab:dev", "--name", "two"
    )
    command = job["spec"]["trainer"]["command"]
    assert command[:2] == ["torchrun", "train.py"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", str(REPO / "train.py"), *command[2:]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pet = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
    }
    pods = [start(torchrun, tmp_path, env={**cli_env(), **pet, "PET_NODE_RANK": str(r)}) for r in (0, 1)]
    for pod in pods:
        code, out, err = finish(pod)
        assert code == 0, err[-3000:]
    run_dir = tmp_path / "outputs" / "k8s" / "two"
    summary = RunSummary.read(run_dir)
    assert summary.status == "ok" and summary.world_size == 2 and summary.strategy_applied["name"] == "ddp"
    assert [p.name for p in Path(tmp_path / "outputs").rglob("summary.json")] == ["summary.json"]
