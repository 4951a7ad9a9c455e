# The planner against PyTorch's MemTracker on real training steps: models built by the loop's own
# build_parallel_model, one measured trainer.loop.train_step each, single/ddp/fsdp in one 2-process gloo
# group (tests/dist_helpers.launch), every config one after another in it.
import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from strategies import get_strategy
from tests.helpers import dist as dist_helpers
from tests.helpers.run import compose_config, train_in_process
from trainer.checks import model_args
from trainer.config import batch_layout
from trainer.data import build_data, micro_batches
from trainer.dist import DistEnv, close_distributed, init_distributed
from trainer.loop import build_parallel_model, measured_step, train_step
from trainer.memory import plan_memory, spec_from_config
from trainer.memory.measure import breakdown_record, measure_step
from trainer.optim import build_optimizer
from trainer.precision import build_precision

pytestmark = pytest.mark.slow

# Sequences per rank per forward at 256 tokens: the debug model's activations dwarf its model state, the
# 20 M model's are a fifth of it, so both regimes of the peak (start of backward, optimizer step) show.
SHAPES = {"debug": 4, "llama_20m": 1}
# llama_20m's regime (the peak at the optimizer step) needs fewer cells than the debug model's: each strategy
# once in fp32 with flash, bf16-mixed once (under FSDP, where its gathered bf16 weights differ from autocast's
# cast copies); standard attention's term is the debug model's cells' (bf16 matmuls are slow on this CPU).
# The debug model: every strategy with fp32 + standard attention and with bf16-mixed + flash (the strategy
# terms meet both widths and both attention terms), and the other two pairings once, in one process.
MATRIX = {
    f"debug/{s}/{p}/{a}": ("model=debug", f"strategy={s}", f"precision={p}", f"attention={a}")
    for s in ("single", "ddp", "fsdp")
    for p, a in (("fp32", "standard"), ("bf16-mixed", "flash"))
}
MATRIX |= {
    f"debug/single/{p}/{a}": ("model=debug", "strategy=single", f"precision={p}", f"attention={a}")
    for p, a in (("fp32", "flash"), ("bf16-mixed", "standard"))
}
MATRIX |= {
    f"llama_20m/{s}/{p}/{a}": ("model=llama_20m", f"strategy={s}", f"precision={p}", f"attention={a}")
    for s, p, a in (
        ("single", "fp32", "flash"),
        ("ddp", "fp32", "flash"),
        ("fsdp", "fp32", "flash"),
        ("fsdp", "bf16-mixed", "flash"),
    )
}
# Other layouts on the debug model: ZeRO-2, HSDP, checkpointing, gradient accumulation, GQA, 8-bit states.
EXTRA = {
    "debug/fsdp_grad_op/bf16-mixed": ("model=debug", "strategy=fsdp_grad_op", "precision=bf16-mixed"),
    "debug/hsdp_shard1/fp32": ("model=debug", "strategy=hsdp", "strategy.shard_size=1"),
    "debug/ddp/ac_full/bf16-mixed": (
        "model=debug",
        "strategy=ddp",
        "precision=bf16-mixed",
        "strategy.activation_checkpointing=full",
    ),
    "debug/fsdp/ac_selective/fp32": (
        "model=debug",
        "strategy=fsdp",
        "strategy.activation_checkpointing=selective",
    ),
    "debug/fsdp/accum2/bf16-mixed": ("model=debug", "strategy=fsdp", "precision=bf16-mixed", "accum"),
    "debug/ddp/gqa/bf16-mixed": ("model=debug", "strategy=ddp", "precision=bf16-mixed", "attention=gqa"),
    "debug/single/bf16-true": ("model=debug", "strategy=single", "precision=bf16-true"),
    "debug/single/adamw8bit": ("model=debug", "strategy=single", "optim=adamw8bit"),
    # Hugging Face models, planned from their module's own parameters and their family's activation terms.
    "hf_llama_debug/single/fp32": ("model=hf_llama_debug", "strategy=single"),
    "hf_llama_debug/fsdp/bf16-mixed": ("model=hf_llama_debug", "strategy=fsdp", "precision=bf16-mixed"),
}
# Tensor parallelism over the 2 ranks (one group): sequence parallel or not, GQA's K/V heads split, checkpointed
# blocks, standard attention's scores, bf16, and the 20 M model whose peak is at the optimizer step. FSDP x TP:
# tests/test_tp.py, on 4 ranks.
TP = {
    "debug/tp/fp32": ("model=debug", "strategy=tp"),
    "debug/tp_nosp/fp32": ("model=debug", "strategy=tp", "strategy.sequence_parallel=false"),
    "debug/tp/gqa/bf16-mixed": (
        "model=debug",
        "strategy=tp",
        "attention.n_kv_heads=2",
        "precision=bf16-mixed",
    ),
    "debug/tp/ac_full/fp32": ("model=debug", "strategy=tp", "strategy.activation_checkpointing=full"),
    "debug/tp/standard/fp32": ("model=debug", "strategy=tp", "attention=standard"),
    "llama_20m/tp/fp32": ("model=llama_20m", "strategy=tp", "attention=flash"),
}


