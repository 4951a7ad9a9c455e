# Fine-tuning a pretrained model with LoRA (peft's adapters) and QLoRA (torchao's NF4 base), on a Hugging Face Llama
# built and saved here (nothing downloaded). LoRA with an fp32 base follows peft's own LoRA, trained by a plain loop
# on the same weights and batches, to 1e-5, in one process and under ddp and fsdp on 2 ranks; QLoRA's base
# dequantizes exactly as torchao's own (its FSDP shards included) and stays within 2e-2 of bf16 LoRA; only the
# adapters train and are checkpointed, a resume is bit-exact; the adapters exported in peft's format (loaded by
# PeftModel.from_pretrained on the base) and the merged model give shardlab's logits to 1e-5, QLoRA's over the base
# as its 4 bits dequantize; model.init_from starts a native model from an export or a checkpoint, and under fsdp
# each rank reads only its own rows of every pretrained weight.
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from commands.export import consolidated_model_state, export
from models import build_model
from models.llama import fill_adapter_
from tests.helpers import dist as dist_helpers
from tests.helpers.run import compose_config, read_rows, read_summary, train_in_process
from trainer.checks import model_args, validate
from trainer.data import build_data, micro_batches
from trainer.finetune import apply_finetune

pytestmark = pytest.mark.slow

STEPS, SEED = 8, 1234
BASE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PLAIN = ("optim.lr=1e-3", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0", "optim.weight_decay=0.0",
         "optim.grad_clip=0", "eval.at_end=false")  # fmt: skip
NF4_TOL = 2e-2  # relative, on the loss: see test_qlora_dequantizes_as_torchao_and_stays_near_bf16_lora


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("base") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**BASE)).save_pretrained(out)
    return out


def overrides(base_dir, corpus, *more) -> tuple[str, ...]:
    return ("model=hf", f"model.name_or_path={base_dir}", "finetune=lora", "data=text", f"data.path={corpus}",
            "trainer.seq_len=32", "trainer.global_batch_size=4", f"trainer.max_steps={STEPS}", *PLAIN, *more)  # fmt: skip


def _cfg(base_dir, corpus, *more) -> dict:
    return OmegaConf.to_container(compose_config(*overrides(base_dir, corpus, *more)), resolve=True)


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_rows(run_dir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dir, text_corpus):
    # One process: fp32 LoRA (checkpointed, then resumed from step 4), bf16 LoRA and QLoRA; two ranks: the same
    # fp32 LoRA and QLoRA under fsdp, and QLoRA's NF4 shards against torchao's whole-tensor quantization.
    out = tmp_path_factory.mktemp("finetune")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, more in {
            "lora": ("checkpoint=periodic", "checkpoint.every_n_steps=4"),
            "lora-bf16": ("precision=bf16-true",),
            "qlora": ("precision=nf4", "checkpoint=periodic", f"checkpoint.every_n_steps={STEPS}"),
            "qlora-text": ("precision=nf4", "trainer.max_steps=40", "optim.lr=3e-3"),
        }.items():
            cfg = compose_config(*overrides(base_dir, text_corpus, *more))
            validate(cfg, 1, "cpu")
            train_in_process(cfg, out / name)
        resumed = compose_config(
            *overrides(
                base_dir, text_corpus, f"checkpoint.resume={out / 'lora' / 'checkpoints' / 'step_00000004'}"
            )
        )
        train_in_process(resumed, out / "lora-resumed")
        # A native Llama trained 2 steps and exported: its Hugging Face directory and its checkpoint are where
        # model.init_from starts the next runs.
        native = compose_config("model=debug", "data=text", f"data.path={text_corpus}", "trainer.max_steps=2",
                                "checkpoint=periodic", "checkpoint.every_n_steps=2", *PLAIN)  # fmt: skip
        train_in_process(native, out / "native")
        export(str(out / "native"), str(out / "native-hf"))
        for name, source in (("from-hf", out / "native-hf"), ("from-ckpt", out / "native")):
            cfg = compose_config("model=debug", "data=text", f"data.path={text_corpus}", "trainer.max_steps=1",
                                 f"model.init_from={source}", *PLAIN)  # fmt: skip
            validate(cfg, 1, "cpu")
            train_in_process(cfg, out / name)
    finally:
        torch.set_num_threads(threads)
    native_fsdp = {source: OmegaConf.to_container(compose_config(
        "model=debug", "data=text", f"data.path={text_corpus}", "trainer.max_steps=1", "strategy=fsdp",
        f"model.init_from={out / source}", *PLAIN), resolve=True) for source in ("native-hf", "native")}  # fmt: skip
    jobs = [("train", "lora-fsdp", _cfg(base_dir, text_corpus, "strategy=fsdp")),
            ("train", "lora-ddp", _cfg(base_dir, text_corpus, "strategy=ddp")),
            ("train", "qlora-fsdp", _cfg(base_dir, text_corpus, "strategy=fsdp", "precision=nf4")),
            ("nf4", "nf4-shards", _cfg(base_dir, text_corpus, "strategy=fsdp", "precision=nf4")),
            ("train", "from-hf-fsdp", native_fsdp["native-hf"]),
            ("train", "from-ckpt-fsdp", native_fsdp["native"]),
            ("reads", "reads-native", native_fsdp["native-hf"]),
            ("reads", "reads-hf", _cfg(base_dir, text_corpus, "strategy=fsdp"))]  # fmt: skip
    kinds = {"train": dist_helpers._train, "nf4": nf4_shards, "reads": pretrained_reads}
    return out, dist_helpers.launch(dist_helpers.run_jobs, jobs, str(out), kinds)


