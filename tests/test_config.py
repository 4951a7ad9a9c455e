# Every option of every config group composes, validates and, unless another test file trains it, trains in
# one CPU process; cross-field checks name the keys to change (their CLI path: tests/test_bad_input.py).
import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launcher.compose import config_dir
from models import build_model, flops_per_token, num_params, param_count
from tests.helpers.cli import finish, start
from tests.helpers.run import REPO, TINY, compose_config, read_rows, train_in_process
from trainer.checks import validate
from trainer.config import SCHEMAS

CONF = Path(config_dir())
# sweep/ holds -m sweep presets (tested with the sweeps); hydra/ would hold Hydra's own settings.
NOT_WALKED = {"sweep", "hydra"}
GROUPS = sorted(d.name for d in CONF.iterdir() if d.is_dir() and d.name not in NOT_WALKED)
# Trained in-process here; every other model preset is compose-only (counted, built on meta, never
# allocated), and the other strategies need a world of 2: the distributed tests train them.
TRAINED_MODELS = {"debug", "gpt2_debug"}
# Options another file trains already, so the walk only composes and validates them: every precision and
# optimizer (tests/test_precision.py), the HF presets (tests/test_hf.py), llama_20m (tests/test_memory.py,
# tests/test_checkpoint.py), data=text (tests/test_train.py), data=tokens (tests/test_prepare.py),
# checkpoint=periodic (tests/test_checkpoint.py), finetune=lora (tests/test_finetune.py).
TRAINED_ELSEWHERE = {"precision", "optim", ("data", "text"), ("data", "tokens"), ("checkpoint", "periodic"),
                     ("finetune", "lora")}  # fmt: skip
# Options that need one more value to compose: bare model=hf needs a local path or an inline model_type
# (LlamaConfig's defaults are Llama-2-7B shapes, so it stays compose-only).
NEEDS = {
    ("model", "hf"): ["+model.hf_config.model_type=llama"],
    # a 4-bit base needs adapters to train, and Linears of whole NF4 blocks (64 x 256 weights)
    ("precision", "nf4"): ["finetune=lora", "model.dim=256", "model.multiple_of=128"],
}
TRAINED_STRATEGIES = {"single"}
# Published sizes of the big presets, to 1%.
PUBLISHED_PARAMS = {"gpt2_124m": 124.4e6, "llama_160m": 162e6, "llama_1b": 1.236e9, "llama3_8b": 8.03e9}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


ALL_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


def test_the_walk_sees_every_schema_group():
    assert set(SCHEMAS) <= set(GROUPS)
    for group in SCHEMAS:
        assert options(group), f"conf/{group}/ has no options"
    assert TRAINED_MODELS | set(PUBLISHED_PARAMS) <= set(options("model"))
    assert TRAINED_STRATEGIES < set(options("strategy"))


@pytest.mark.usefixtures("one_thread", "wandb_offline")
@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option(group, option, tmp_path, request):
    # A group outside the main config's defaults (an experiment/ preset) is added with `+`.
    choice = f"{group}={option}" if group in SCHEMAS else f"+{group}={option}"
    needs = NEEDS.get((group, option), [])
    if (group, option) == ("data", "tokens"):  # a directory of commands.prepare's
        needs = [f"data.path={request.getfixturevalue('prepared_tokens')}"]
    cfg = compose_config(choice, *needs)
    if group in SCHEMAS:
        assert cfg.choices[group] == option
    elsewhere = group in TRAINED_ELSEWHERE or (group, option) in TRAINED_ELSEWHERE
    if elsewhere or cfg.choices["model"] not in TRAINED_MODELS or cfg.strategy.name not in TRAINED_STRATEGIES:
        check_compose_only(cfg)
        return

    run_dir = tmp_path / "run"
    summary = train_in_process(cfg, run_dir)
    assert summary.status == "ok"
    assert summary.steps == cfg.trainer.max_steps == 3
    assert summary.choices == cfg.choices
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["loss"] == summary.final_loss
    assert "${" not in (run_dir / "config.yaml").read_text()
    if cfg.logger.name == "tensorboard":
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if cfg.logger.name == "wandb":
        assert list((run_dir / "wandb").glob("offline-run-*"))


