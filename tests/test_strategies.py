# Strategies under a real 2-process gloo group: every strategy reproduces the single-process loss
# trajectory, FSDP really shards (and so holds about half the state per rank), a bad HSDP mesh fails before
# any worker starts. All distributed runs share ONE process group (tests/dist_helpers.py) to stay quick.
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import elastic_launch

from launcher.elastic import launch_config
from launcher.errors import describe_failure
from tests.helpers import dist as dist_helpers
from tests.helpers.run import compose_config, read_rows, read_summary
from trainer.checks import model_args
from trainer.dist import close_distributed, init_distributed
from trainer.loop import train

pytestmark = pytest.mark.slow

STEPS = 5
# fp32, global batch 8 on real text; a high constant learning rate so five steps move the loss a lot,
# which makes any difference in gradients or updates show in the trajectory.
PARITY = (
    "precision=fp32",
    "trainer.global_batch_size=8",
    f"trainer.max_steps={STEPS}",
    "optim.lr=3e-3",
    "optim.warmup_steps=0",
    "optim.min_lr_ratio=1.0",
)
RTOL = 1e-5

# name -> overrides on top of PARITY. micro 4 per rank = no accumulation on 2 ranks; micro 2 = 2 micro-steps.
STRATEGIES = {
    "ddp": ("strategy=ddp",),
    "fsdp": ("strategy=fsdp",),
    "fsdp_grad_op": ("strategy=fsdp_grad_op",),
    "hsdp_shard2": ("strategy=hsdp", "strategy.shard_size=2"),
    "hsdp_shard1": ("strategy=hsdp", "strategy.shard_size=1"),
}
MICRO = {"noaccum": "trainer.micro_batch_size=4", "accum": "trainer.micro_batch_size=2"}
# Accumulation has two mechanisms: DDP's no_sync (ddp_small_buckets-accum below) and FSDP2's
# set_requires_gradient_sync, the same for every FSDP layout (fsdp-accum).
PARITY_RUNS = {f"{s}-noaccum": (*o, MICRO["noaccum"]) for s, o in STRATEGIES.items()}
PARITY_RUNS["fsdp-accum"] = (*STRATEGIES["fsdp"], MICRO["accum"])
# Each mode once, each under another wrapper (full AC under FSDP with compile: COMPILE_RUNS).
AC_RUNS = {
    f"{s}-ac_{mode}": (f"strategy={s}", f"strategy.activation_checkpointing={mode}", MICRO["noaccum"])
    for s, mode in (("ddp", "full"), ("fsdp", "selective"))
}
OFFLOAD_RUN = {"fsdp_offload-noaccum": ("strategy=fsdp_offload", MICRO["noaccum"])}
# DDP's own options: a static graph, and buckets small enough to split the model (with no_sync accumulation;
# a static graph with accumulation is refused, see test_bad_input).
DDP_OPTIONS_RUN = {
    "ddp_static-noaccum": ("strategy=ddp", "strategy.static_graph=true", MICRO["noaccum"]),
    "ddp_small_buckets-accum": ("strategy=ddp", "strategy.bucket_cap_mb=1", MICRO["accum"]),
}
# Per-block torch.compile inside DDP, and inside FSDP over checkpointed blocks (the order AC -> compile ->
# FSDP). Inductor's fused kernels round a little differently from eager (8.7e-8 relative here), within RTOL.
COMPILE_RUNS = {
    "ddp-compile": ("strategy=ddp", "strategy.compile=true", MICRO["noaccum"]),
    "fsdp-ac_full-compile": (
        "strategy=fsdp",
        "strategy.activation_checkpointing=full",
        "strategy.compile=true",
        MICRO["noaccum"],
    ),
}
INSPECT = {
    "fsdp": ("strategy=fsdp",),
    "hsdp_shard2": ("strategy=hsdp", "strategy.shard_size=2"),
    "hsdp_shard1": ("strategy=hsdp", "strategy.shard_size=1"),
    "fsdp_offload": ("strategy=fsdp_offload",),
    "fsdp_ac_compile": ("strategy=fsdp", "strategy.activation_checkpointing=full", "strategy.compile=true"),
}


