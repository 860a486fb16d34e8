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
