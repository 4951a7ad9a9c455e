# Hugging Face transformers models (model=hf*): given the native Llama's weights through a local checkpoint
# directory, transformers' LlamaForCausalLM gives the same logits and trains along the same trajectory (the
# HF-vs-native logits parity of test_models.py, taken end to end through model=hf); the presets need no files
# and train under single and fsdp to the same losses; attention options map onto attn_implementation
# and num_key_value_heads; FSDP wraps the decoder-layer class and AC uses the model's own hook; FLOPs and
# parameter counts follow the native formula; nothing is ever downloaded.
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule
from torch.utils.flop_counter import FlopCounterMode

from models import build_model, build_model_args, flops_per_token, num_params, param_count
from strategies.common import blocks
from strategies.fsdp import materialize
from tests.helpers import dist as dist_helpers
from tests.helpers.hf import as_hf_llama
from tests.helpers.run import build_for, compose_config, read_rows, train_in_process
from trainer.checks import validate

transformers = pytest.importorskip("transformers")

# The native debug Llama with grouped K/V heads and Llama-3's RoPE base, so the parity covers both.
NATIVE = ("model=debug", "model.n_kv_heads=2", "model.rope_theta=500000.0")
LEARN = ("trainer.global_batch_size=4", "trainer.max_steps=4", "optim.lr=1e-2", "optim.warmup_steps=0")
SEED = 1234  # trainer.seed's default: the native run initialises from it, the checkpoint is saved from it


def _text(corpus) -> tuple[str, ...]:
    return ("data=text", f"data.path={corpus}", "data.glob=*.py", *LEARN)


def save_native_as_hf(directory) -> None:
    # The native model's seeded init, written as a transformers checkpoint (config.json + model.safetensors).
    args = build_model_args("debug", {"n_kv_heads": 2, "rope_theta": 500000.0})
    ours = build_model(args)
    ours.init_weights(SEED)
    hf = as_hf_llama(ours)
    hf.save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf-llama")
    save_native_as_hf(directory)
    return directory


def _native_and_hf(checkpoint):
    native_args = validate(compose_config(*NATIVE), 1, "cpu")
    hf_args = validate(compose_config("model=hf", f"model.name_or_path={checkpoint}"), 1, "cpu")
    native = build_model(native_args)
    native.init_weights(SEED)
    return native, hf_args