def _config(corpus, *overrides) -> dict:
    cfg = compose_config("data=text", f"data.path={corpus}", *PARITY, *overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def group(tmp_path_factory, text_corpus):
    # Every distributed run of this file, in one 2-rank group: {rank: {name: summary or description}}.
    out = tmp_path_factory.mktemp("group")
    jobs = [
        ("train", n, _config(text_corpus, *o))
        for n, o in {**PARITY_RUNS, **AC_RUNS, **OFFLOAD_RUN, **DDP_OPTIONS_RUN, **COMPILE_RUNS}.items()
    ]
    jobs += [("inspect", f"inspect-{n}", _config(text_corpus, *o)) for n, o in INSPECT.items()]
    results = dist_helpers.launch(dist_helpers.run_jobs, jobs, str(out))
    return results, out


@pytest.fixture(scope="module")
def single(tmp_path_factory, text_corpus):
    # The reference: one process, no process group, the whole global batch (and the same in 4 micro-steps).
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = {}
        for name, micro in (("noaccum", ()), ("accum", ("trainer.micro_batch_size=2",))):
            cfg = OmegaConf.create(_config(text_corpus, "strategy=single", *micro))
            env = init_distributed("cpu", need_group=False)
            (out / name).mkdir()
            cfg.run_dir = str(out / name)
            summary = train(cfg, env, out / name, model_args(cfg))
            close_distributed(env)
            assert summary.world_size == 1
            rows[name] = read_rows(out / name)
    finally:
        torch.set_num_threads(threads)
    return rows | {"dir": out}


def _trajectory(rows: list[dict], key: str) -> list[float]:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r[key] for r in rows]


def _assert_same(actual: list[float], expected: list[float], what: str) -> None:
    worst = max(abs(a - e) / abs(e) for a, e in zip(actual, expected, strict=True))
    assert worst <= RTOL, f"{what}: relative difference {worst:.2e} > {RTOL:.0e}\n{actual}\n{expected}"


def test_single_reference_learns_and_accumulates(single):
    losses = _trajectory(single["noaccum"], "loss")
    # Guards the parity tests' power: a trajectory that barely moved would hide wrong gradients.
    assert losses[0] - losses[-1] > 0.3, losses
    _assert_same(_trajectory(single["accum"], "loss"), losses, "single, 4 micro-steps")


@pytest.mark.parametrize("name", [*PARITY_RUNS, *OFFLOAD_RUN, *DDP_OPTIONS_RUN])
def test_parity_with_single(group, single, name):
    results, out = group
    assert results[0][name].world_size == 2
    rows = read_rows(out / name)
    for key in ("loss", "grad_norm"):
        _assert_same(_trajectory(rows, key), _trajectory(single["noaccum"], key), f"{name} {key}")
    applied = results[0][name].strategy_applied
    assert applied["name"] == name.split("-")[0].split("_")[0]  # fsdp_grad_op and fsdp_offload are fsdp
    if name.startswith("fsdp_grad_op"):
        assert applied["reshard_after_forward"] is False
    if name.startswith("ddp_static"):
        assert applied["static_graph"] is True
    if name.startswith("ddp_small_buckets"):
        assert applied["bucket_cap_mb"] == 1


@pytest.mark.parametrize("name", [*PARITY_RUNS, *OFFLOAD_RUN, *DDP_OPTIONS_RUN, *AC_RUNS, *COMPILE_RUNS])
def test_validation_loss_is_the_same_under_every_strategy(group, single, name):
    # Each rank evaluates its slice of the held-out batches; the token-weighted sum and count are all-reduced:
    # the loss of one process over the whole held-out set, whatever the strategy, compiled or checkpointed.
    results, out = group
    reference = read_summary(single["dir"] / "noaccum")
    assert reference.evals == 1 and reference.val_step == STEPS and reference.val_loss > 0
    assert results[0][name].val_loss == pytest.approx(reference.val_loss, rel=RTOL), name
    assert read_summary(out / name).val_loss == results[0][name].val_loss


@pytest.mark.parametrize("name", AC_RUNS)
def test_activation_checkpointing_changes_nothing(group, name):
    results, out = group
    strategy, _ = name.split("-")
    assert results[0][name].strategy_applied["activation_checkpointing"] == name.split("ac_")[1]
    for key in ("loss", "grad_norm"):
        _assert_same(
            _trajectory(read_rows(out / name), key),
            _trajectory(read_rows(out / f"{strategy}-noaccum"), key),
            f"{name} {key}",
        )


@pytest.mark.parametrize("name", COMPILE_RUNS)
def test_compiled_blocks_train_like_eager(group, single, name):
    results, out = group
    applied = results[0][name].strategy_applied
    assert applied["compile"] is True
    if "ac_full" in name:
        assert applied["activation_checkpointing"] == "full"
    for key in ("loss", "grad_norm"):
        _assert_same(
            _trajectory(read_rows(out / name), key),
            _trajectory(single["noaccum"], key),
            f"{name} {key}",
        )


