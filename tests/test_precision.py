# Every precision option trains (falling, finite loss) in one process and under FSDP on a real 2-process gloo
# group; bf16-mixed under FSDP holds fp32 shards and computes in bf16; fp16-mixed skips, counts and survives
# an inf gradient (on one rank only, under FSDP); fp8/int8 really swap the Linear layers; adamw8bit holds
# <= 0.3x AdamW's optimizer state. Impossible combinations fail up front.
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from models import build_model, build_model_args
from strategies import get_strategy
from strategies.common import clip_grad_norm
from tests.helpers import dist as dist_helpers
from tests.helpers.run import build_for, compose_config, read_rows, train_in_process
from trainer.checks import check_capability, validate
from trainer.data import build_data, micro_batches
from trainer.dist import init_distributed
from trainer.loop import train_step
from trainer.optim import build_optimizer
from trainer.precision import FULL_TRAINING, build_precision
from trainer.summary import RunSummary

# Real text, a high constant learning rate: four steps take the loss well down from ln(256).
LEARN = ("trainer.global_batch_size=4", "trainer.max_steps=4", "optim.lr=1e-2", "optim.warmup_steps=0")
FP8 = ("fp8", "fp8-rowwise")


def _text(corpus) -> tuple[str, ...]:
    return ("data=text", f"data.path={corpus}", "data.glob=*.py", *LEARN)


def _assert_learns(losses: list[float]) -> None:
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def _assert_reported(summary: RunSummary, name: str) -> None:
    applied = summary.precision_applied
    assert summary.precision == applied["name"] == name
    assert summary.emulated is (name in FP8)  # CPU: torchao emulates the fp8 matmuls
    assert (summary.skipped_steps is not None) == (name == "fp16-mixed")


# ---------------------------------------------------------------- one process
@pytest.mark.parametrize("name", FULL_TRAINING)  # nf4 (QLoRA): tests/test_finetune.py
def test_every_precision_trains_in_one_process(name, tmp_path, one_thread, text_corpus):
    summary = train_in_process(compose_config(*_text(text_corpus), f"precision={name}"), tmp_path)
    _assert_learns([r["loss"] for r in read_rows(tmp_path)])
    _assert_reported(summary, name)
    param_bytes = 2 if name == "bf16-true" else 4
    assert summary.state_bytes_per_rank["params_bytes"] == param_bytes * summary.n_params


def test_tf32_is_fp32_on_cpu(tmp_path, one_thread):
    runs = {p: train_in_process(compose_config(f"precision={p}"), tmp_path / p) for p in ("fp32", "tf32")}
    assert [r["loss"] for r in read_rows(tmp_path / "tf32")] == [
        r["loss"] for r in read_rows(tmp_path / "fp32")
    ]
    assert runs["tf32"].precision_applied["tf32"] is False  # nothing to apply off CUDA


@pytest.mark.parametrize(
    ("name", "cls"),
    [("fp8", "Float8Linear"), ("fp8-rowwise", "Float8Linear"), ("int8", "Int8MixedPrecisionTrainingLinear")],
)
def test_low_precision_linears_are_really_swapped(name, cls, one_thread):
    x = torch.randint(0, 256, (2, 32))
    outs = {}
    for p in ("bf16-mixed", name):
        precision = build_precision(p, torch.device("cpu"))
        model = build_model(build_model_args("debug"))
        model.init_weights(0)
        model = precision.prepare_model(model)
        with precision.context():
            outs[p] = model(x).float()
    kinds = {
        type(m).__name__
        for n, m in model.named_modules()
        if n.startswith("layers.") and "Linear" in type(m).__name__
    }
    assert kinds == {cls}  # every block Linear converted
    assert type(model.output) is torch.nn.Linear  # the head stays in high precision
    assert not torch.equal(outs[name], outs["bf16-mixed"])  # the low-precision matmuls really ran
    torch.testing.assert_close(outs[name], outs["bf16-mixed"], atol=0.1, rtol=0.1)


def test_bf16_mixed_computes_in_bf16_on_fp32_weights():
    precision = build_precision("bf16-mixed", torch.device("cpu"))
    model = precision.prepare_model(build_model(build_model_args("debug")))
    with precision.context():
        assert model(torch.zeros(1, 8, dtype=torch.long)).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_true_holds_everything_in_bf16():
    precision = build_precision("bf16-true", torch.device("cpu"))
    model = precision.prepare_model(build_model(build_model_args("debug")))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.float32  # buffers keep the precision they were computed in
    assert model(torch.zeros(1, 8, dtype=torch.long)).dtype == torch.bfloat16


def _inf_into(param: torch.nn.Parameter):
    # A real inf in one gradient element, written during backward (after autograd computed it).
    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad

    return param.register_hook(hook)