# LoRA and QLoRA (trainer/memory/lora.py): a frozen base keeps no Linear inputs, peft's adapters keep theirs (fp32
# casts under bf16), NF4's 0.516 bytes a weight; in one process and under fsdp; adapters on two Linears only. The
# NF4 ones at dim 256 and an MLP of 768: NF4 stores whole blocks of 64 x 256 weights, per FSDP shard too.
NF4_SHAPES = ("model.dim=256", "model.multiple_of=128")
LORA = {
    "debug/single/lora/fp32": ("model=debug", "strategy=single", "finetune=lora"),
    "debug/single/lora/bf16-true": ("model=debug", "strategy=single", "finetune=lora", "precision=bf16-true"),
    "debug/single/lora_wq_wv/fp32": ("model=debug", "strategy=single", "finetune=lora", "finetune.target_modules=[wq,wv]"),
    "debug/fsdp/lora/fp32": ("model=debug", "strategy=fsdp", "finetune=lora"),
    "debug/single/qlora": ("model=debug", "strategy=single", "finetune=lora", "precision=nf4", *NF4_SHAPES),
    "debug/fsdp/qlora": ("model=debug", "strategy=fsdp", "finetune=lora", "precision=nf4", *NF4_SHAPES),
}  # fmt: skip


def measure_one(cfg, env: DistEnv) -> dict:
    # One config on this rank: two warm-up steps, one measured step at the configured shape, and the
    # planner's prediction for the same config. strategy=single runs alone on each rank (world size 1).
    if cfg.strategy.name == "single":  # its own world of one: no collective with the other rank's job
        env = DistEnv(rank=0, local_rank=0, world_size=1, device=env.device)
    strategy = get_strategy(cfg.strategy.name)
    dims = strategy.dims(cfg.strategy, env.world_size, env.per_node, env.rank)
    args = model_args(cfg)
    torch.manual_seed(cfg.trainer.seed)
    model, precision = build_parallel_model(
        args,
        cfg.strategy,
        dims,
        env.device,
        cfg.trainer.seed,
        build_precision(cfg.precision.name, env.device),
        cfg.finetune,
    )
    optimizer = build_optimizer(model, cfg.optim, env.device)
    micro, accum = batch_layout(cfg.trainer, dims)
    data = build_data(cfg.data, cfg.trainer.seq_len, cfg.trainer.seed, args.vocab_size)
    rank, world = dims.dp_rank, dims.dp_size
    # Two warm-up steps on short batches: the first creates the optimizer state, the second lets DDP
    # rebuild its gradient buckets in the order backward produced them (it does so once, in forward).
    for step in (1, 2):
        warm = [(x[:, :8], y[:, :8]) for x, y in micro_batches(data, step, rank, world, micro, 1)]
        train_step(model, optimizer, warm, precision, env, strategy, 1, cfg.optim.grad_clip)
    batches = list(micro_batches(data, 3, rank, world, micro, accum))
    measured, _ = measure_step(
        model,
        optimizer,
        lambda: train_step(model, optimizer, batches, precision, env, strategy, accum, cfg.optim.grad_clip),
        fsdp=strategy.shards_state,
    )
    plan = plan_memory(
        args,
        spec_from_config(
            cfg.strategy, cfg.trainer, cfg.precision.name, cfg.optim, dims, env.device.type, cfg.finetune
        ),
    )
    return breakdown_record(measured, plan, step=3)


