# The memory planner's arithmetic (trainer/memory/) and `python -m commands.plan`: the rules of thumb it
# must reproduce as special cases, sharding, the activation formula's terms, and the CLI's verdicts.
# Pure arithmetic, no tensors: fast. tests/test_memory.py checks the same numbers against MemTracker.
import dataclasses
import re
import subprocess
import sys

import pytest

from commands import plan as plan_cli
from models import build_model_args, param_count
from models.llama import ModelArgs
from tests.helpers.cli import cli_env
from tests.helpers.run import REPO
from trainer.memory import PlanSpec, model_state, plan_memory
from trainer.memory.activations import layer_terms

# A Llama-shaped model of ~1.06 B parameters (the seed text's "1 B parameters").
ONE_B = ModelArgs(dim=2048, n_layers=18, n_heads=16, vocab_size=32000, max_seq_len=4096)


def state_per_param(args, strategy="single", world_size=1, **spec) -> float:
    s = model_state(args, PlanSpec.of(strategy, world_size, **spec))
    return (s["params"] + s["grads"] + s["optimizer"]) / param_count(args)


def test_fp32_weights_take_4_bytes_per_parameter_so_1b_loads_in_4_gb():
    plan = plan_memory(ONE_B, PlanSpec(precision="fp32"))
    assert plan.n_params == param_count(ONE_B)
    assert plan.params == 4 * plan.n_params  # 4.2 GB for 1.06 B


def test_fp32_adam_is_16_bytes_of_state_and_about_24_to_train():
    # 4 (weights) + 4 (gradients) + 8 (two Adam moments) = 16; with activations and temporaries at a modest
    # batch (3072 tokens per step) the seed text's ~24 bytes per parameter, ~6x the weights: 1 B -> ~24 GB.
    assert state_per_param(ONE_B, precision="fp32") == 16
    plan = plan_memory(ONE_B, PlanSpec(precision="fp32", micro_batch=4, seq_len=768))
    assert 20 <= plan.peak / plan.n_params <= 28
    assert 5 <= plan.peak / plan.params <= 7


def test_zero_mixed_precision_adam_is_16_bytes_divided_by_n_under_full_shard():
    # ZeRO: 2 + 2 + 12 = 16 bytes per parameter of model state; here bf16-mixed keeps fp32 weights (the
    # master) and fp32 gradients: 4 + 4 + 8, the same 16. ZeRO-3 / FSDP full shard: 16 / N per rank.
    assert state_per_param(ONE_B, precision="bf16-mixed", strategy="ddp", world_size=8) == 16
    for n in (2, 4, 8):
        fsdp = state_per_param(ONE_B, precision="bf16-mixed", strategy="fsdp", world_size=n)
        assert fsdp == pytest.approx(16 / n, rel=1e-4)  # padding of dim 0 to a multiple of n


def test_fsdp_model_state_per_rank_is_1_over_n_of_ddp():
    args = build_model_args("llama3_8b")
    for precision in ("fp32", "bf16-mixed", "bf16-true"):
        ddp = model_state(args, PlanSpec.of("ddp", 8, precision=precision))
        fsdp = model_state(args, PlanSpec.of("fsdp", 8, precision=precision))
        for key in ("params", "grads", "optimizer"):
            assert fsdp[key] == pytest.approx(ddp[key] / 8, rel=1e-4)