def check_compose_only(cfg):
    # Sized from the arguments alone: validation, parameter and FLOP counts allocate nothing.
    world = 1 if cfg.strategy.name in TRAINED_STRATEGIES else 2
    args = validate(cfg, world, "cpu")
    n, n_non_embedding = param_count(args), param_count(args, exclude_embedding=True)
    published = PUBLISHED_PARAMS.get(cfg.choices["model"])
    if published is not None:
        assert n == pytest.approx(published, rel=0.01)
    assert flops_per_token(args, cfg.trainer.seq_len) > 6 * n_non_embedding > 0
    with torch.device("meta"):  # shapes only, no storage
        assert num_params(build_model(args)) == n


def test_default_config_composes_to_the_documented_defaults():
    cfg = compose_config(tiny=False)
    assert cfg.choices == {
        "model": "debug",
        "attention": "sdpa",
        "precision": "fp32",
        "strategy": "single",
        "data": "text",
        "optim": "adamw",
        "logger": "none",
        "launcher": "local",
        "trainer": "default",
        "checkpoint": "none",
        "finetune": "full",
    }
    assert cfg.data.path == sysconfig.get_paths()["stdlib"]
    assert validate(cfg, 1, "cpu").vocab_size == 256
    assert "${" not in OmegaConf.to_yaml(cfg, resolve=True)
    # The learning rate: each model preset's own unless optim.lr is set.
    assert (cfg.optim.lr, compose_config("model=llama3_8b").optim.lr) == (2e-3, 3e-4)
    assert compose_config("model=llama3_8b", "optim.lr=1e-5", "optim=adamw8bit").optim.lr == 1e-5


def test_a_named_run_is_run_again_by_its_name_and_a_refused_run_leaves_nothing(tmp_path):
    # run.name=exp: outputs/exp, so the same command again resumes from its checkpoints (checkpoint.resume=auto);
    # a run refused before it starts leaves no directory (Hydra made one, with its .hydra/); a name that would
    # leave outputs/ is one line.
    def train_py(*overrides):  # from tmp_path, so that outputs/ is its own
        return finish(start([sys.executable, str(REPO / "train.py"), *TINY, *overrides], cwd=tmp_path))

    common = ("run.name=exp", "checkpoint=periodic", "checkpoint.every_n_steps=2")
    code, out, err = train_py(*common, "trainer.max_steps=2")
    assert code == 0, err[-3000:]
    assert f"shardlab: run directory {tmp_path / 'outputs' / 'exp'}" in out
    code, out, err = train_py(*common, "trainer.max_steps=4")
    assert (
        code == 0
        and f"resumed from {tmp_path / 'outputs' / 'exp' / 'checkpoints' / 'step_00000002'} at step 2" in out
    )
    code, _, err = train_py("model.n_heads=3")
    assert code == 2 and "model.n_heads (3)" in err
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["exp"]  # no empty dated directory
    code, _, err = train_py("run.name=../elsewhere")
    assert code == 2 and err.strip() == (
        "shardlab: error: run.name='../elsewhere' is not a name for a directory under outputs: use letters, digits, "
        "'_', '-' and '.', with '/' between parts (or hydra.run.dir=<any dir>)"
    )


