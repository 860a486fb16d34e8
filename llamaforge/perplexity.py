"""Perplexity over a text file with a sliding window, so quantization quality is measured.

Each window of `window` tokens advances by `stride`; only tokens not scored by an earlier window
are scored, each with up to `window - stride` tokens of context (the transformers perplexity guide's
strided evaluation; stride == window gives llama.cpp's disjoint chunks).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import LlamaforgeError


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


def cmd_perplexity(args) -> None:
    from .cli import _load
    path = Path(args.file)
    if not path.is_file():
        raise LlamaforgeError(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlamaforgeError(f"{path} is not UTF-8 text") from None
    llm = _load(args)
    ids = llm._need_tokenizer().encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    res = perplexity(llm, ids, args.window, args.stride, progress=True)
    res.update(model=str(args.model), file=str(path), quantize=args.quantize)
    print(f"{res['tokens']} tokens  nll {res['nll']:.4f} nats/token  ppl {res['ppl']:.4f}  ({res['tokens_per_s']} tok/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


def add_commands(sub) -> None:
    from .cli import add_model_flags
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file (nats/token and ppl)")
    add_model_flags(p)
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: min(context, 1024))")
    p.add_argument("--stride", type=int, default=None, help="window step (default: window / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_perplexity)
