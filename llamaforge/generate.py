"""Token generation: sampling functions, prefill, one-token decode, `generate()` as a generator, and
`TextStream`, the one incremental detokenizer with stop strings (the CLI, `LLM` and the server use it).

The token loop takes token ids and gives token ids (nanochat `engine.py`); only `TextStream`
turns them into text, through the tokenizer it is given. Shapes
follow gpt-fast `generate.py`: prefill runs the whole prompt through the static KV cache in one
forward, then each step feeds one token at `input_pos`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .errors import LlamaforgeError


@dataclass
class SamplingConfig:
    """How to pick the next token. `temperature=0` (the default, as in transformers' `generate`) is greedy:
    small models answer best that way; pass a temperature (0.6-0.8) for varied text."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 0.9  # 1.0: off
    min_p: float = 0.0  # 0: off; drop tokens below min_p x the top token's probability (llama.cpp, HF)
    repetition_penalty: float = 1.0  # 1.0: off (CTRL-style, as HF/llama.cpp `repeat_penalty`)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's, -100..100)

    def __post_init__(self):
        self.logit_bias = parse_logit_bias(self.logit_bias)
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1) (0 turns it off), got {self.min_p}"),
            (all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias values must be in -100..100"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LlamaforgeError(f"invalid sampling value: {msg}")


def parse_logit_bias(bias) -> dict[int, float]:
    """{id: bias} from a dict (JSON's string keys too) or a CLI string: JSON, or "ID:BIAS,ID:BIAS"."""
    if isinstance(bias, str):
        text = bias.strip()
        try:
            bias = json.loads(text) if text.startswith("{") else dict(p.split(":") for p in text.split(",") if p.strip())
        except ValueError:
            raise LlamaforgeError(f"invalid logit_bias {text!r:.60}: write a JSON object or ID:BIAS,ID:BIAS") from None
    try:
        return {int(k): float(v) for k, v in (bias or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise LlamaforgeError(f"invalid logit_bias {bias!r:.60}: map token ids to numbers") from None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens by `penalty`. logits: (B, vocab)."""
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    big = torch.finfo(picked.dtype).max  # a tiny or huge penalty overflows to inf: keep the order, stay finite
    return logits.scatter(-1, seen, picked.clamp(-big, big))


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """Add bias[id] to column id of (B, vocab) logits (ids outside the vocabulary are an error)."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    if int(ids.max()) >= logits.size(-1) or int(ids.min()) < 0:
        raise LlamaforgeError(f"logit_bias names token ids outside 0..{logits.size(-1) - 1}")
    vals = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, vals.expand(logits.size(0), -1))


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> torch.Tensor:
    """(B, vocab) logits -> (B, vocab) probabilities after temperature, top-k, nucleus and min-p filtering.
    Numerically safe for any logits: NaN counts as -inf, +-inf as the largest finite float, so every row
    keeps at least one finite logit and sums to 1 (torch.multinomial rejects inf and NaN)."""
    big = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(logits.float() / max(temperature, 1e-5), nan=-big, posinf=big, neginf=-big)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, vocab) logits -> (B,) token ids."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def adjust_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None, constraint=None,
                  remaining: int | None = None) -> torch.Tensor:
    """(1, vocab) logits as `pick` samples them: repetition penalty over `seen` (1, n), logit_bias, then
    the constraint's mask (constrain.Constraint: a grammar, `remaining` tokens of budget left)."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.logit_bias:
        logits = apply_logit_bias(logits, cfg.logit_bias)
    if constraint is not None:
        logits = constraint.mask(logits, remaining)
    return logits


def pick(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
         seen: torch.Tensor | None = None, constraint=None, remaining: int | None = None) -> int:
    """One sequence's next token from its (1, vocab) logits: `adjust_logits`, then `sample`; the
    constraint then moves past the token, and may replace it to end in time."""
    token = int(sample(adjust_logits(logits, cfg, seen, constraint, remaining), cfg, generator))
    return token if constraint is None else constraint.advance(token, remaining)


def prefill(model, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Run the prompt (B, T) through the cache; return the last position's logits (B, vocab)."""
    return model(tokens, input_pos, last_only=True)[:, -1]