# ---------------------------------------------------------------- parity with the native Llama
def test_hf_llama_from_a_local_checkpoint_matches_native_logits(checkpoint, one_thread):
    native, hf_args = _native_and_hf(checkpoint)
    assert type(build_model(hf_args).hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    # The single-process path (built in place, init_weights) and the FSDP one (meta, to_empty, fill_param_
    # per parameter, reset_buffers for RoPE's inv_freq) load the same checkpoint.
    in_place = build_model(hf_args)
    in_place.init_weights(SEED)
    with torch.device("meta"):
        from_meta = build_model(hf_args)
    materialize(from_meta, torch.device("cpu"), SEED, cpu_offload=False)
    with torch.no_grad():
        expected = native(x)
        torch.testing.assert_close(in_place(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(from_meta(x), expected, atol=1e-5, rtol=1e-4)


def test_hf_llama_trains_along_the_native_trajectory(checkpoint, tmp_path, one_thread, text_corpus):
    native = train_in_process(compose_config(*NATIVE, *_text(text_corpus)), tmp_path / "native")
    hf = train_in_process(
        compose_config("model=hf", f"model.name_or_path={checkpoint}", *_text(text_corpus)), tmp_path / "hf"
    )
    ours, theirs = (read_rows(tmp_path / d) for d in ("native", "hf"))
    assert [r["loss"] for r in theirs] == pytest.approx([r["loss"] for r in ours], rel=1e-4)
    assert hf.n_params == native.n_params and hf.flops_per_token == native.flops_per_token


# ---------------------------------------------------------------- presets, init, counts
@pytest.mark.parametrize(("preset", "native"), [("hf_llama_debug", "debug"), ("hf_gpt2_debug", "gpt2_debug")])
def test_presets_count_and_flop_like_their_native_twins(preset, native):
    hf_args, native_args = build_model_args(preset), build_model_args(native)
    for exclude in (False, True):
        assert param_count(hf_args, exclude) == param_count(native_args, exclude)
        with torch.device("meta"):
            assert num_params(build_model(hf_args), exclude) == param_count(hf_args, exclude)
    assert flops_per_token(hf_args, 256) == flops_per_token(native_args, 256)


def test_hf_flops_formula_matches_the_flop_counter(one_thread):
    # Eager attention is plain matmuls, which FlopCounterMode counts as they are.
    args = build_model_args("hf_llama_debug", {"attention": "standard"})
    model = build_model(args)
    model.init_weights(0)
    B, T = 2, 128
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert counter.get_total_flops() / (B * T) / flops_per_token(args, T) == pytest.approx(1.0, abs=0.05)


def test_meta_init_equals_in_place_init_and_is_seeded():
    for preset in ("hf_llama_debug", "hf_gpt2_debug"):
        args = build_model_args(preset)
        a, b = build_model(args), build_model(args)
        a.init_weights(3)
        b.init_weights(4)
        with torch.device("meta"):
            m = build_model(args)
        materialize(m, torch.device("cpu"), 3, cpu_offload=False)
        sa, sm, sb = a.state_dict(), m.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sm[k]) for k in sa)
        assert not torch.equal(sa["hf.lm_head.weight"], sb["hf.lm_head.weight"])
        for name, buf in a.named_buffers():  # RoPE inv_freq recomputed after to_empty
            torch.testing.assert_close(buf, dict(m.named_buffers())[name])
    tied = build_model(build_model_args("hf_gpt2_debug"))
    assert tied.hf.lm_head.weight is tied.hf.transformer.wte.weight


def test_blocks_are_the_decoder_layers():
    for preset, cls in (("hf_llama_debug", "LlamaDecoderLayer"), ("hf_gpt2_debug", "GPT2Block")):
        with torch.device("meta"):
            model = build_model(build_model_args(preset))
        layers = blocks(model)
        assert len(layers) == model.args.n_layers and {type(b).__name__ for b in layers} == {cls}


# ---------------------------------------------------------------- attention, validation
@pytest.mark.parametrize(
    ("attention", "impl", "kv"),
    [
        ("standard", "eager", 4),
        ("sdpa", "sdpa", 4),
        ("flash", "sdpa", 4),
        ("gqa", "sdpa", 1),
        ("mqa", "sdpa", 1),
    ],
)
def test_attention_options_map_onto_transformers(attention, impl, kv, one_thread):
    args = validate(compose_config("model=hf_llama_debug", f"attention={attention}"), 1, "cpu")
    model = build_model(args)
    model.init_weights(0)
    assert model.hf.config._attn_implementation == impl  # flash: SDPA pinned to its flash kernel in forward
    assert model.hf.config.num_key_value_heads == kv == args.kv_heads  # hf_llama_debug has 4 heads
    logits = model(torch.zeros(1, 16, dtype=torch.long))
    assert logits.shape == (1, 16, 256) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("attention", "pinned"), [("flash", True), ("sdpa", False)])
def test_flash_on_hf_pins_sdpas_flash_kernel(attention, pinned, monkeypatch):
    # transformers' SDPA path calls torch.nn.functional.scaled_dot_product_attention: record which SDPA
    # backends were allowed at each call. Pinned, a fallback to the math kernel (T x T scores) is an error.
    allowed, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        allowed.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = build_model(build_model_args("hf_llama_debug", {"attention": attention}))
    model(torch.zeros(1, 16, dtype=torch.long))
    assert len(allowed) == model.args.n_layers
    assert set(allowed) == ({(True, False)} if pinned else {(True, True)})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model=hf",), "needs model.name_or_path or model.hf_config.model_type"),
        (("model=hf", "model.name_or_path=/nowhere/Llama-3.2-1B"), "never downloads at run time"),
        (
            ("model=hf_llama_debug", "+model.hf_config.num_hiden_layers=2"),
            r"no field\(s\) \['num_hiden_layers'\]",
        ),
        (
            ("model=hf_llama_debug", "+model.hf_config.num_hidden_layers=2", "model.n_layers=3"),
            "keep one of them",
        ),
        (("model=hf_gpt2_debug", "attention=gqa"), "no grouped K/V heads"),
        (("model=hf_llama_debug", "model.norm_eps=1e-6"), "model.hf_config"),
    ],
)
def test_bad_hf_configs_fail_at_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_config(*overrides), 1, "cpu")


