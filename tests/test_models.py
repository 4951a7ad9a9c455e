import pytest
import torch

from models import (
    GPT2,
    MODEL_PRESETS,
    Transformer,
    build_model,
    build_model_args,
    num_params,
    param_count,
    param_shapes,
)
from models.attention import ATTENTION, check_attention_supported, flash, get_attention, standard
from models.llama import build_args
from tests.helpers.hf import as_hf_llama

KERNELS = list(ATTENTION)
# Small enough that every test here runs in well under a second.
TINY = dict(dim=64, n_layers=2, n_heads=4, max_seq_len=64)


def tiny_llama(seed: int = 0, **overrides) -> Transformer:
    model = build_model(build_model_args("debug", {**TINY, **overrides}))
    model.init_weights(seed)
    return model


def tokens(B: int = 2, T: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, x):
    model.zero_grad()
    logits = model(x)
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- attention kernels
@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_kernels_agree_on_random_inputs(n_kv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 8, generator=g, requires_grad=True)
    k = torch.randn(2, n_kv, 16, 8, generator=g, requires_grad=True)
    v = torch.randn(2, n_kv, 16, 8, generator=g, requires_grad=True)
    ref = standard(q, k, v, causal=True)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for name in ("flash", "sdpa"):
        out = ATTENTION[name](q, k, v, causal=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_kernels_agree_in_model(n_kv_heads):
    x = tokens()
    ref_logits, ref_grads = logits_and_grads(tiny_llama(attention="standard", n_kv_heads=n_kv_heads), x)
    for name in ("flash", "sdpa"):
        logits, grads = logits_and_grads(tiny_llama(attention=name, n_kv_heads=n_kv_heads), x)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_flash_runs_on_cpu_in_bf16():
    q = torch.randn(1, 4, 16, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 16, 8, dtype=torch.bfloat16)
    ref = standard(q.float(), k.float(), k.float())
    torch.testing.assert_close(flash(q, k, k).float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.filterwarnings("ignore:Flash attention")
def test_flash_failure_names_alternatives():
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 4)  # head dims differ: no flash kernel
    with pytest.raises(RuntimeError, match="attention=sdpa or attention=standard"):
        flash(q, k, k)


@pytest.mark.parametrize("name", KERNELS)
def test_causal(name):
    model = tiny_llama(attention=name)
    x = tokens(T=32)
    y = x.clone()
    y[:, 20:] = (y[:, 20:] + 1) % 256  # change every token after position 19
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=0, rtol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


# ---------------------------------------------------------------- grouped-query attention
@pytest.mark.parametrize("name", KERNELS)
def test_gqa_equals_mha_with_repeated_kv_heads(name):
    # Query heads 0,1 must read K/V head 0 and heads 2,3 read K/V head 1. An MHA model whose K/V
    # projections hold those heads repeated per group must then compute exactly the same function.
    gqa = tiny_llama(attention=name, n_kv_heads=2)
    mha = tiny_llama(attention=name, n_kv_heads=None)
    hd, n_rep = gqa.args.head_dim, gqa.args.n_heads // gqa.args.kv_heads
    state = {}
    for n, w in gqa.state_dict().items():
        if n.endswith(("attention.wk.weight", "attention.wv.weight")):
            w = w.view(-1, hd, w.size(-1)).repeat_interleave(n_rep, dim=0).reshape(-1, w.size(-1))
        state[n] = w
    mha.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(mha(x), gqa(x), atol=1e-5, rtol=1e-5)


def test_bad_head_grouping_is_rejected():
    with pytest.raises(ValueError, match=r"model.n_heads \(4\) is not divisible by the K/V head count \(3"):
        build_model_args("debug", {"n_heads": 4, "n_kv_heads": 3})


# ---------------------------------------------------------------- initialisation
@pytest.mark.parametrize(
    "name,overrides",
    [("debug", TINY), ("debug", {**TINY, "tie_embeddings": True, "n_kv_heads": 2}), ("gpt2_debug", {})],
)
def test_meta_init_equals_cpu_init(name, overrides):
    args = build_model_args(name, overrides)
    cpu = build_model(args)
    cpu.init_weights(seed=3)
    with torch.device("meta"):
        meta = build_model(args)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(seed=3)
    a, b = dict(cpu.named_parameters()), dict(meta.named_parameters())
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    for (n, x), (_, y) in zip(cpu.named_buffers(), meta.named_buffers(), strict=True):
        assert torch.equal(x, y), n
    if getattr(args, "tie_embeddings", True):  # GPT-2 always ties
        assert meta.output.weight is meta.tok_embeddings.weight
    x = tokens(T=16)
    with torch.no_grad():
        assert torch.equal(cpu(x), meta(x))


def test_init_scheme_and_seed():
    model = tiny_llama(seed=0)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    std = model.layers[0].feed_forward.w1.weight.std().item()
    std_res = model.layers[0].feed_forward.w2.weight.std().item()
    assert 0.018 < std < 0.022
    assert std_res == pytest.approx(0.02 / (2 * model.args.n_layers) ** 0.5, rel=0.1)
    other = tiny_llama(seed=1)
    assert not torch.equal(model.output.weight, other.output.weight)
    # Distinct parameters get distinct streams, and wrapper names map to the same one.
    w1, w3 = model.layers[0].feed_forward.w1.weight, model.layers[0].feed_forward.w3.weight
    assert not torch.equal(w1, w3)
    filled = torch.empty_like(w1)
    model.fill_param_("layers.0._checkpoint_wrapped_module.feed_forward.w1.weight", filled, seed=0)
    assert torch.equal(filled, w1)
    tied = tiny_llama(seed=0, tie_embeddings=True)
    head = torch.empty_like(tied.output.weight)
    tied.fill_param_("output.weight", head, seed=0)  # the tied head, reached by its other name
    assert torch.equal(head, tied.tok_embeddings.weight)


def test_fill_param_on_full_tensor_is_sharding_independent():
    # What a sharded strategy does: fill the full tensor, then keep its own slice.
    model = tiny_llama(seed=5)
    full = torch.empty_like(model.layers[1].attention.wq.weight)
    model.fill_param_("layers.1.attention.wq.weight", full, seed=5)
    assert torch.equal(full.chunk(2)[1], model.layers[1].attention.wq.weight.chunk(2)[1])


# ---------------------------------------------------------------- presets and registry
@pytest.mark.parametrize(
    "name,expected,rel",
    [
        ("debug", 1e6, 0.30),
        ("llama_20m", 20e6, 0.10),
        ("llama_160m", 160e6, 0.15),
        ("llama_1b", 1.236e9, 0.02),
        ("llama3_8b", 8.03e9, 0.02),
        ("gpt2_debug", 1e6, 0.30),
        ("gpt2_124m", 124e6, 0.01),
    ],
)
def test_preset_sizes(name, expected, rel):
    assert param_count(build_model_args(name, {})) == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("name", [n for n in MODEL_PRESETS if n != "hf"])  # bare hf needs a config
def test_param_count_matches_module(name):
    # Built on meta: nothing is allocated, so even llama3_8b is instant.
    args = build_model_args(name, {})
    with torch.device("meta"):
        model = build_model(args)
    for exclude in (False, True):
        assert param_count(args, exclude_embedding=exclude) == num_params(model, exclude_embedding=exclude)
    if name in ("debug", "llama_1b", "gpt2_debug"):  # native, tied and untied: the family's own layout
        shapes = param_shapes(args)
        expected = dict(shapes.root)
        for i in range(args.n_layers):
            expected |= {f"layers.{i}.{k}": v for k, v in shapes.block.items()}
        assert {n: tuple(p.shape) for n, p in model.named_parameters()} == expected


def test_tied_head_counts_once_as_non_embedding():
    args = build_model_args("debug", {**TINY, "tie_embeddings": True})
    model = build_model(args)
    assert num_params(model, exclude_embedding=True) == num_params(model)
    untied = build_model(build_model_args("debug", TINY))
    assert num_params(untied) - num_params(untied, exclude_embedding=True) == 256 * TINY["dim"]


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid options are .*debug.*llama3_8b.*gpt2_124m"):
        build_model_args("llama_7b", {})
    with pytest.raises(ValueError, match="unknown llama preset 'nope': valid options are .*llama_1b"):
        build_args("nope")
    with pytest.raises(
        ValueError, match="unknown attention 'flash2': valid options are standard, flash, sdpa"
    ):
        build_model_args("debug", {"attention": "flash2"})
    with pytest.raises(ValueError, match="valid options are standard, flash, sdpa"):
        get_attention("xformers")
    with pytest.raises(ValueError, match="no field.*n_layer"):
        build_model_args("gpt2_debug", {"n_layer": 2})


def test_none_overrides_are_ignored():
    args = build_model_args("debug", {"dim": None, "n_layers": 2})
    assert args.dim == 128 and args.n_layers == 2
    assert build_args("llama_1b", n_kv_heads=None).kv_heads == 8


def test_ffn_hidden_dims_match_reference_models():
    assert build_model_args("llama_1b", {}).ffn_hidden_dim == 8192
    assert build_model_args("llama3_8b", {}).ffn_hidden_dim == 14336
    assert build_model_args("llama_160m", {}).ffn_hidden_dim == 3072


# ---------------------------------------------------------------- capability checks
def test_check_attention_supported():
    with pytest.raises(ValueError, match="bf16-mixed or attention=sdpa/standard"):
        check_attention_supported("flash", "cuda", torch.float32, (9, 0))
    with pytest.raises(ValueError, match="compute capability >= 8.0.*attention=sdpa"):
        check_attention_supported("flash", "cuda", torch.bfloat16, (7, 5))
    with pytest.raises(ValueError, match="valid"):
        check_attention_supported("flash3", "cuda", torch.bfloat16, (9, 0))
    check_attention_supported("flash", "cuda", torch.bfloat16, (8, 0))
    check_attention_supported("flash", "cpu", torch.float32, None)
    check_attention_supported("flash", "cpu", torch.bfloat16, None)
    check_attention_supported("standard", "cuda", torch.float32, (7, 0))
    check_attention_supported("sdpa", "cuda", torch.float32, (7, 0))


# ---------------------------------------------------------------- GPT-2
@pytest.mark.parametrize("name", KERNELS)
def test_gpt2_forward_backward(name):
    model = build_model(build_model_args("gpt2_debug", {"attention": name}))
    assert isinstance(model, GPT2)
    model.init_weights(0)
    x = tokens(T=64)
    logits = model(x)
    assert logits.shape == (2, 64, 256)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.05)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_llama_initial_loss_is_uniform():
    model = build_model(build_model_args("debug", {}))
    model.init_weights(0)
    x = tokens(T=64)
    loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.05)