def test_fp16_mixed_skips_an_inf_step_and_recovers(one_thread):
    cfg = compose_config("precision=fp16-mixed", "trainer.global_batch_size=4")
    env = init_distributed("cpu")
    args = validate(cfg, 1, "cpu")
    data = build_data(cfg.data, cfg.trainer.seq_len, cfg.trainer.seed, args.vocab_size)

    def run(inject_at: int | None):
        model, precision = build_for(cfg, env, args, build_precision("fp16-mixed", env.device))
        opt = build_optimizer(model, cfg.optim, env.device)
        history = []
        for step in range(1, 6):
            before = [p.detach().clone() for p in model.parameters()]
            handle = _inf_into(model.layers[1].feed_forward.w2.weight) if step == inject_at else None
            batches = micro_batches(data, step, 0, 1, 4, 1)
            loss, _ = train_step(model, opt, batches, precision, env, get_strategy("single"), 1, 1.0)
            if handle is not None:
                handle.remove()
            changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
            history.append((float(loss), changed, precision.skipped_steps))
        return history

    clean, injected = run(None), run(inject_at=3)
    assert clean[2][1] and clean[2][2] == clean[1][2]  # without the inf, step 3 updates the weights
    loss, changed, skipped = injected[2]
    assert not changed and skipped == clean[1][2] + 1  # with it: skipped (weights untouched), counted once
    assert math.isfinite(loss)
    assert all(changed and math.isfinite(loss) for loss, changed, _ in injected[3:])  # and training goes on
    assert injected[-1][2] == clean[-1][2] + 1


def test_adamw8bit_holds_under_a_third_of_adamw_state(tmp_path, one_thread, text_corpus):
    # One run each on the same model; the first (compiling) step of adamw8bit takes ~20 s here.
    states, n_params = {}, set()
    for optim in ("adamw", "adamw8bit"):
        summary = train_in_process(compose_config(*_text(text_corpus), f"optim={optim}"), tmp_path / optim)
        states[optim] = summary.state_bytes_per_rank["optim_state_bytes"]
        n_params.add(summary.n_params)
        _assert_learns([r["loss"] for r in read_rows(tmp_path / optim)])
    assert states["adamw"] == pytest.approx(8 * n_params.pop(), rel=1e-3)  # two fp32 moments (+ step counts)
    assert states["adamw8bit"] <= 0.3 * states["adamw"], states


# ---------------------------------------------------------------- impossible combinations
def test_fp8_needs_compute_capability_8_9():
    precision = dataclasses.replace(build_precision("fp8", torch.device("cpu")), device_type="cuda")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer.*8\.0.*bf16-mixed"):
        check_capability(precision, (8, 0))
    check_capability(precision, (9, 0))


def test_fp8_and_int8_need_linear_layers():
    # Hugging Face GPT-2 is built of Conv1D: nothing to convert, and that is an error, not a silent no-op.
    for name in ("fp8", "int8"):
        with pytest.raises(ValueError, match=f"precision={name} converts nn.Linear.*Conv1D"):
            validate(compose_config("model=hf_gpt2_debug", f"precision={name}"), 1, "cpu")


def test_adamw8bit_refuses_a_torch_kernel_choice():
    with pytest.raises(ValueError, match="optim.implementation=fused.*adamw8bit"):
        validate(compose_config("optim=adamw8bit", "optim.implementation=fused"), 1, "cpu")


def test_unknown_precision_lists_the_valid_ones():
    with pytest.raises(ValueError, match="fp16-mixed, bf16-true, fp8, fp8-rowwise, int8"):
        build_precision("fp4", torch.device("cpu"))


# ---------------------------------------------------------------- 2-process gloo group
def _build(cfg, env):
    args = validate(cfg, env.world_size, "cpu")
    model, precision = build_for(cfg, env, args)
    data = build_data(cfg.data, cfg.trainer.seq_len, cfg.trainer.seed, args.vocab_size)
    return model, precision, data


def _dtypes(cfg, env, run_dir) -> dict:
    # What FSDP holds and what it computes in: read off the parameters and off a Linear inside a block.
    model, precision, data = _build(cfg, env)
    seen = {}

    def record(module, inputs):
        seen.update(weight=module.weight.dtype, weight_is_dtensor=isinstance(module.weight, DTensor))
        seen.update(input=inputs[0].dtype)

    model.layers[0].attention.wq.register_forward_pre_hook(record)
    x, y = next(micro_batches(data, 1, env.rank, env.world_size, 2, 1))
    with precision.context():
        logits = model(x)
    F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
    return {
        "params": {str(p.dtype) for p in model.parameters()},
        "local": {str(p.to_local().dtype) for p in model.parameters()},
        "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "grads": {str(p.grad.dtype) for p in model.parameters()},
        "compute": {k: str(v) for k, v in seen.items()},
        "logits": str(logits.dtype),
        "autocast": precision.autocast,
    }


