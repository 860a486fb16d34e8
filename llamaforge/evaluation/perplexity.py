"""Perplexity over a text file with a sliding window, so quantization quality is measured.

Each window of `window` tokens advances by `stride`; only tokens not scored by an earlier window
are scored, each with up to `window - stride` tokens of context (the transformers perplexity guide's
strided evaluation; stride == window gives llama.cpp's disjoint chunks).
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

from ..errors import LlamaforgeError


@torch.no_grad()
def perplexity(llm, ids: list[int], window: int | None = None, stride: int | None = None, progress: bool = False) -> dict:
    """Mean negative log-likelihood (nats/token) and perplexity of `ids` under `llm`."""
    window = window or min(llm.config.max_seq_len, 1024)
    stride = stride or window // 2
    if not 0 < stride <= window <= llm.config.max_seq_len:
        raise LlamaforgeError(f"need 0 < stride ({stride}) <= window ({window}) <= context ({llm.config.max_seq_len})")
    if len(ids) < 2:
        raise LlamaforgeError("the text is too short: need at least 2 tokens to score")
    device = next(llm.model.parameters()).device
    nll, scored, done = 0.0, 0, 1  # token 0 has no context: never scored
    t0 = time.perf_counter()
    begin = 0
    while done < len(ids):
        end = min(begin + window, len(ids))
        chunk = torch.tensor(ids[begin:end], device=device)[None]
        logits = llm.model(chunk)[0].float()  # (T, vocab)
        first = done - begin  # first position in the chunk that still needs a score
        targets = chunk[0, first:]
        nll += F.cross_entropy(logits[first - 1:-1], targets, reduction="sum").item()
        scored += targets.numel()
        done = end
        if progress:
            rate = scored / (time.perf_counter() - t0)
            eta = (len(ids) - done) / max(rate, 1e-9)
            print(f"\r[{done}/{len(ids)} tokens] ppl {math.exp(nll / scored):.4f}  {rate:.0f} tok/s  ETA {eta:.0f}s",
                  end="", file=sys.stderr, flush=True)
        begin = min(begin + stride, done - 1)  # at least one token of context for the next window's first target
    if progress:
        print(file=sys.stderr)
    secs = time.perf_counter() - t0
    mean = nll / scored
    return {"tokens": scored, "nll": mean, "ppl": math.exp(mean), "window": window, "stride": stride,
            "seconds": round(secs, 3), "tokens_per_s": round(scored / secs, 1)}


# A fixed, varied English sample (prose, a list, numbers, a little code) for `quantize`'s quality check:
# the same text every time, so the figures of two quantized files compare.
CHECK_TEXT = """The river rises in the hills north of the town and runs south for forty miles before it reaches the sea.
In the spring, when the snow melts, it floods the low meadows along its banks, and the farmers move their
sheep to higher ground. The old stone bridge, built in 1742, has survived every flood so far.

To make bread you need flour, water, salt and yeast. Mix them into a dough, knead it for ten minutes, let it
rise for an hour, shape it, let it rise again, and bake it at 220 degrees Celsius for about thirty minutes.

Question: What is the capital of France?
Answer: The capital of France is Paris, which is also its largest city.

def mean(values):
    return sum(values) / len(values)

The committee met on Tuesday to review the budget. Spending on roads rose by 4 percent, while the library
received a small increase to extend its opening hours on weekends. A decision on the new school was delayed."""


@torch.no_grad()
def compare(reference, candidate, ids: list[int]) -> dict:
    """How far `candidate`'s next-token distributions are from `reference`'s on `ids` (two models, one
    tokenizer): both perplexities, the change, mean and max KL(reference || candidate) per token, and how
    often their top tokens agree. Both are called as `model(ids)` -> (1, T, vocab) logits."""
    x = torch.tensor([ids])
    lp_ref = torch.log_softmax(reference(x.to(_device(reference)))[0].float().cpu(), -1)[:-1]  # (T-1, vocab)
    lp_new = torch.log_softmax(candidate(x.to(_device(candidate)))[0].float().cpu(), -1)[:-1]
    y = x[0, 1:, None]
    nll_ref, nll_new = -lp_ref.gather(-1, y).mean().item(), -lp_new.gather(-1, y).mean().item()
    kl = (lp_ref.exp() * (lp_ref - lp_new)).sum(-1)  # (T-1,)
    return {"tokens": len(ids) - 1, "ppl_reference": math.exp(nll_ref), "ppl": math.exp(nll_new),
            "ppl_change": math.exp(nll_new - nll_ref) - 1, "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1_agree": (lp_ref.argmax(-1) == lp_new.argmax(-1)).float().mean().item()}


def _device(model) -> torch.device:
    return next(model.parameters()).device
