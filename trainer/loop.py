# The training loop: build what the config names, then step. Reads top to bottom; the step fits on a screen.
# The config was validated where it was composed (trainer/checks.py), once; nothing here checks it again.
import dataclasses
import functools
import math
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import strategies
from models import build_model, flops_per_token, param_count
from strategies import ParallelDims
from strategies.common import clip_grad_norm
from trainer import checkpoint, preempt
from trainer.config import batch_layout
from trainer.console import ProgressBar, format_summary
from trainer.data import build_data, decoder, micro_batches, tokenizer_source
from trainer.dist import DistEnv, mean_across_ranks
from trainer.evaluate import check_held_out, eval_steps, evaluate, no_validation_note, samples
from trainer.finetune import apply_finetune, trainable_params
from trainer.finetune import record as finetune_record
from trainer.loggers import build_loggers
from trainer.memory import plan_for_run, spec_from_config
from trainer.metrics import Metrics
from trainer.optim import build_optimizer, build_scheduler
from trainer.precision import Precision, build_precision, peak_class
from trainer.pretrained import weight_source
from trainer.speed import calibration
from trainer.speed.model import model_costs, predict
from trainer.summary import PREEMPTED, RunSummary


def build_parallel_model(
    args,
    strategy_cfg,
    dims: ParallelDims,
    device,
    seed: int,
    precision: Precision,
    finetune_cfg=None,
    source=None,
):
    # -> (the model to train, the precision as the strategy leaves it). Strategies that shard build on the meta
    # device, shard, then materialise only their local shards, so a model larger than one device can be built;
    # the others build in place on the device. source: pretrained weights of a native model (model.init_from).
    strategy = strategies.get_strategy(strategy_cfg.name)
    with torch.device("meta" if strategy.on_meta else device):
        model = build_model(args)
    if source is not None:
        model.weight_source = weight_source(source, args)
    if not strategy.on_meta:
        model.init_weights(seed)
    model = precision.prepare_model(
        model
    )  # bf16-true cast, NF4 base, fp8/int8 Linear swap: before any wrapper
    model = apply_finetune(model, finetune_cfg, seed)  # LoRA adapters on the frozen base
    model = strategy.apply(model, dims, strategy_cfg, device=device, precision=precision)
    if strategy.on_meta:
        strategy.materialize(model, device, seed, strategy_cfg)
    if (
        strategy.casts_params
    ):  # FSDP's MixedPrecisionPolicy casts for compute; autocast on top would be redundant
        precision = dataclasses.replace(precision, autocast=False)
    return model, precision.with_scaler(strategy.shards_state)  # fp16-mixed: the scaler this strategy needs


