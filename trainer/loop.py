# The training loop: build what the config names, then step. Reads top to bottom; the step fits on a screen.
import dataclasses
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import strategies
from models import build_model, flops_per_token, param_count
from trainer import checkpoint
from trainer.checks import batch_layout, validate
from trainer.console import ProgressBar, format_summary
from trainer.data import build_data, micro_batches
from trainer.dist import DistEnv, mean_across_ranks
from trainer.loggers import build_loggers
from trainer.memory import measure_breakdown, memory_step, memory_summary, plan_for_run
from trainer.metrics import Metrics, measure_state_bytes
from trainer.optim import build_optimizer, build_scheduler
from trainer.precision import Precision, build_precision


def build_parallel_model(args, cfg: DictConfig, env: DistEnv, precision: Precision):
    # Sharded strategies build on the meta device, shard, then materialise only their local shards,
    # so a model larger than one device can be built; the others build in place on the device.
    sharded = strategies.is_sharded(cfg.strategy.name)
    with torch.device("meta" if sharded else env.device):
        model = build_model(args)
    if not sharded:
        model.init_weights(cfg.trainer.seed)
    model = precision.prepare_model(model)  # bf16-true cast, fp8/int8 Linear swap: before any wrapper
    apply = strategies.get_strategy(cfg.strategy.name)
    mesh = strategies.build_mesh(cfg.strategy, env.world_size, env.device)
    model = apply(model, mesh, cfg.strategy, device=env.device, precision=precision)
    if sharded:
        strategies.materialize(model, env.device, cfg.trainer.seed, cfg.strategy)
        # FSDP's MixedPrecisionPolicy casts parameters for compute; autocast on top would be redundant.
        precision = dataclasses.replace(precision, autocast=False)
    return model, mesh, precision.with_scaler(sharded)  # fp16-mixed: the scaler this strategy needs