# ---------------------------------------------------------------- validation, in-process
@pytest.mark.parametrize(
    ("overrides", "world", "names"),
    [
        (["model.n_heads=3"], 1, ["model.dim (128)", "model.n_heads (3)"]),
        (
            ["strategy.compile=true", "metrics.memory_breakdown=true"],
            1,
            ["metrics.memory_breakdown", "strategy.compile"],
        ),
        (["model.n_heads=0"], 1, ["model.n_heads"]),
        (["model.dim=132"], 1, ["model.dim", "model.n_heads", "even"]),  # head_dim 33: no RoPE pairs
        (["attention.n_kv_heads=3"], 1, ["model.n_heads (4)", "K/V head count (3", "attention.n_kv_heads"]),
        (["attention.n_kv_heads=0"], 1, ["attention.n_kv_heads must be at least 1, got 0"]),
        (["attention=gqa", "model.n_heads=2"], 1, ["model.n_heads (2)", "attention.kv_head_divisor (4)"]),
        (["model=gpt2_debug", "attention=mqa"], 1, ["model=gpt2_debug", "attention=standard"]),
        (["model.name=nope"], 1, ["model.name", "debug", "llama_20m"]),
        (["trainer.seq_len=1024"], 1, ["trainer.seq_len (1024)", "model.max_seq_len = 512"]),
        (
            ["trainer.global_batch_size=3", "strategy=ddp"],
            2,
            ["trainer.global_batch_size (3)", "world size (2)"],
        ),
        (["trainer.global_batch_size=8", "trainer.micro_batch_size=3"], 1, ["trainer.micro_batch_size (3)"]),
        (
            ["trainer.micro_batch_size=0"],
            1,
            ["trainer.micro_batch_size must be at least 1, got 0"],
        ),  # not "unset"
        # Every numeric field's range, stated in its schema (trainer/config.py), checked in one walk.
        (
            ["strategy=ddp", "strategy.bucket_cap_mb=-1"],
            2,
            ["strategy.bucket_cap_mb must be at least 1, got -1"],
        ),
        (["launcher.monitor_interval=0"], 1, ["launcher.monitor_interval must be positive, got 0.0"]),
        (["optim.beta2=1"], 1, ["optim.beta2 must be in [0, 1), got 1.0"]),
        (["model.norm_eps=0"], 1, ["model.norm_eps must be positive, got 0.0"]),
        (["metrics.warmup_steps=-1"], 1, ["metrics.warmup_steps"]),
        (["metrics.peak_tflops=0"], 1, ["metrics.peak_tflops"]),
        (["trainer.device=cuda"], 1, ["trainer.device=cuda", "no CUDA GPU"]),
        (["attention=gqa", "model.n_kv_heads=2"], 1, ["model.n_kv_heads=2", "attention.kv_head_divisor=4"]),
        (["strategy=single"], 2, ["strategy=single", "strategy=ddp"]),
        (
            ["strategy=hsdp", "strategy.shard_size=3", "trainer.global_batch_size=4"],
            4,
            ["strategy.shard_size"],
        ),
        (["strategy.activation_checkpointing=some"], 1, ["strategy.activation_checkpointing", "selective"]),
        (["strategy.ac_every=0"], 1, ["strategy.ac_every"]),
        (["trainer.device=gpu"], 1, ["trainer.device", "cuda"]),
        (["optim.implementation=fast"], 1, ["optim.implementation", "foreach"]),
        (["optim.lr=-1"], 1, ["optim.lr"]),
        (["optim.min_lr_ratio=2"], 1, ["optim.min_lr_ratio"]),
        (["logger.name=mlflow"], 1, ["logger.name", "tensorboard"]),
        (["data=text", "data.path=null"], 1, ["data.path"]),
        (["data=text", "data.glob=*.nothing"], 1, ["data.glob", "*.nothing"]),
        (["data=text", "data.max_bytes=16"], 1, ["data.max_bytes", "trainer.seq_len + 1 = 33"]),
        (["model.vocab_size=100", "data=text"], 1, ["model.vocab_size", "256"]),
    ],
)
def test_validation_names_the_keys(overrides, world, names):
    cfg = compose_config(*overrides)
    with pytest.raises(ValueError) as info:
        validate(cfg, world, "cpu")
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_a_cpu_run_on_a_gpu_host_is_checked_as_a_cpu_run():
    # attention=flash needs bf16 on CUDA, while the CPU kernel takes fp32: a machine that offers a GPU must
    # not fail a run that trainer.device=cpu keeps on the CPU.
    with pytest.raises(ValueError, match="attention=flash on CUDA"):
        validate(compose_config("attention=flash", "trainer.device=auto"), 1, "cuda", (9, 0))
    args = validate(compose_config("attention=flash", "trainer.device=cpu"), 1, "cuda", (9, 0))
    assert args.attention == "flash"