def train_step(
    model, optimizer, batches, precision: Precision, env: DistEnv, strategy, accum: int, grad_clip: float
):
    # -> (the step's loss, averaged over micro-batches and ranks; the gradient norm before clipping)
    loss_share = strategy.forward_backward(model, batches, accum, precision, env.device)
    loss_mean = mean_across_ranks(loss_share, env)  # every rank sees the same value, so all skip alike
    if not torch.isfinite(loss_mean):
        optimizer.zero_grad(set_to_none=True)
        return loss_mean, torch.tensor(float("nan"))
    precision.unscale_(optimizer)
    grad_norm = clip_grad_norm(model, grad_clip, strategy.norm_group(model))
    precision.step(optimizer)  # fp16-mixed: skipped (and counted) when a gradient is inf/nan
    optimizer.zero_grad(set_to_none=True)
    return loss_mean, grad_norm


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg: DictConfig, env: DistEnv, run_dir: Path, args) -> RunSummary:
    # args: the model's arguments (trainer.checks.model_args), computed once where the run was checked.
    t = cfg.trainer
    torch.manual_seed(t.seed)
    strategy = strategies.get_strategy(cfg.strategy.name)
    dims = strategy.dims(cfg.strategy, env.world_size, env.per_node, env.rank)
    micro, accum = batch_layout(t, dims)
    data = build_data(cfg.data, t.seq_len, t.seed, args.vocab_size)
    precision = build_precision(cfg.precision.name, env.device)
    source = cfg.model.get("init_from")
    model, precision = build_parallel_model(
        args, cfg.strategy, dims, env.device, t.seed, precision, cfg.finetune, source
    )
    optimizer = build_optimizer(model, cfg.optim, env.device)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    ckpt_root = checkpoint.checkpoint_root(cfg.checkpoint, run_dir)
    start, resumed_from, saved = checkpoint.maybe_resume(
        cfg.checkpoint, ckpt_root, model, optimizer, scheduler, t.max_steps, precision.state_tensors()
    )
    precision.load_state_tensors(saved)  # fp16-mixed: the loss scale it had reached
    run = RunSummary(
        run_dir=str(run_dir), choices=dict(cfg.get("choices") or {}), micro_batch_size=micro, grad_accum_steps=accum,
        tokens_per_step=t.global_batch_size * t.seq_len, n_params=param_count(args),
        n_params_trainable=trainable_params(model) if cfg.finetune.name != "full" else param_count(args),
        n_params_non_embedding=param_count(args, exclude_embedding=True), data=data.description,
        resumed_from=str(resumed_from) if resumed_from else None,
        strategy_applied=strategy.describe(model, cfg.strategy, dims), pipeline=strategy.pipeline_facts(model, accum),
    )  # fmt: skip
    metrics = build_metrics(cfg, env, dims, args, precision, run)
    metrics.watch_state(model, optimizer)
    loggers = build_loggers(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), env.rank, start)
    bar = ProgressBar(t.max_steps, enabled=env.is_rank0 and t.progress_bar, initial=start)
    memory_step = measured_step(cfg.metrics.memory_breakdown, start, t.max_steps)
    e = cfg.eval
    evals = eval_steps(e.every_n_steps, e.at_end, start, t.max_steps, data.val_windows != 0)
    if e.every_n_steps or e.at_end:
        check_held_out(data.val_windows, t.seq_len, e.batches, t.global_batch_size, e.every_n_steps)
        if data.val_windows == 0 and env.is_rank0:
            print(no_validation_note(t.seq_len), flush=True)

    def ckpt_meta() -> dict:  # what a checkpoint keeps besides model, optimizer, step and rng
        return {
            **checkpoint.model_record(cfg.model, cfg.attention, cfg.data),
            **finetune_record(cfg.finetune, cfg.model, t.seed, cfg.precision.name),
            **precision.state_tensors(),
        }

    tokenizer = tokenizer_source(cfg.data)  # copied into each checkpoint
    text_of = decoder(cfg.data) if e.samples and env.is_rank0 else None

    done = start  # the last step finished, for an interruption to name
    try:
        metrics.start()
        for step in range(start + 1, t.max_steps + 1):
            batches = micro_batches(data, step, dims.dp_rank, dims.dp_size, micro, accum)
            run = functools.partial(
                train_step, model, optimizer, batches, precision, env, strategy, accum, cfg.optim.grad_clip
            )
            if step == memory_step:
                loss, grad_norm = metrics.measure_memory(model, optimizer, run, step, strategy.shards_state)
            else:
                loss, grad_norm = run()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            loss = loss.item()
            if not math.isfinite(loss):
                check_nonfinite(loss, step, t.on_nonfinite, ckpt_root, start, resumed_from)
            metrics.update(step, loss=loss, grad_norm=float(grad_norm), lr=lr)
            if step in evals:
                began = time.perf_counter()
                val = evaluate(
                    model, data, precision, env, dims, strategy, e.batches, t.global_batch_size, micro
                )
                metrics.record_eval(step, val, time.perf_counter() - began)
                if e.samples:
                    texts = samples(model, data, precision, dims, env.device, e.samples, e.sample_tokens,
                                    args.max_seq_len)  # fmt: skip
                    if env.is_rank0:
                        show_samples(texts, step, text_of, bar, loggers)
            if (row := metrics.log(step, final=step == t.max_steps)) is not None:
                loggers.log(row, step)
            bar.update(step, row)
            saved = checkpoint.maybe_save(
                cfg.checkpoint,
                ckpt_root,
                step,
                t.max_steps,
                model,
                optimizer,
                scheduler,
                ckpt_meta,
                tokenizer,
            )
            if step < t.max_steps and (sig := preempt.requested(env)) is not None:
                saved = saved or checkpoint.save(
                    ckpt_root,
                    step,
                    model,
                    optimizer,
                    scheduler,
                    cfg.checkpoint.keep_last,
                    ckpt_meta(),
                    tokenizer,
                )
                return RunSummary(status=PREEMPTED, signal=sig, step=step, checkpoint=str(saved))
            done = step
        bar.close()
        summary = metrics.summary()
        if (why := nonfinite_run(summary, t.max_steps - start)) is not None:
            if env.is_rank0:
                print(format_summary(summary), flush=True)
            raise NonFiniteLoss(why)
        if summary.pipeline:  # now with the bubble as measured over this run's steps after warm-up, and each
            # rank's peak memory (its stages')
            summary.pipeline = strategy.pipeline_facts(model, accum, cfg.metrics.warmup_steps)
            summary.pipeline["peak_memory_gb_by_rank"] = metrics.peak_memory_by_rank()
        loggers.summary(summary)
    except KeyboardInterrupt:
        signal.signal(
            signal.SIGINT, signal.SIG_IGN
        )  # a second one (the launcher passes it on) must not cut this short
        kept = checkpoint.complete_checkpoints(ckpt_root)
        raise preempt.Interrupted(
            f"interrupted at step {done}" + (f"; checkpoint {kept[-1][1]}" if kept else "")
        ) from None
    finally:
        bar.close()
        loggers.close()
    if env.is_rank0 and t.print_summary:
        print(format_summary(summary), flush=True)
    return summary