def train_step(
    model,
    optimizer,
    batches,
    precision: Precision,
    env: DistEnv,
    accum: int,
    grad_clip: float,
    measure_state: bool = False,
):
    loss_sum = torch.zeros((), device=env.device)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        # Gradients are reduced across ranks only on the last micro-batch of the step.
        with strategies.grad_sync(model, enabled=i == accum - 1):
            with precision.context():
                logits = model(x)  # (micro, T, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            precision.backward(loss / accum)  # fp16-mixed: scaled
        loss_sum += loss.detach()
    loss_mean = mean_across_ranks(loss_sum / accum, env)  # every rank sees the same value, so all skip alike
    if not torch.isfinite(loss_mean):
        optimizer.zero_grad(set_to_none=True)
        return loss_mean, torch.tensor(float("nan")), None
    precision.unscale_(optimizer)
    grad_norm = strategies.clip_grad_norm(model, grad_clip)
    precision.step(optimizer)  # fp16-mixed: skipped (and counted) when a gradient is inf/nan
    # Parameters, gradients and optimizer state all exist now, before the gradients are freed.
    state_bytes = measure_state_bytes(model, optimizer) if measure_state else None
    optimizer.zero_grad(set_to_none=True)
    return loss_mean, grad_norm, state_bytes


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg: DictConfig, env: DistEnv, run_dir: Path) -> dict:
    torch.manual_seed(cfg.trainer.seed)
    args = validate(cfg, env.world_size, env.device.type, _capability(env.device))
    precision = build_precision(cfg.precision.name, env.device)
    t = cfg.trainer
    micro, accum = batch_layout(t, env.world_size)
    data = build_data(cfg.data, t.seq_len, t.seed, args.vocab_size)
    model, mesh, precision = build_parallel_model(args, cfg, env, precision)
    optimizer = build_optimizer(model, cfg.optim, env.device)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    ckpt_root = checkpoint.checkpoint_root(cfg.checkpoint, run_dir)
    start, resumed_from, saved = checkpoint.maybe_resume(
        cfg.checkpoint, ckpt_root, model, optimizer, scheduler, t.max_steps, precision.state_tensors()
    )
    precision.load_state_tensors(saved)  # fp16-mixed: the loss scale it had reached
    metrics = Metrics(
        device=env.device,
        flops_per_token=flops_per_token(args, t.seq_len),
        precision=cfg.precision.name,
        warmup_steps=cfg.metrics.warmup_steps,
        log_every=t.log_every,
        peak_tflops=cfg.metrics.peak_tflops,
        world_size=env.world_size,
        rank=env.rank,
    )
    loggers = build_loggers(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), env.rank, start)
    bar = ProgressBar(t.max_steps, enabled=env.is_rank0 and t.progress_bar, initial=start)
    state = {"first_loss": None, "state_bytes": None, "nonfinite_skipped": 0, "memory": None}
    # The planner's per-rank peak for this config (arithmetic, every run); with metrics.memory_breakdown one
    # step is also measured by PyTorch's MemTracker, next to it.
    plan = plan_for_run(cfg, args, env)
    mem_step = memory_step(cfg.metrics.memory_breakdown, start, t.max_steps)

    def ckpt_meta() -> dict:  # what a checkpoint keeps besides model, optimizer, step and rng
        return {"model_args": repr(args), **precision.state_tensors()}

    try:
        metrics.start()
        for step in range(start + 1, t.max_steps + 1):
            batches = micro_batches(data, step, env.rank, env.world_size, micro, accum)
            run = functools.partial(
                train_step, model, optimizer, batches, precision, env, accum, cfg.optim.grad_clip,
                measure_state=step == start + 1,
            )  # fmt: skip
            if step == mem_step:
                fsdp = strategies.is_sharded(cfg.strategy.name)
                state["memory"], (loss, grad_norm, measured) = measure_breakdown(
                    model, optimizer, run, step, fsdp, env.device, plan
                )
            else:
                loss, grad_norm, measured = run()
            state["state_bytes"] = measured or state["state_bytes"]
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            loss = loss.item()
            if not math.isfinite(loss):
                check_nonfinite(loss, step, t.on_nonfinite, ckpt_root)
                state["nonfinite_skipped"] += 1
            state["first_loss"] = loss if state["first_loss"] is None else state["first_loss"]
            metrics.update(
                step, loss=loss, grad_norm=float(grad_norm), lr=lr, tokens=t.global_batch_size * t.seq_len
            )
            row = metrics.log(step, final=step == t.max_steps)
            if row is not None:
                loggers.log(row, step)
            bar.update(step, row)
            checkpoint.maybe_save(
                cfg.checkpoint, ckpt_root, step, t.max_steps, model, optimizer, scheduler, ckpt_meta
            )
        bar.close()
        summary = metrics.summary()
        summary.update(
            status="ok",
            first_loss=state["first_loss"],
            choices=dict(cfg.get("choices") or {}),
            world_size=env.world_size,
            micro_batch_size=micro,
            grad_accum_steps=accum,
            tokens_per_step=t.global_batch_size * t.seq_len,
            n_params=param_count(args, exclude_embedding=False),
            n_params_non_embedding=param_count(args, exclude_embedding=True),
            flops_per_token=flops_per_token(args, t.seq_len),
            data=data.description,
            state_bytes_per_rank=state["state_bytes"],
            precision_applied=precision.describe(),
            emulated=precision.emulated,  # fp8 off CUDA: fp8's numerics, not its speed or memory
            skipped_steps=precision.skipped_steps,  # fp16-mixed: steps skipped for inf/nan gradients; else None
            nonfinite_skipped_steps=state["nonfinite_skipped"],  # trainer.on_nonfinite=skip
            resumed_from=str(resumed_from) if resumed_from else None,
            strategy_applied=strategies.describe(model, cfg.strategy, mesh),
            memory_breakdown=state["memory"],  # this rank's (rank 0's) measured step and the prediction
            **memory_summary(plan, state["memory"]),
            run_dir=str(run_dir),
        )
        loggers.summary(summary)
    finally:
        bar.close()
        loggers.close()
    if env.is_rank0:
        print(format_summary(summary), flush=True)
    return summary


def check_nonfinite(loss: float, step: int, policy: str, ckpt_root: Path) -> None:
    # train_step already skipped the update (a non-finite loss never reaches the weights); "error" stops.
    if policy == "error":
        kept = checkpoint.complete_checkpoints(ckpt_root)
        saved = f"the last good checkpoint is {kept[-1][1]}" if kept else "no checkpoint was saved"
        raise NonFiniteLoss(
            f"loss is {loss} at step {step}; {saved}. Lower optim.lr, or set trainer.on_nonfinite=skip "
            "to skip such steps"
        )


def _capability(device: torch.device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None