def _inf_on_rank0(cfg, env, run_dir) -> list:
    return _fp16_steps(cfg, env, inject_at=3)


def _clean(cfg, env, run_dir) -> list:
    return _fp16_steps(cfg, env, inject_at=None)


def _fp16_steps(cfg, env, inject_at: int | None) -> list:
    # train_step's pieces, with an inf written into rank 0's gradient shard between backward and step:
    # ShardedGradScaler must all-reduce the inf check so that rank 1, whose shards are finite, skips too.
    model, precision, data = _build(cfg, env)
    opt = build_optimizer(model, cfg.optim, env.device)
    history = []
    for step in range(1, 6):
        before = [p.to_local().clone() for p in model.parameters()]
        x, y = next(micro_batches(data, step, env.rank, env.world_size, 2, 1))
        precision.backward(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()))
        if step == inject_at and env.rank == 0:
            next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("inf")
        precision.unscale_(opt)
        clip_grad_norm(model, 1.0)
        stepped = precision.step(opt)
        opt.zero_grad(set_to_none=True)
        changed = any(
            not torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters(), strict=True)
        )
        history.append((stepped, changed, precision.skipped_steps))
    return history


@pytest.fixture(scope="module")
def group(tmp_path_factory, text_corpus):
    jobs = [
        ("train", f"fsdp-{p}", _cfg(text_corpus, "strategy=fsdp", f"precision={p}")) for p in FULL_TRAINING
    ]
    jobs.append(("train", "ddp-fp16-mixed", _cfg(text_corpus, "strategy=ddp", "precision=fp16-mixed")))
    jobs.append(("dtypes", "dtypes", _cfg(text_corpus, "strategy=fsdp", "precision=bf16-mixed")))
    jobs.append(("inf", "inf", _cfg(text_corpus, "strategy=fsdp", "precision=fp16-mixed")))
    jobs.append(("clean", "clean", _cfg(text_corpus, "strategy=fsdp", "precision=fp16-mixed")))
    out = tmp_path_factory.mktemp("precision-group")
    kinds = {"train": dist_helpers._train, "dtypes": _dtypes, "inf": _inf_on_rank0, "clean": _clean}
    return dist_helpers.launch(dist_helpers.run_jobs, jobs, str(out), kinds), out


def _cfg(corpus, *overrides) -> dict:
    return OmegaConf.to_container(compose_config(*_text(corpus), *overrides), resolve=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_TRAINING)  # nf4 (QLoRA): tests/test_finetune.py
def test_every_precision_trains_under_fsdp(group, name):
    results, out = group
    summary = results[0][f"fsdp-{name}"]
    _assert_learns([r["loss"] for r in read_rows(out / f"fsdp-{name}")])
    _assert_reported(summary, name)
    assert summary.world_size == 2
    if name == "fp16-mixed":
        assert summary.precision_applied["loss_scaler"] == "ShardedGradScaler"


@pytest.mark.slow
def test_fp16_mixed_under_ddp_uses_the_plain_scaler(group):
    results, out = group
    _assert_learns([r["loss"] for r in read_rows(out / "ddp-fp16-mixed")])
    assert results[0]["ddp-fp16-mixed"].precision_applied["loss_scaler"] == "GradScaler"


@pytest.mark.slow
def test_bf16_mixed_under_fsdp_holds_fp32_shards_and_computes_in_bf16(group):
    for rank in (0, 1):
        d = group[0][rank]["dtypes"]
        assert d["all_dtensor"] and d["params"] == d["local"] == {"torch.float32"}  # sharded fp32 masters
        assert d["grads"] == {"torch.float32"}  # reduced in fp32 into the fp32 shards
        # Inside the block the gathered weight and the activations are bf16, with no autocast:
        # FSDP's MixedPrecisionPolicy did the cast.
        assert d["compute"] == {
            "weight": "torch.bfloat16",
            "weight_is_dtensor": "False",
            "input": "torch.bfloat16",
        }
        assert d["logits"] == "torch.bfloat16" and d["autocast"] is False


@pytest.mark.slow
def test_fp16_mixed_under_fsdp_skips_an_inf_on_one_rank_on_every_rank(group):
    histories = [group[0][rank]["inf"] for rank in (0, 1)]
    assert histories[0] == histories[1]  # the ranks agree on every step
    clean = group[0][0]["clean"]
    assert clean[2][0] and clean[2][1]  # without the inf, step 3 steps
    stepped, changed, skipped = histories[0][2]
    assert not stepped and not changed  # step 3 skipped on both ranks, the weights untouched
    assert skipped == histories[0][1][2] + 1
    assert all(s and c for s, c, _ in histories[0][3:])  # and it trains on