def test_sequence_longer_than_max_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_llama()(tokens(T=65))


# ---------------------------------------------------------------- parity with Hugging Face
@pytest.mark.parametrize("tie", [False, True])
def test_llama_matches_hf_llama(tie):
    args = build_model_args("debug", {**TINY, "n_kv_heads": 2, "tie_embeddings": tie, "rope_theta": 500000.0})
    ours = build_model(args)
    ours.init_weights(0)
    hf = as_hf_llama(ours)
    x = tokens(T=48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["debug", "gpt2_debug", "hf_llama_debug", "hf_gpt2_debug"])
def test_each_family_says_how_it_splits(name):
    # The plan beside each family names real modules: its blocks, Linears to split column- and row-wise in every
    # block (a column split divides output features, a row split input features), norms, embedding and head;
    # or, where tensor parallelism cannot split it, one line saying why. transformers' plan is its own.
    from tests.helpers.run import compose_config
    from trainer.checks import model_args

    args = model_args(compose_config(f"model={name}"))
    with torch.device("meta"):
        model = build_model(args)
    plan = model.parallel_plan
    layers = plan.block_list(model)
    assert len(layers) == args.n_layers and isinstance(layers, torch.nn.ModuleList)
    for block in layers:
        for path in (*plan.colwise, *plan.rowwise):
            assert isinstance(block.get_submodule(path), torch.nn.Linear), path
        assert all(block.get_submodule(n) is not None for n in plan.norms) and len(plan.norms) == 2
    assert isinstance(model.get_submodule(plan.embedding), torch.nn.Embedding)
    assert isinstance(model.get_submodule(plan.head), torch.nn.Linear) and model.get_submodule(
        plan.final_norm
    )
    if name in ("debug", "hf_llama_debug"):  # q, k, v, gate, up; o, down
        assert (len(plan.colwise), len(plan.rowwise), plan.unsplit) == (5, 2, None)
        q, o = (layers[0].get_submodule(plan.colwise[0]), layers[0].get_submodule(plan.rowwise[0]))
        assert q.out_features == args.n_heads * args.head_dim == o.in_features
    else:
        assert plan.unsplit and "\n" not in plan.unsplit
    if name.startswith("hf"):
        tp = args.config.base_model_tp_plan or {}
        assert {k.split(".*.")[1] for k in tp} == {*plan.colwise, *plan.rowwise}


def test_arguments_of_no_known_family_are_an_error():
    from models import family

    assert family(build_model_args("debug")) == "llama" and family(build_model_args("gpt2_debug")) == "gpt2"
    with pytest.raises(TypeError, match="no model family has arguments of type dict"):
        family({"dim": 64})