def build_metrics(
    cfg: DictConfig, env: DistEnv, dims, args, precision: Precision, run: RunSummary
) -> Metrics:
    # The run's metrics: FLOPs per token from the model's arguments, the memory planner's prediction for this
    # layout, and the record of what the run is, which its summary completes.
    t = cfg.trainer
    metrics = Metrics(
        device=env.device,
        flops_per_token=flops_per_token(args, t.seq_len),
        precision=cfg.precision.name,
        warmup_steps=cfg.metrics.warmup_steps,
        log_every=t.log_every,
        peak_tflops=cfg.metrics.peak_tflops,
        world_size=dims.world_size,
        rank=env.rank,
        tokens_per_step=t.global_batch_size * t.seq_len,
    )
    spec = spec_from_config(
        cfg.strategy, t, cfg.precision.name, cfg.optim, dims, env.device.type, cfg.finetune
    )
    plan = plan_for_run(args, spec)
    metrics.describe_run(run, precision, plan)
    # Every rank at once: MFU against this machine's measured matmul peak (cached, or probed now), and, where the
    # cache holds a full calibration of this device and world size, the time model's prediction of a step.
    metrics.measured_peak(
        *calibration.run_matmul_peak(env.device, peak_class(cfg.precision.name), dims.world_size)
    )
    record = calibration.load(env.device.type, dims.world_size)
    if plan is not None and record is not None and "collectives" in record:
        try:
            costs = model_costs(args, spec.micro_batch, spec.seq_len, spec.precision)
        except (
            ValueError
        ):  # a model the meta device cannot run (a Hugging Face one): no prediction, the run goes on
            costs = None
        if costs is not None:
            metrics.predicted(predict(args, spec, plan, record, costs))
    return metrics


def measured_step(enabled: bool, start: int, max_steps: int) -> int | None:
    # Which step metrics.memory_breakdown measures: the third of this run (or its last, if shorter). By
    # then the optimizer state exists and DDP has rebuilt its buckets, as in every later step. Default
    # metrics.warmup_steps (3) keeps the slower, tracked step out of the throughput figures.
    return start + min(3, max_steps - start) if enabled and max_steps > start else None


def show_samples(texts, step: int, text_of, bar: ProgressBar, loggers) -> None:
    rows = [{"prompt": text_of(prompt), "continuation": text_of(new)} for prompt, new in texts]
    for i, r in enumerate(rows, 1):
        bar.write(f"shardlab: sample {i} at step {step}: {r['prompt']!r} -> {r['continuation']!r}")
    loggers.samples(rows, step)


def check_nonfinite(loss: float, step: int, policy: str, ckpt_root: Path, start: int, resumed_from) -> None:
    # train_step already skipped the update (a non-finite loss never reaches the weights); "error" stops, naming
    # where to go back to: what this run saved, or, where it saved nothing since it resumed, the checkpoint it
    # resumed from (which may be where the trouble began: not called good).
    if policy == "error":
        saved = [(n, p) for n, p in checkpoint.complete_checkpoints(ckpt_root) if n > start]
        if saved:
            where = f"the last checkpoint this run saved is {saved[-1][1]}"
        elif resumed_from is not None:
            where = f"this run resumed from {resumed_from} at step {start} and saved no checkpoint since"
        else:
            where = "no checkpoint was saved"
        raise NonFiniteLoss(
            f"loss is {loss} at step {step}; {where}. Lower optim.lr, or set trainer.on_nonfinite=skip "
            "to skip such steps"
        )


def nonfinite_run(summary: RunSummary, steps: int) -> str | None:
    # trainer.on_nonfinite=skip kept the run going; it still failed if it ended on a non-finite loss or skipped most
    # of its steps (None: it did not). A few skipped steps are what skip is for: the summary counts them.
    skipped, final = summary.nonfinite_skipped_steps or 0, summary.final_loss
    if not skipped or (final is not None and math.isfinite(final) and 2 * skipped <= steps):
        return None
    return (
        f"the loss was non-finite at {skipped} of {steps} steps (trainer.on_nonfinite=skip skipped them) and the "
        f"final loss is {final:.4g}: lower optim.lr, or look for bad data"
    )