def nf4_shards(cfg, env, run_dir) -> float:
    # In each rank: the largest difference between its NF4 shards, dequantized, and the same rows of torchao's own
    # quantization of the whole pretrained weight, dequantized (0: exactly torchao's).
    from torchao.quantization import to_nf4

    from tests.helpers.run import build_for

    model, _ = build_for(cfg, env, model_args(cfg), finetune_cfg=cfg.finetune)
    pretrained = build_model(model_args(cfg))  # loads the base's safetensors
    pretrained.init_weights(cfg.trainer.seed)
    whole = {n: p for n, p in pretrained.named_parameters()}
    worst = 0.0
    for name, p in model.named_parameters():
        local = p.to_local()
        if not hasattr(local, "get_original_weight"):
            continue
        key = name.replace("._checkpoint_wrapped_module", "").replace(".base_layer", "")
        ref = to_nf4(whole[key].data.to(torch.bfloat16), 64, 256).get_original_weight()
        rows = ref.shape[0] // env.world_size
        mine = local.get_original_weight()
        worst = max(worst, (mine - ref[env.rank * rows : (env.rank + 1) * rows]).abs().max().item())
    return worst


def pretrained_reads(cfg, env, run_dir) -> dict[str, tuple]:
    # What this rank read of each pretrained weight while FSDP materialized the model: {key: ((first row, end), rows
    # of the weight)}, (None, rows) where it read the whole tensor. The reader is shardlab's own, passed through.
    import models.hf
    import trainer.pretrained
    from models.hf import local_rows
    from tests.helpers.run import build_for

    reader, seen = models.hf.read_safetensor_into, {}

    def recording(path, key, target):
        rows = local_rows(target)
        seen[key] = (None if rows is None else (rows.start, rows.stop), target.shape[0])
        reader(path, key, target)

    models.hf.read_safetensor_into = trainer.pretrained.read_safetensor_into = recording
    try:
        build_for(cfg, env, model_args(cfg), finetune_cfg=cfg.finetune)
    finally:
        models.hf.read_safetensor_into = trainer.pretrained.read_safetensor_into = reader
    return seen


