# The GPU and cluster paths, wherever a CPU can hold them: a pure function of the config or of a device name,
# a composed config, a real one-process group, the parsed Dockerfile and Makefile. What needs a GPU to run
# (nccl itself, the CUDA allocator's counters, fp8 matmuls) is measured by the GPU benchmarks instead.
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher import worker
from launcher.worker import run_worker
from tests.helpers.run import REPO, compose_config, read_summary
from trainer import gpus
from trainer.checks import model_args, validate
from trainer.dist import DistEnv, backend_for, close_distributed, init_run
from trainer.peaks import lookup_peak_tflops


# ---------------------------------------------------------------- process groups
def test_cpu_offload_gets_a_backend_for_cpu_tensors_too():
    # Under fsdp_offload the sharded gradients are CPU tensors: their norm all-reduce needs gloo beside nccl.
    offload = compose_config("strategy=fsdp_offload")
    assert backend_for("cuda", offload.strategy.cpu_offload) == "cuda:nccl,cpu:gloo"
    assert backend_for("cuda", compose_config("strategy=fsdp").strategy.get("cpu_offload", False)) == "nccl"
    assert backend_for("cpu", True) == backend_for("cpu", False) == "gloo"


def test_the_collective_timeout_is_a_setting():
    cfg = compose_config("strategy=ddp", "launcher.timeout_s=7")
    env = init_run(cfg)  # one process, an in-process store: a real gloo group
    try:
        assert dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds() == 7
    finally:
        close_distributed(env)
    with pytest.raises(ValueError, match="launcher.timeout_s must be positive"):
        validate(compose_config("launcher.timeout_s=0"), 1, "cpu")


def test_the_rank_whose_failure_came_first_writes_the_summary(tmp_path, one_thread, monkeypatch):
    # Under nccl rank 0 may sit in a CUDA sync where no signal handler runs: the rank that had the run's first
    # failure records it itself. Here rank 1 of a run whose other ranks never get to say anything.
    cfg = compose_config("data=text", f"data.path={tmp_path / 'not-on-this-node'}")
    cfg.run_dir = str(tmp_path / "run")
    monkeypatch.setattr(worker, "FAILURE_GRACE_S", 0.0)  # no other rank here for it to wait for
    with pytest.raises(ValueError, match="data.path"):
        run_worker(
            cfg, DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu")), model_args(cfg)
        )
    summary = read_summary(tmp_path / "run")
    assert summary.status == "failed" and summary.error.startswith("rank 1 failed: ValueError: data.path")


# ---------------------------------------------------------------- the parent never touches CUDA
def test_validation_creates_no_cuda_context():
    # The launcher's parent validates with the GPUs' capability from NVML (none on this machine).
    assert gpus.capability() is None and gpus.visible_gpus() == []
    validate(compose_config("precision=bf16-mixed", "attention=flash", "trainer.device=auto"), 1, "cpu")
    assert not torch.cuda.is_initialized()


def test_cuda_visible_devices_selects_nvml_devices():
    a = gpus.GPU(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", (9, 0), 80 * 10**9)
    b = gpus.GPU(1, "GPU-bbbb", "NVIDIA A100-SXM4-80GB", (8, 0), 80 * 10**9)
    assert gpus.visible([a, b], None) == [a, b]
    assert gpus.visible([a, b], "1") == [b]
    assert gpus.visible([a, b], "1,0") == [b, a]
    assert gpus.visible([a, b], "GPU-bb") == [b]
    assert gpus.visible([a, b], "") == []
    assert gpus.visible([a, b], "0,7,1") == [a]  # CUDA stops at the first entry that names no device


def test_fp8_below_8_9_and_fp8_token_counts_fail_before_launch():
    fp8 = ("precision=fp8", "trainer.device=auto")
    with pytest.raises(ValueError, match=r"precision=fp8 needs fp8 tensor cores.*this GPU is 8\.0"):
        validate(compose_config(*fp8), 1, "cuda", (8, 0))
    # torch._scaled_mm's inner dimensions must be multiples of 16; the weight gradient's is micro x seq_len.
    odd = (*fp8, "trainer.seq_len=20", "trainer.global_batch_size=2", "trainer.micro_batch_size=1")
    with pytest.raises(ValueError, match=r"micro_batch_size x trainer.seq_len divisible by 16.*1 x 20 = 20"):
        validate(compose_config(*odd), 1, "cuda", (9, 0))
    validate(compose_config(*odd), 1, "cpu")  # emulated on the CPU: no such limit
    validate(compose_config(*fp8, "trainer.seq_len=32"), 1, "cuda", (9, 0))


# ---------------------------------------------------------------- MFU on GPUs
def test_a_mig_slice_has_no_peak_of_its_own():
    assert lookup_peak_tflops("NVIDIA H200 MIG 3g.71gb", "bf16-mixed") is None
    assert lookup_peak_tflops("NVIDIA H200", "bf16-mixed") == 989.4


def test_fp8_and_int8_mfu_is_against_the_bf16_peak_with_their_own_beside_it():
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == lookup_peak_tflops(
        "NVIDIA H100 80GB HBM3", "bf16-mixed"
    )
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "fp8", low_precision=True) == 1978.9
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "int8", low_precision=True) == 624.0
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "fp8", low_precision=True) is None  # no fp8 on Ampere
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16-mixed", low_precision=True) is None


# ---------------------------------------------------------------- the image and the install
def test_the_dockerfile_installs_one_pinned_torch_and_a_compiler():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("python:3.11"), base  # no torch of its own: the pinned one is the only copy
    assert re.search(r"apt-get install .*\bgcc\b", text)  # Triton compiles a launcher per kernel
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps and "['project']['dependencies']" in text  # the image installs these
    assert "--ipc=host" in text and "docker run --gpus all --ipc=host" in (REPO / "README.md").read_text()
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run(
        [str(hadolint), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_another_torch_spec_installs_torch_again(tmp_path):
    # make install remembers the torch spec it installed: the same one does nothing, another reinstalls
    # (over a CPU wheel that would satisfy torch==2.13.0 of a CUDA index too) and says which torch it has.
    venv = tmp_path / "venv"
    venv.mkdir()
    default = "torch==2.13.0"
    stamp = subprocess.run(
        ["make", "-s", "-C", str(REPO), "--eval", "print-stamp: ; @echo $(TORCH_STAMP)", "print-stamp",
         f"VENV={venv}"], capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(stamp).touch()
    (venv / ".installed").touch()  # newer than pyproject.toml and the torch stamp

    def dry_run(*spec) -> str:
        cmd = ["make", "-n", "-C", str(REPO), "install", f"VENV={venv}", *spec]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    assert "pip install" not in dry_run()
    assert "pip install" not in dry_run(f"TORCH_SPEC={default}")
    cuda = dry_run("TORCH_SPEC=torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130")
    assert "--force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130" in cuda
    assert "shardlab: torch" in cuda


def test_transformers_and_torchao_import_without_failed_extension_loads():
    # torchao's wheel carries CUDA-only extensions that a CPU torch cannot load: the install removes them there
    # (Makefile, TORCHAO_CPU), so importing transformers (which imports torchao) says nothing about them.
    proc = subprocess.run(
        [sys.executable, "-c", "import transformers, torchao; transformers.AutoModelForCausalLM"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    if torch.version.cuda is None:
        assert "Failed to load" not in proc.stderr, proc.stderr