def test_generic_fields_and_hf_config_override_the_preset():
    args = validate(
        compose_config("model=hf_gpt2_debug", "model.n_layers=2", "+model.hf_config.n_embd=64"), 1, "cpu"
    )
    assert (args.n_layers, args.dim, args.config.n_layer, args.config.n_embd) == (2, 64, 2, 64)


@pytest.mark.slow
def test_a_missing_local_path_is_one_clear_line(tmp_path):
    # What the CLI prints after "shardlab: error: " (its path for every check: tests/test_bad_input.py).
    with pytest.raises(ValueError) as info:
        validate(compose_config("model=hf", f"model.name_or_path={tmp_path / 'absent'}"), 1, "cpu")
    assert "never downloads at run time" in str(info.value) and "model.name_or_path" in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- single, and fsdp on 2 processes
def _inspect(cfg, env, run_dir) -> dict:
    model, _ = build_for(cfg, env)
    layers = blocks(model)
    return {
        "sharded_blocks": all(isinstance(b, FSDPModule) for b in layers),
        "block_classes": sorted({type(b).__name__ for b in layers}),
        "checkpointed": [bool(b.gradient_checkpointing) for b in layers],
    }


# FSDP is where an HF model needs shardlab's own work (built on meta, blocks found by class, seeded init of
# the local shards); DDP wraps any module alike, and its parity is the native models' (test_strategies.py).
HF_RUNS = {
    f"{preset}-fsdp": (f"model={preset}", "strategy=fsdp") for preset in ("hf_llama_debug", "hf_gpt2_debug")
}
HF_RUNS["hf_llama_debug-fsdp-ac_full"] = (
    "model=hf_llama_debug",
    "strategy=fsdp",
    "strategy.activation_checkpointing=full",
)
HF_RUNS["hf_llama_debug-fsdp-bf16"] = (
    "model=hf_llama_debug",
    "strategy=fsdp",
    "precision=bf16-mixed",
    "attention=gqa",
)


@pytest.fixture(scope="module")
def group(tmp_path_factory, text_corpus, checkpoint):
    def cfg(*o):
        return OmegaConf.to_container(compose_config(*_text(text_corpus), *o), resolve=True)

    jobs = [("train", name, cfg(*o)) for name, o in HF_RUNS.items()]
    jobs.append(
        ("train", "checkpoint-fsdp", cfg("model=hf", f"model.name_or_path={checkpoint}", "strategy=fsdp"))
    )
    for mode in ("full", "selective"):
        jobs.append(
            (
                "inspect",
                f"ac_{mode}",
                cfg("model=hf_llama_debug", "strategy=fsdp", f"strategy.activation_checkpointing={mode}"),
            )
        )
    out = tmp_path_factory.mktemp("hf-group")
    kinds = {"train": dist_helpers._train, "inspect": _inspect}
    return dist_helpers.launch(dist_helpers.run_jobs, jobs, str(out), kinds), out


@pytest.fixture(scope="module")
def single(tmp_path_factory, text_corpus):
    out = tmp_path_factory.mktemp("hf-single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for preset in ("hf_llama_debug", "hf_gpt2_debug"):
            train_in_process(compose_config(*_text(text_corpus), f"model={preset}"), out / preset)
        train_in_process(compose_config(*NATIVE, *_text(text_corpus)), out / "native")
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", list(HF_RUNS))
def test_hf_presets_train_under_fsdp_like_single(group, single, run):
    results, out = group
    losses = [r["loss"] for r in read_rows(out / run)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5
    assert results[0][run].world_size == 2
    if "bf16" not in run and "ac_" not in run:  # fp32, same batches: the single-process trajectory
        reference = [r["loss"] for r in read_rows(single / run.split("-")[0])]
        assert losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_hf_checkpoint_under_fsdp_starts_where_native_does(group, single):
    results, out = group
    native = [r["loss"] for r in read_rows(single / "native")]
    assert [r["loss"] for r in read_rows(out / "checkpoint-fsdp")] == pytest.approx(native, rel=1e-4)


@pytest.mark.slow
def test_fsdp_wraps_decoder_layers_and_ac_uses_the_models_hook(group):
    results, _ = group
    for rank in (0, 1):
        full, selective = results[rank]["ac_full"], results[rank]["ac_selective"]
        assert full["sharded_blocks"] and full["block_classes"] == ["FSDPLlamaDecoderLayer"]
        assert full["checkpointed"] == [True] * 5
        assert selective["checkpointed"] == [True, False, True, False, True]  # strategy.ac_every=2