def peft_reference(base_dir, corpus) -> list[float]:
    # peft's LoRA on transformers' model of the same base, trained by a plain loop on shardlab's batches, from the
    # adapters shardlab starts from (its (seed, name) init: the same tensors).
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                assert fill_adapter_("hf." + name.removeprefix("base_model.model."), p.data, SEED)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    cfg = compose_config(*overrides(base_dir, corpus))
    data = build_data(cfg.data, 32, SEED, 256)
    losses = []
    for step in range(1, STEPS + 1):
        ((x, y),) = micro_batches(data, step, 0, 1, 4, 1)
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _close(a: list[float], b: list[float], rtol: float) -> float:
    assert len(a) == len(b) == STEPS
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
    assert worst <= rtol, (worst, a, b)
    return worst


def test_lora_follows_pefts_own_lora_in_one_process_under_ddp_and_under_fsdp(
    runs, base_dir, text_corpus, one_thread
):
    out, _ = runs
    reference = peft_reference(base_dir, text_corpus)
    worst = {run: _close(_losses(out / run), reference, 1e-5) for run in ("lora", "lora-ddp", "lora-fsdp")}
    print(f"LoRA against peft's, worst relative loss difference over {STEPS} steps: {worst}")
    assert reference[0] - reference[-1] > 0.05  # a trajectory that moves


def test_only_the_adapters_train_and_are_checkpointed(runs):
    out, results = runs
    summary = read_summary(out / "lora")
    per_layer = 8 * (
        4 * (256 + 256) + 2 * (256 + 512) + (512 + 256)
    )  # r x (in + out) for q, k, v, o, gate, up, down
    assert summary.n_params_trainable == 2 * per_layer < summary.n_params
    state = summary.state_bytes_per_rank
    assert state["grads_bytes"] == 4 * summary.n_params_trainable  # fp32 gradients of the adapters only
    assert (
        abs(state["optim_state_bytes"] - 8 * summary.n_params_trainable) < 1024
    )  # two fp32 moments (+ steps)
    fsdp = results[0]["lora-fsdp"].state_bytes_per_rank
    assert fsdp["grads_bytes"] == state["grads_bytes"] // 2  # sharded over the 2 ranks
    saved = consolidated_model_state(out / "lora" / "checkpoints" / "step_00000008")
    assert sum(t.numel() for t in saved.values()) == summary.n_params_trainable and all(
        "lora_" in k for k in saved
    )
    straight, resumed = _losses(out / "lora"), _losses(out / "lora-resumed")
    assert resumed == straight[4:]  # bit for bit


def test_qlora_dequantizes_as_torchao_and_stays_near_bf16_lora(runs):
    # NF4 keeps 16 levels per block of 64 weights: each weight moves by up to half a level (~7% of its block's
    # largest), which moves the loss of this model by well under 1%: 2e-2 is the bound, relative, per step.
    out, results = runs
    assert results[0]["nf4-shards"] == results[1]["nf4-shards"] == 0.0
    bf16 = _losses(out / "lora-bf16")
    worst = {run: _close(_losses(out / run), bf16, NF4_TOL) for run in ("qlora", "qlora-fsdp")}
    print(f"QLoRA against bf16 LoRA, worst relative loss difference over {STEPS} steps: {worst}")
    summary = read_summary(out / "qlora")
    assert summary.precision_applied["quantize"] == "nf4"
    text = _losses(out / "qlora-text")  # real text: the loss falls
    assert sum(text[-5:]) / 5 < sum(text[:5]) / 5 - 0.5, text
    print(f"QLoRA on text: loss {text[0]:.3f} at step 1, {text[-1]:.3f} at step {len(text)}")