def test_wrappers_nest_ac_inside_compile_inside_fsdp(group):
    # The order AC -> compile -> FSDP: each block is compiled around its checkpoint wrapper, and FSDP shards
    # the parameters of the result (every one a DTensor).
    results, _ = group
    params = results[0]["inspect-fsdp_ac_compile"]["params"]
    blocks = [n for n in params if n.startswith("layers.")]
    assert blocks and all(n.split(".")[2:4] == ["_orig_mod", "_checkpoint_wrapped_module"] for n in blocks)
    assert all(p["dtensor"] for p in params.values())


def test_fsdp_holds_half_the_state_of_ddp(group):
    results, out = group
    ratios = []
    for rank in (0, 1):
        ddp = results[rank]["ddp-noaccum"].state_bytes_per_rank
        fsdp = results[rank]["fsdp-noaccum"].state_bytes_per_rank
        for key in ("params_bytes", "grads_bytes", "optim_state_bytes", "total"):
            assert fsdp[key] > 0 and ddp[key] > 0, (key, ddp, fsdp)
        ratios.append(fsdp["total"] / ddp["total"])
        assert ratios[-1] == pytest.approx(0.5, rel=0.1), (rank, ddp, fsdp)
    # What the user reads: summary.json, written by rank 0, carries rank 0's measurement.
    on_disk = read_summary(out / "fsdp-noaccum")
    assert on_disk.state_bytes_per_rank == results[0]["fsdp-noaccum"].state_bytes_per_rank
    assert (
        read_summary(out / "ddp-noaccum").state_bytes_per_rank["total"]
        > on_disk.state_bytes_per_rank["total"]
    )


@pytest.mark.parametrize(
    "name, placements, mesh",
    [
        ("fsdp", ["Shard(dim=0)"], {"shard": 2}),
        ("hsdp_shard2", ["Replicate()", "Shard(dim=0)"], {"replicate": 1, "shard": 2}),
        ("hsdp_shard1", ["Replicate()", "Shard(dim=0)"], {"replicate": 2, "shard": 1}),
        ("fsdp_offload", ["Shard(dim=0)"], {"shard": 2}),
    ],
)
def test_parameters_are_sharded(group, name, placements, mesh):
    results, _ = group
    shard = mesh["shard"]
    for rank in (0, 1):
        described = results[rank][f"inspect-{name}"]
        assert described["mesh"] == mesh
        params = described["params"]
        assert params, "no parameters"
        for pname, p in params.items():
            assert p["dtensor"], pname
            assert p["placements"] == placements, pname
            assert p["mesh_shape"] == list(mesh.values()), pname
        total_local = sum(p["local_numel"] for p in params.values())
        total_global = sum(p["global_numel"] for p in params.values())
        # Dim 0 of a few small tensors is padded unevenly across ranks, hence approximately.
        assert total_local == pytest.approx(total_global / shard, rel=0.05), (rank, total_local, total_global)
        if name == "fsdp_offload":
            assert described["offload_policy"] == "CPUOffloadPolicy"
            assert {p["local_device"] for p in params.values()} == {"cpu"}
        else:
            assert described["offload_policy"] == "OffloadPolicy"


@pytest.mark.timeout(120)
def test_rank_that_raises_mid_run_is_named(tmp_path):
    # Rank 1 raises at step 4 of 200, after three steps trained and were logged, while rank 0 waits in
    # step 4's gradient all-reduce: the job fails, and the launcher names rank 1 and its exception. Before
    # the failing rank stopped waiting at a barrier in its teardown, such a job hung until gloo's timeout.
    cfg = compose_config("strategy=ddp", "trainer.global_batch_size=4", "trainer.max_steps=200")
    container = OmegaConf.to_container(cfg, resolve=True)
    run_dir = tmp_path / "run"
    with pytest.raises(ChildFailedError) as info:
        elastic_launch(launch_config(cfg.launcher, 2), dist_helpers.fail_mid_run)(
            1, 4, container, str(run_dir)
        )
    message = describe_failure(info.value)
    assert message == "rank 1 failed (exit code 1): RuntimeError: worker failure injected at step 4", message
    assert [r["step"] for r in read_rows(run_dir)] == [1, 2, 3]
    # rank 0 failed too, after rank 1, and records the first failure: the whole file
    assert json.loads((run_dir / "summary.json").read_text()) == {
        "status": "failed",
        "error": message.replace(" (exit code 1)", ""),
        "run_dir": str(run_dir),
    }
