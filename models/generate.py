# Text from a model, one token at a time: greedy (temperature 0) or sampled with temperature, top-k and top-p
# (nucleus). Used by commands/sample.py and by validation's samples (eval.samples). The whole window is run again
# for each token (no KV cache): the models here are trained at a few hundred tokens, and the same forward serves
# every strategy, sharded ones included, unchanged. Greedy picks what transformers' greedy generate picks on the
# exported model (a test holds them token for token).
import torch


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    # prompt: (B, T) token ids -> (B, T + n) with n <= max_new_tokens. With eos_id, a row stops once it has written
    # EOS (it is kept) and the others go on; the ids after a row's EOS are EOS. Without it, exactly max_new_tokens.
    ids = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_seq_len:])[:, -1, :].float()  # (B, vocab)
        nxt = pick(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return ids


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # The smallest set of tokens, most likely first, whose probabilities reach top_p (the first always kept).
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
