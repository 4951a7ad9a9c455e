# Shared by the config, data and train tests: the real config composed by Hydra with tiny CPU overrides,
# an in-process run the way launcher/main.py's run_worker does it, and the real CLI in a subprocess.
import csv
import json
import os
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from launcher.compose import config_dir, setup_hydra
from trainer.config import SCHEMAS

REPO = Path(__file__).resolve().parent.parent

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
)

# Inherited variables that would make a child process think torchrun or a debugger started it.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
_LAUNCH_VARS += ("MASTER_ADDR", "MASTER_PORT", "HYDRA_FULL_ERROR")


def compose_config(*overrides: str, tiny: bool = True) -> DictConfig:
    # The config train.py would get, with cfg.choices filled in as launcher.main.stamp_run does.
    setup_hydra()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*(TINY if tiny else ()), *overrides], return_hydra_config=True)
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]  # its run dir resolver must not run: these runs say where they write
    cfg.choices = {g: choices[g] for g in SCHEMAS if g in choices}
    return cfg


def train_in_process(cfg: DictConfig, run_dir: Path) -> dict:
    # World size 1 in this process, as `python train.py` runs it: config.yaml, then train(), then summary.
    from launcher.main import run_worker
    from trainer.dist import init_distributed

    cfg.run_dir = str(run_dir)
    env = init_distributed(cfg.trainer.device, cfg.strategy.name != "single")
    return run_worker(cfg, env)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    # One thread per process: this machine has 2 cores shared with other jobs, where OpenMP threads
    # spinning against each other make a step 10-100x slower.
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return env


def cli_args(tmp_path: Path, *overrides: str, tiny: bool = True, run_dir: str | None = None) -> list[str]:
    run_dir = run_dir or str(tmp_path / "run")
    return [sys.executable, "train.py", *(TINY if tiny else ()), f"hydra.run.dir={run_dir}", *overrides]


def start_cli(tmp_path: Path, *overrides: str, tiny: bool = True, run_dir: str | None = None):
    return subprocess.Popen(
        cli_args(tmp_path, *overrides, tiny=tiny, run_dir=run_dir),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_cli(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"train.py ran past {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def run_cli(tmp_path: Path, *overrides: str, tiny: bool = True, run_dir: str | None = None, timeout=180):
    # `python train.py <TINY> hydra.run.dir=<tmp>/run <overrides>` from the repo root.
    return finish_cli(start_cli(tmp_path, *overrides, tiny=tiny, run_dir=run_dir), timeout)


@pytest.fixture
def one_thread():
    # In-process runs: the same reason as OMP_NUM_THREADS=1 in cli_env.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    # wandb must never reach the network or write outside tmp_path.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    # A few real text files (copies, so nothing edits them mid-test), 200 KB: quick to read, enough to learn.
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("os.py", "functools.py", "textwrap.py"):
        (root / name).write_bytes((stdlib / name).read_bytes())
    (root / "notes.txt").write_text("not python " * 50)
    return root


# Sweep reports (tests/test_sweep.py, tests/test_sweep_parts.py).
def csv_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def md_rows(sweep_dir: Path) -> list[str]:
    lines = (sweep_dir / "report.md").read_text().splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith("| #")]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (height, width)


# Native Llama parameter names -> transformers' LlamaForCausalLM's (tests/test_models.py, tests/test_hf.py).
_HF_LLAMA_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def as_hf_llama(ours):
    # A native Llama as transformers' LlamaForCausalLM: the same shapes and the same tensors, renamed.
    import transformers

    args = ours.args
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    state = {"model.embed_tokens.weight": ours.tok_embeddings.weight, "model.norm.weight": ours.norm.weight}
    state["lm_head.weight"] = ours.output.weight
    for i, layer in enumerate(ours.layers):
        for name, p in layer.named_parameters():
            module, _, leaf = name.rpartition(".")
            state[f"model.layers.{i}.{_HF_LLAMA_NAMES[module]}.{leaf}"] = p
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(state, strict=True)
    return hf