def test_sharding_variants():
    args, base = build_model_args("llama_1b"), dict(precision="bf16-mixed", micro_batch=1)
    full = plan_memory(args, PlanSpec.of("fsdp", 8, **base))
    # HSDP shards over its shard dim only: shard 4 of 8 ranks holds twice full shard's state.
    hsdp = plan_memory(args, PlanSpec.of("hsdp", 8, shard_size=4, **base))
    assert hsdp.optimizer == pytest.approx(2 * full.optimizer, rel=1e-4)
    # Shard-grad-op (ZeRO-2) keeps every block gathered (bf16) from forward to backward: 2 bytes/param more.
    grad_op = plan_memory(args, PlanSpec.of("fsdp", 8, reshard_after_forward=False, **base))
    assert grad_op.optimizer == full.optimizer
    gathered = (
        grad_op.events["start of backward"]["gathered params"]
        - full.events["start of backward"]["gathered params"]
    )
    blocks = param_count(args) - args.vocab_size * args.dim - args.dim  # tied head: root is embedding + norm
    assert gathered == pytest.approx(2 * blocks, rel=1e-3)
    # CPU offload: the sharded state moves to host memory.
    offload = plan_memory(args, PlanSpec.of("fsdp", 8, cpu_offload=True, **base))
    assert offload.params == offload.grads == offload.optimizer == 0
    assert offload.host == pytest.approx(full.params + full.grads + full.optimizer)
    assert offload.peak < full.peak


def test_8bit_optimizer_states_are_2_bytes_instead_of_8():
    args = build_model_args("llama_1b")
    adam = model_state(args, PlanSpec(optim="adamw"))["optimizer"]
    eight_bit = model_state(args, PlanSpec(optim="adamw8bit"))["optimizer"]
    assert adam / param_count(args) == 8
    assert eight_bit / param_count(args) == pytest.approx(2, rel=0.02)  # + an fp32 scale per 256


def test_an_unknown_precision_is_named():
    with pytest.raises(ValueError, match="valid options are fp32"):
        plan_memory(ONE_B, PlanSpec(precision="fp4"))


def _attention(args: ModelArgs, t: int, **spec) -> float:
    terms = layer_terms(args, PlanSpec(micro_batch=1, seq_len=t, **spec))
    return sum(v for k, v in terms.items() if "q, k, v" in k or "attention output" in k or "scores" in k)


def test_standard_attention_grows_with_t_squared_and_flash_linearly():
    standard = dataclasses.replace(ONE_B, attention="standard")
    flash = dataclasses.replace(ONE_B, attention="flash")
    # (B, H, T, T) softmax output in fp32 plus the (T, T) mask, a quarter more per element for the probs
    # cast back to bf16: doubling T quadruples it.
    for precision in ("fp32", "bf16-mixed"):
        s1 = layer_terms(standard, PlanSpec(precision=precision, seq_len=1024))
        s2 = layer_terms(standard, PlanSpec(precision=precision, seq_len=2048))
        key = "scores: softmax (fp32) + probs, (B, H, T, T)"
        assert s2[key] == 4 * s1[key]
        assert not any("scores" in k for k in layer_terms(flash, PlanSpec(precision=precision, seq_len=1024)))
    # Every flash term is linear in T; standard's attention grows faster than 2x per doubling.
    assert sum(layer_terms(flash, PlanSpec(seq_len=2048)).values()) == 2 * sum(
        layer_terms(flash, PlanSpec(seq_len=1024)).values()
    )
    assert _attention(standard, 4096) / _attention(standard, 2048) > 3.5
    assert _attention(flash, 4096) / _attention(flash, 2048) == pytest.approx(2)


