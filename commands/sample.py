# Text from a checkpoint, under the tokenizer it was trained with (bytes, or the run's own, kept in the checkpoint):
#   python -m commands.sample outputs/<run>/ --prompt "def main(" --max-new-tokens 200 --temperature 0.8 --top-k 50
# A run directory (or its checkpoints/) gives its newest checkpoint. Temperature 0 is greedy, and gives what
# transformers' greedy generate gives on the model `commands.export` writes, token for token. One process on the
# device that is there (--device), the model whole: DCP reassembles every rank's shards.
import sys

import torch

from commands.cli import Parser
from commands.export import model_record, model_state, say_which, source
from launcher.errors import command_errors
from models import build_model
from models.generate import generate
from trainer.checkpoint_io import CheckpointError, verify
from trainer.dist import device_type

FIX = "give sample another checkpoint (an older step_XXXXXXXX of the same run, say)"


def load(checkpoint: str, device: str):
    # -> (the model in eval mode on the device, its tokenizer (bytes: the byte-level one), its arguments, the
    # checkpoint)
    path = source(checkpoint, "sample")
    say_which(path, checkpoint)
    try:
        verify(path)
    except CheckpointError as e:
        raise e.with_fix(FIX) from None
    args, tokenizer, model_cfg = model_record(path)
    if tokenizer is None:
        raise ValueError(f"checkpoint {path} was trained on synthetic tokens: there is no text to sample")
    with torch.device(device):
        model = build_model(args)
    model.load_state_dict(model_state(path, args, model_cfg), strict=True)  # LoRA: its base, adapters merged
    return model.eval(), tokenizer, args, path


def check(opts) -> None:
    if opts.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {opts.max_new_tokens}")
    if opts.temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or more, got {opts.temperature}")
    if opts.top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or more, got {opts.top_k}")
    if not 0 < opts.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {opts.top_p}")
    if opts.num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {opts.num_samples}")


def main(argv: list[str] | None = None) -> int:
    ap = Parser(
        prog="python -m commands.sample", description="text from a checkpoint or a run directory's newest"
    )
    ap.add_argument(
        "checkpoint", help="a checkpoint directory (or a run's checkpoints/ or run directory: its newest)"
    )
    ap.add_argument("--prompt", default="", help="the text to continue (default: none, from the first token)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens reaching p")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (a GPU if there is one), cuda or cpu")
    ap.add_argument("--debug", action="store_true", help="a traceback instead of one line on bad input")
    opts = ap.parse_args(sys.argv[1:] if argv is None else argv)
    with command_errors(opts.debug):
        check(opts)
        device = device_type(opts.device)
        model, tokenizer, args, _ = load(opts.checkpoint, device)
        eos = tokenizer.eos_token_id
        prompt = tokenizer(opts.prompt, add_special_tokens=False)["input_ids"]
        if len(prompt) >= args.max_seq_len:
            raise ValueError(
                f"--prompt is {len(prompt)} tokens, the model's window {args.max_seq_len}: shorten it"
            )
    # No prompt: start after an EOS, as every document of the data does.
    start = prompt or [eos if eos is not None else 0]
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    ids = torch.tensor([start] * opts.num_samples, device=device)
    out = generate(model, ids, opts.max_new_tokens, args.max_seq_len, opts.temperature, opts.top_k, opts.top_p,
                   generator, eos)  # fmt: skip
    for i, row in enumerate(out.tolist()):
        new = row[len(start) :]
        new = new[: new.index(eos)] if eos in new else new
        if opts.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(prompt + new, skip_special_tokens=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