def measure_jobs(jobs: list[tuple[str, dict]]) -> dict[str, dict]:
    # Runs in each rank of a 2-process group (tests/helpers/dist.launch): the multi-rank jobs one after
    # another on both ranks, then the single-process ones shared out between the ranks.
    torch.set_num_threads(1)
    env = init_distributed("cpu", need_group=True)
    out = {}
    single = [(n, c) for n, c in jobs if c["strategy"]["name"] == "single"]
    for name, container in [j for j in jobs if j not in single] + single[env.rank :: env.world_size]:
        out[name] = measure_one(OmegaConf.create(container), env)
    dist.barrier()
    close_distributed(env)
    return out


def _config(overrides: tuple[str, ...]) -> dict:
    model = overrides[0].split("=")[1]
    micro = SHAPES.get(model, 4)
    accum = 2 if "accum" in overrides else 1
    world = 1 if "strategy=single" in overrides or "strategy=tp" in overrides else 2  # the data-parallel size
    cfg = compose_config(
        *(o for o in overrides if o != "accum"),
        "data=synthetic",
        "trainer.seq_len=256",
        f"trainer.global_batch_size={micro * accum * world}",
        f"trainer.micro_batch_size={micro}",
    )
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def results():
    jobs = [(name, _config(o)) for name, o in {**MATRIX, **EXTRA, **TP, **LORA}.items()]
    return dist_helpers.launch(measure_jobs, jobs)


@pytest.mark.parametrize("name", [*MATRIX, *EXTRA, *TP, *LORA])
def test_planner_total_within_15_percent_and_model_state_within_5(results, name):
    for rank in [r for r in (0, 1) if name in results[r]]:  # a single-process job ran on one rank
        record = results[rank][name]
        ratio = record["ratio"]
        print(f"{name} rank {rank}: predicted / measured peak {ratio['peak']:.3f}")
        assert 0.85 <= ratio["peak"] <= 1.15, (rank, record["predicted"]["peak_event"], record)
        # FSDPMemTracker books a block's gathered NF4 pieces as parameters at its peak: QLoRA's total is the check
        keys = ("grads", "optimizer") if name == "debug/fsdp/qlora" else ("params", "grads", "optimizer")
        for key in keys:
            assert 0.95 <= ratio[key] <= 1.05, (rank, key, record)


def test_measure_step_refuses_compiled_models():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0] = torch.compile(model[0])
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="strategy.compile=false"):
        measure_step(model, optimizer, lambda: None, fsdp=False)


def test_a_run_measures_its_third_step_next_to_the_plan(tmp_path, one_thread):
    assert measured_step(False, 0, 100) is None
    assert [measured_step(True, 0, n) for n in (1, 2, 3, 100)] == [1, 2, 3, 3]
    assert measured_step(True, 10, 100) == 13  # resumed at step 10
    assert measured_step(True, 10, 10) is None
    # The loop itself, with metrics.memory_breakdown=true: one step measured, in summary.json beside the plan.
    summary = train_in_process(
        compose_config("metrics.memory_breakdown=true", "trainer.max_steps=4"), tmp_path
    )
    record = summary.memory_breakdown
    assert record["step"] == 3 and record["measured"]["tracker"] == "MemTracker"
    assert record["predicted"]["peak_bytes"] == summary.memory_predicted_peak_gb * 1e9
    assert summary.memory_measured_peak_gb == record["measured"]["peak_bytes"] / 1e9
    assert summary.memory_peak_ratio == record["ratio"]["peak"]