def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor, span: int | None = None) -> torch.Tensor:
    """One step: token (B, 1) at position input_pos (1,) -> logits (B, vocab), attending to `span` cache
    slots (default: the whole static cache, fixed shapes as torch.compile wants)."""
    return model(token, input_pos, span=span)[:, -1]


def decode_step(model, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """`decode_one_token` over the filled part of the cache only (rounded up: `Transformer.decode_span`)."""
    span = model.decode_span(int(input_pos.max())) if input_pos.dim() == 1 else None
    return decode_one_token(model, token, input_pos, span)


class TextStream:
    """Incremental detokenizer (TGI's prefix/read offsets) with stop strings: `push(token)` returns the
    text that became final, `flush()` the rest. A piece is released only once it is complete UTF-8
    and cannot be the beginning of a stop string; the text stops before the first stop string."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        if not self.stopped and self.read < len(self.ids):  # an incomplete UTF-8 tail: as the tokenizer decodes it
            before = self.tok.decode(self.ids[self.prefix:self.read])
            self.text += self.tok.decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, self.emitted - len(s) + 1))) >= 0]
        end = min(hits) if hits else (len(self.text) if final else len(self.text) - self.hold)
        self.stopped = bool(hits)
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences (lists or numpy arrays)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def cache_length(needed: int, limit: int) -> int:
    """Round cache sizes up so that consecutive calls reuse one allocation."""
    return min(limit, max(256, 1 << (needed - 1).bit_length()))


def keep_cache(model, batch: int, length: int, past: int) -> None:
    """`model.setup_caches(batch, length)`, keeping row 0's first `past` slots when the cache is reallocated."""
    if past and (model.max_batch_size < batch or model.max_seq_len < length):
        kept = model.read_cache(0, past)
        model.setup_caches(batch, length)
        model.write_cache(kept, 0)
    else:
        model.setup_caches(batch, length)


@torch.no_grad()
def generate(model, prompt: list[int], cfg: SamplingConfig, stop_ids: set[int] = frozenset(),
             decode=decode_step, constraint=None, past: int = 0, draft=None) -> Iterator[int]:
    """Yield new token ids one by one until a stop id, max_new_tokens, the context window or the
    constraint's grammar (constrain.Constraint) ends. `decode(model, token, input_pos)` runs one step:
    `decode_step` (through the model's forward: the fused native step where llamaforge.native installed
    it) or a compiled step.

    past: cache row 0 already holds the keys and values of prompt[:past] (a conversation cache, see
    llm.py): only the rest is prefilled. draft: a speculative.Drafter whose proposals are verified
    in one forward each (exact: the same tokens under greedy, the same distribution when sampling).
    Whatever the consumer stops at, the cache then holds prompt + the yielded tokens but the last."""
    ctx = model.config.max_seq_len
    T = len(prompt)
    if T == 0:
        raise LlamaforgeError("the prompt is empty: give at least one token")
    if T >= ctx:
        raise LlamaforgeError(f"the prompt is {T} tokens, but the model's context window is {ctx}: shorten the prompt")
    past = max(0, min(past, T - 1))  # at least one token runs, for its logits
    n_new = min(cfg.max_new_tokens, ctx - T)
    device = next(model.parameters()).device
    keep_cache(model, 1, cache_length(T + n_new + (draft.max_tokens if draft else 0), ctx), past)
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    seen = torch.tensor([prompt], device=device)
    logits = prefill(model, seen[:, past:], torch.arange(past, T, device=device))
    if draft is not None:
        yield from draft.run(model, logits, seen, cfg, gen, stop_ids, decode, constraint, n_new)
        return
    for i in range(n_new):
        t = pick(logits, cfg, gen, seen, constraint, n_new - i)
        yield t
        if t in stop_ids or i == n_new - 1 or (constraint is not None and constraint.done):
            return
        tok = torch.tensor([t], device=device)
        seen = torch.cat([seen, tok.view(1, 1)], dim=1)
        logits = decode(model, tok.view(1, 1), torch.tensor([T + i], device=device))