def test_the_adapters_in_pefts_format_and_the_merged_model_give_shardlabs_logits(
    runs, base_dir, text_corpus, tmp_path
):
    # LoRA over the fp32 base, and QLoRA over its base as NF4 dequantizes it (torchao's own dequantization of the
    # bf16 weights; the rest of the base in bf16, as the run held it): shardlab's model at the end of training, in
    # fp32 with fp32 adapters, against peft's PeftModel.from_pretrained on that base and the merged export.
    import peft
    from torchao.quantization import to_nf4
    from transformers import AutoModelForCausalLM

    from trainer.precision import nf4_linears

    out, _ = runs
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    for run in ("lora", "qlora"):
        ckpt = out / run / "checkpoints" / f"step_{STEPS:08d}"
        cfg = compose_config(*overrides(base_dir, text_corpus))
        ours = build_model(model_args(cfg))
        ours.init_weights(SEED)  # the base from its safetensors
        if run == "qlora":
            with torch.no_grad():
                for p in ours.parameters():
                    p.copy_(p.to(torch.bfloat16))
                for _, m in nf4_linears(ours):
                    m.weight.copy_(to_nf4(m.weight.to(torch.bfloat16), 64, 256).get_original_weight())
        base = {k.removeprefix("hf."): v.clone() for k, v in ours.state_dict().items()}
        ours = apply_finetune(ours, cfg.finetune, SEED)  # then the trained adapters
        missing = ours.load_state_dict(consolidated_model_state(ckpt), strict=False).missing_keys
        assert not any("lora_" in k for k in missing)
        with torch.no_grad():
            want = ours.eval()(x)
            adapters = export(str(ckpt), str(tmp_path / run / "adapters"), adapters=True)
            config = json.loads((adapters / "adapter_config.json").read_text())
            assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16.0)
            assert config["base_model_name_or_path"] == str(base_dir)
            hf_base = AutoModelForCausalLM.from_pretrained(base_dir)
            hf_base.load_state_dict(base)  # QLoRA: the base as its 4 bits dequantize
            loaded = peft.PeftModel.from_pretrained(hf_base, adapters).eval()
            merged = AutoModelForCausalLM.from_pretrained(
                export(str(ckpt), str(tmp_path / run / "merged"))
            ).eval()
            for name, got in (("peft", loaded(input_ids=x).logits), ("merged", merged(input_ids=x).logits)):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                print(f"{run}: {name} logits within {(got - want).abs().max().item():.1e} of shardlab's")
        assert not math.isnan(want.sum().item())


def test_a_native_model_starts_from_a_hugging_face_directory_or_a_checkpoint(runs, text_corpus):
    # model.init_from: the native Llama's export (transformers' names, read back through the export's mapping) and
    # its checkpoint give the weights it was saved with, in one process and under fsdp (where each rank reads only
    # its rows of each weight): the next step's loss is the one the saved run would have had.
    out, results = runs
    saved = consolidated_model_state(out / "native" / "checkpoints" / "step_00000002")
    cfg = compose_config(
        "model=debug", "data=text", f"data.path={text_corpus}", f"model.init_from={out / 'native-hf'}"
    )
    model = build_model(model_args(cfg))
    from trainer.pretrained import weight_source

    model.weight_source = weight_source(cfg.model.init_from, model_args(cfg))
    model.init_weights(SEED)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    t = cfg.trainer
    data = build_data(cfg.data, t.seq_len, t.seed, 256)
    ((x, y),) = micro_batches(data, 1, 0, 1, t.global_batch_size, 1)
    with torch.no_grad():
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    for name in ("from-hf", "from-ckpt"):
        assert read_summary(out / name).first_loss == pytest.approx(want, rel=1e-6), name
    assert results[0]["from-hf-fsdp"].first_loss == pytest.approx(want, rel=1e-5)
    assert results[0]["from-ckpt-fsdp"].first_loss == pytest.approx(want, rel=1e-5)
    # Under FSDP each rank read only its own rows of every pretrained weight (torch.chunk's split), of the native
    # model's source and of model=hf's own directory alike; the adapters are seeded, not read.
    for name, n_weights in (
        ("reads-native", len(saved)),
        ("reads-hf", 2 + 9 * BASE["num_hidden_layers"] + 1),
    ):
        for rank in (0, 1):
            seen = results[rank][name]
            assert len(seen) == n_weights, (name, sorted(seen))
            for key, (rows, n) in seen.items():
                step = -(-n // 2)
                assert rows == (min(rank * step, n), min((rank + 1) * step, n)), (name, rank, key, rows, n)
