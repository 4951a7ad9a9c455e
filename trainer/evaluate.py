# Validation loss on held-out tokens: the same eval.batches batches of trainer.global_batch_size windows
# every time (trainer/data.py's val_rows), each rank evaluating its slice of each batch. The loss is the sum
# of every target token's cross-entropy and the count of those tokens, each all-reduced, then divided: the
# same number at any world size (a mean of per-rank means would not be). Eval mode, no gradients, the run's
# precision; micro-batches of the training micro-batch size, so memory stays what training needs.
import math

import torch
import torch.distributed as dist

from trainer.dist import DistEnv
from trainer.precision import Precision


def eval_steps(every: int, at_end: bool, start: int, max_steps: int, has_held_out: bool) -> set[int]:
    # The steps after which a run evaluates: every eval.every_n_steps-th, and the last one with eval.at_end.
    if not has_held_out:
        return set()
    steps = set(range(every, max_steps + 1, every)) if every else set()
    steps |= {max_steps} if at_end else set()
    return {s for s in steps if s > start}


def check_held_out(
    val_windows: int | None, seq_len: int, batches: int, global_batch: int, every: int = 0
) -> None:
    # Enough held-out windows for eval.batches batches (None: unbounded, synthetic data, or not known yet). None at
    # all is refused where eval.every_n_steps asks for validation; with eval.at_end alone (the default) the run
    # says in one line that it will not validate (no_validation_note).
    need = batches * global_batch
    if val_windows == 0 and every:
        raise ValueError(
            f"eval.every_n_steps={every} asks for validation, but the data holds out no window of {seq_len + 1} "
            "tokens: hold some out (data.val_fraction for data=text, --val-fraction of commands.prepare for "
            "data=tokens), or set eval.every_n_steps=0"
        )
    if val_windows and val_windows < need:
        raise ValueError(
            f"eval.batches={batches} of trainer.global_batch_size={global_batch} sequences needs {need} held-out "
            f"windows of {seq_len + 1} tokens, but the data holds {val_windows}: lower eval.batches, or "
            "hold out more (data.val_fraction for data=text, --val-fraction of commands.prepare for data=tokens)"
        )


def no_validation_note(seq_len: int) -> str:
    return (
        f"shardlab: no validation: the data holds out no window of {seq_len + 1} tokens (hold some out with "
        "data.val_fraction for data=text or --val-fraction of commands.prepare, or set eval.at_end=false)"
    )


@torch.no_grad()
def evaluate(
    model,
    data,
    precision: Precision,
    env: DistEnv,
    dims,
    strategy,
    batches: int,
    global_batch: int,
    micro: int,
) -> float:
    # -> the held-out loss, token-weighted over every batch and rank. dims: the run's ParallelDims; each
    # data-parallel rank evaluates its rows (tensor-parallel peers add the same sums to both totals).
    per_rank = global_batch // dims.dp_size
    rows = range(dims.dp_rank * per_rank, (dims.dp_rank + 1) * per_rank)
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, token count
    model.eval()
    try:
        for batch in range(batches):
            chunks = data.val_rows(batch, rows, global_batch).split(micro)
            totals += strategy.eval_sums(model, list(chunks), precision, env.device)
    finally:
        model.train()
    if env.distributed and env.world_size > 1:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float beyond ~709


PROMPT_TOKENS = 16  # a sample continues the first this-many tokens of a held-out window


@torch.no_grad()
def samples(model, data, precision: Precision, dims, device, n: int, new_tokens: int, max_seq_len: int):
    # -> [(prompt ids, continuation ids)] for the first n held-out windows, greedy and exactly new_tokens long, the
    # same on every rank: every rank runs every forward, as a sharded model needs (FSDP gathers, TP's sharded
    # logits are gathered whole). Eval mode, the run's precision.
    from models.generate import generate
    from strategies.base import as_tensor

    prompts = data.val_rows(0, range(n), n)[:, :PROMPT_TOKENS].to(device)

    def forward(ids):
        # Sequence parallelism splits the sequence over the tensor-parallel ranks, evenly or not at all (gloo): the
        # window is padded on the right to a multiple of tp, which no earlier position sees (causal attention).
        T = ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, -T % dims.tp))
        with precision.context():
            return as_tensor(model(ids))[:, :T]

    model.eval()
    try:
        out = generate(forward, prompts, new_tokens, max_seq_len)
    finally:
        model.train()
    return [(row[:PROMPT_TOKENS], row[PROMPT_TOKENS:]) for row in out.tolist()]