def test_gqa_shrinks_kv_activations_by_n_heads_over_n_kv_heads():
    mha = dataclasses.replace(ONE_B, attention="flash")
    gqa = dataclasses.replace(mha, n_kv_heads=4)  # 16 query heads, 4 K/V heads
    e, d, c = 2048, ONE_B.dim, 4
    qkv_mha = layer_terms(mha, PlanSpec(seq_len=e))["q, k, v"]
    qkv_gqa = layer_terms(gqa, PlanSpec(seq_len=e))["q, k, v"]
    assert qkv_mha == c * e * 3 * d
    assert qkv_gqa == c * e * (d + 2 * d // 4)  # K and V 4x smaller, Q unchanged
    # Its projections shrink too: fewer parameters, so less model state.
    assert param_count(gqa) < param_count(mha)


def test_activation_checkpointing_keeps_only_block_inputs():
    args, base = dataclasses.replace(ONE_B, attention="flash"), dict(micro_batch=2, seq_len=1024)
    none = plan_memory(args, PlanSpec(**base))
    full = plan_memory(args, PlanSpec(activation_checkpointing="full", **base))
    selective = plan_memory(args, PlanSpec(activation_checkpointing="selective", ac_every=2, **base))
    block_input = 4 * 2 * 1024 * args.dim  # the fp32 residual stream
    assert full.layer_bytes == [block_input] * args.n_layers
    assert selective.layer_bytes[0::2] == [block_input] * (args.n_layers // 2)
    assert selective.layer_bytes[1::2] == none.layer_bytes[1::2]
    assert full.activations < selective.activations < none.activations
    # Backward then recomputes one block at a time: the peak can only fall.
    assert full.peak <= selective.peak < none.peak


def test_bf16_halves_the_compute_activations():
    args = dataclasses.replace(ONE_B, attention="flash")
    fp32 = layer_terms(args, PlanSpec(precision="fp32", seq_len=1024))
    bf16 = layer_terms(args, PlanSpec(precision="bf16-mixed", seq_len=1024))
    assert bf16["SwiGLU: w1, silu, w3, product"] == fp32["SwiGLU: w1, silu, w3, product"] / 2
    # ... and adds autocast's bf16 copy of every weight, kept for backward.
    assert bf16["bf16 weight copies (autocast cache)"] == 2 * (
        4 * args.dim**2 + 3 * args.dim * args.ffn_hidden_dim
    )


PLAN_8B = ("model=llama3_8b", "precision=bf16-mixed", "launcher.nproc_per_node=8", "plan.device_memory_gb=80")


def test_plan_llama3_8b_fits_8x80gb_with_fsdp(capsys):
    plan_cli.main(["strategy=fsdp", *PLAN_8B])
    out = capsys.readouterr().out
    assert "fits:" in out and "does not fit" not in out
    for row in ("parameters", "gradients", "optimizer state", "activations", "temporaries", "total (peak)"):
        assert row in out
    assert "fp32 weights, sharded 1/8" in out
    params = next(line for line in out.splitlines() if line.strip().startswith("parameters"))
    assert float(params.split()[-1]) == pytest.approx(8.03 * 4 / 8, rel=0.01)  # GB per rank


def test_plan_llama3_8b_with_ddp_does_not_fit_and_proposes_fsdp(capsys):
    plan_cli.main(["strategy=ddp", *PLAN_8B])
    out = capsys.readouterr().out
    assert "does not fit" in out
    proposals = out.split("cheapest changes that fit")[1]
    fsdp = next(line for line in proposals.splitlines() if "strategy=fsdp " in line + " ")
    assert float(fsdp.split()[-2]) < 80


def test_the_verdict_names_the_shape_it_planned_and_one_device_gets_one_device_changes(capsys):
    # A verdict at 128 tokens must say so; on one device, DDP's buckets are a copy nothing needs (strategy=single),
    # and more ranks means more machines of the GPUs a node has, never more processes on one GPU.
    plan_cli.main(["model=llama_1b", "strategy=ddp", "trainer.seq_len=2048", "trainer.global_batch_size=1",
                   "plan.device_memory_gb=30"])  # fmt: skip
    out = capsys.readouterr().out
    assert (
        "does not fit" in out
        and "at micro-batch 1 x seq_len 2048 (trainer.micro_batch_size, trainer.seq_len)" in out
    )
    assert re.search(r"one process, no DDP buckets +strategy=single ", out), out
    assert "launcher.nproc_per_node" not in out.split("cheapest changes")[1]
    plan_cli.main(
        ["model=llama3_8b", "plan.device_memory_gb=80", "launcher.nproc_per_node=8", "strategy=ddp"]
    )
    out = capsys.readouterr().out
    assert re.search(r"FSDP over more nodes \(more GPUs\) +strategy=fsdp launcher.nnodes=2 ", out), out


def test_qlora_is_proposed_where_full_fine_tuning_does_not_fit(capsys):
    # llama3_8b on one 24 GB device: full fine-tuning needs 130 GB; QLoRA (4-bit base, fp32 adapters) fits at a
    # smaller micro-batch, and plain LoRA on a bf16 base at a smaller one still.
    plan_cli.main(["model=llama3_8b", "plan.device_memory_gb=24"])
    out = capsys.readouterr().out.split("cheapest changes that fit")[1]
    qlora = next(
        line for line in out.splitlines() if line.strip().startswith("QLoRA: LoRA on a 4-bit (NF4) base")
    )
    assert "finetune=lora precision=nf4 trainer.micro_batch_size=" in qlora and float(qlora.split()[-2]) < 24
    assert "LoRA adapters on a frozen bf16 base" in out


def test_a_change_that_still_does_not_fit_is_no_suggestion(capsys):
    # llama3_70b in fp32 on one 8 GB device: the planner's cheapest combination (bf16, 8-bit states, checkpointing,
    # a smaller micro-batch, more ranks, offload ...) still needs more than 8 GB per device, so it is not offered.
    plan_cli.main(["model=llama3_70b", "precision=fp32", "plan.device_memory_gb=8"])
    out = capsys.readouterr().out
    assert "does not fit" in out and "cheapest changes that fit" not in out
    assert out.rstrip().endswith("no change the planner knows makes it fit")


def test_plan_cli_runs_as_a_module_and_reports_bad_overrides():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "commands.plan",
            "model=llama_1b",
            "strategy=ddp",
            "precision=fp32",
            "plan.device_memory_gb=24",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "does not fit" in ok.stdout and "optim=adamw8bit" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "commands.plan", "precision=fp4"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "shardlab: error:" in bad.stderr and "precision=fp4 is not an option of precision" in bad.stderr


def test_8bit_states_follow_the_local_shard_as_torchao_does():
    # torchao 0.18 quantises a moment only where this rank's shard has >= 4096 elements and a multiple of 256;
    # any other tensor keeps moments in the weights' dtype. Measured: tests/test_precision.py.
    from trainer.optim import state_bytes

    assert state_bytes("adamw8bit", 4, 8192) == pytest.approx(2 * (8192 * (1 + 4 / 256) + 1024))
    assert state_bytes("adamw8bit", 4, 8192 + 128) == 8 * (8192 + 128)  # not a multiple of 256
    assert state_bytes("adamw8bit", 2, 2048) == 4 * 2048  # small, bf16 weights: bf16 moments
    # A (64, 64) matrix is quantised whole, but not in 32-row halves under FSDP on 2 ranks.
    args = build_model_args("debug", {"dim": 64, "n_layers": 1, "multiple_of": 64})
    one, two = (model_state(args, PlanSpec.of("fsdp", n, optim="adamw8bit"))["optimizer"] for n in (1, 2))
    assert two > one / 2


def test_hugging_face_models_are_planned_where_they_are_built_like_llama(capsys):
    # Parameters from the module built on meta, activations from the Llama terms (MemTracker: test_memory.py);
    # transformers' GPT-2 saves more than its native twin, and is refused in one line rather than planned wrong.
    plan_cli.main(["model=hf_llama_debug", "plan.device_memory_gb=1", "strategy.compile=true"])
    out = capsys.readouterr().out
    assert "fits:" in out and "planned as eager" in out
    with pytest.raises(SystemExit):
        plan_cli.main(["model=hf_gpt2_debug"])
    assert "not gpt2: plan a native model of the same shapes instead" in capsys.readouterr().err


def test_tensor_parallelism_divides_state_and_activations_as_korthikanti_counts():
    # Per rank under TP of degree t (Korthikanti et al. 2022): what lives on the heads and the MLP's hidden units
    # is 1/t; the norms and the residual stream stay whole without sequence parallelism, and are 1/t with it,
    # but for the gathered inputs of the Linears that follow a norm.
    args, t = build_model_args("llama3_8b"), 4
    base = dict(precision="bf16-mixed", micro_batch=1, seq_len=4096)
    one = layer_terms(args, PlanSpec(**base))
    tp = layer_terms(args, PlanSpec.of("tp", t, tp=t, sequence_parallel=False, **base))
    sp = layer_terms(args, PlanSpec.of("tp", t, tp=t, sequence_parallel=True, **base))
    for term in ("q, k, v", "attention output + logsumexp", "attention output reshaped for wo",
                 "SwiGLU: w1, silu, w3, product"):  # fmt: skip
        assert tp[term] == sp[term] == pytest.approx(one[term] / t), term
    norms = "RMSNorms: fp32 input, rsqrt, normalised, Linear inputs"
    e, d = 4096, args.dim
    linear_inputs = 5 * 2 * e * d  # autocast's bf16 casts of the norms' outputs, for wq, wk, wv, w1, w3
    assert tp[norms] == one[norms]
    assert sp[norms] == pytest.approx((one[norms] - linear_inputs) / t + linear_inputs)
    # Model state: TP alone splits every matrix by t (norms whole); FSDP x TP over 8 ranks holds what FSDP does.
    whole = plan_memory(args, PlanSpec(**base))
    split = plan_memory(args, PlanSpec.of("tp", t, tp=t, **base))
    assert split.params == pytest.approx(whole.params / t, rel=1e-3)
    assert split.optimizer == pytest.approx(whole.optimizer / t, rel=1e-3)
    fsdp = plan_memory(args, PlanSpec.of("fsdp", 8, **base))
    fsdp_tp = plan_memory(args, PlanSpec.of("fsdp_tp", 8, tp=t, sequence_parallel=True, **base))
    assert fsdp_tp.params == pytest.approx(fsdp.params, rel=1e-3)
    # The vocabulary-parallel loss: the logits and their fp32 log-softmax are 1/t.
    assert split.head_terms["log-softmax (fp32)"] == pytest.approx(whole.head_terms["log-softmax (fp32)"] / t)


def test_suggest_proposes_tensor_parallelism_where_fsdp_alone_leaves_no_room(capsys):
    # llama3_8b at 8192 tokens, 2 sequences per GPU on 8 x 80 GB: FSDP holds the model state (16 GB per rank) but
    # not the activations; FSDP x TP within the node, at the same micro-batch, is the cheapest change that fits.
    plan_cli.main(["model=llama3_8b", "strategy=fsdp", "precision=bf16-mixed", "attention=flash", "trainer.seq_len=8192",
                   "trainer.global_batch_size=16", "launcher.nproc_per_node=8", "plan.device_memory_gb=80"])  # fmt: skip
    out = capsys.readouterr().out
    assert "does not fit" in out
    first = out.split("cheapest changes that fit, predicted peak per rank:\n")[1].splitlines()[0]
    assert "FSDP x tensor parallelism" in first and "strategy=fsdp_tp strategy.tp=4" in first, out
    # and the plan of that suggestion fits
    plan_cli.main(["model=llama3_8b", "strategy=fsdp_tp", "strategy.tp=4", "trainer.micro_batch_size=2",
                   "precision=bf16-mixed", "attention=flash", "trainer.seq_len=8192", "trainer.global_batch_size=16",
                   "launcher.nproc_per_node=8", "plan.device_memory_gb=80"])  # fmt: skip
    out = capsys.readouterr().out
    assert "fits:" in out and "tensor parallel over 4" in out and "sharded 1/8" in out, out


def test_under_cpu_offload_the_roots_unsharded_gradient_is_on_the_device():
    # FSDP2 makes the root's unsharded gradient (the tied embedding of llama_1b: 128256 x 2048, bf16) on the
    # device before it reduce-scatters and offloads it; the blocks' sharded gradients leave at once.
    args = build_model_args("llama_1b")
    offload = plan_memory(args, PlanSpec.of("fsdp", 8, precision="bf16-mixed", cpu_offload=True))
    head = 2 * (args.vocab_size * args.dim + args.dim)
    backward = [e for name, e in offload.events.items() if name.startswith("backward of block")]
    assert backward and all(e["grads"] == pytest.approx(head) for e in backward)
    assert offload.grads == 0  # the model state's gradients are host memory
