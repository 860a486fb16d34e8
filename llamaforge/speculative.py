"""Speculative decoding, exact: a drafter proposes the next few tokens, the model checks them all in one
forward over the draft, and keeps the longest run it would have produced itself (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023).

Drafts here are deterministic (a point mass q), so the acceptance rule is: accept draft token d with
probability p(d) (p: the model's distribution after every sampling filter); on rejection, sample from p
with d removed. Each emitted token then has exactly the distribution p, and under greedy decoding the
output is token for token the plain output. The model's own sampling pipeline (`generate.adjust_logits`:
repetition penalty, logit_bias, a constraint's grammar mask) decides each position, so constrained
decoding composes: the grammar advances only over tokens kept.

Drafters:
- `PromptLookup`: the tokens that followed the last earlier occurrence of the context's final n-gram
  (transformers' `prompt_lookup_num_tokens`, Saxena 2023): free, and right when the answer quotes its
  prompt (RAG answers, code edits, "repeat this");
- `DraftModel`: greedy tokens of a smaller model with the same tokenizer, which keeps its own KV cache.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .errors import LlamaforgeError
from .generate import SamplingConfig, adjust_logits, common_prefix, logits_to_probs, pick


class Drafter:
    """Proposes up to `max_tokens` tokens continuing `ids`; told how many of them were kept."""
    max_tokens = 8

    def start(self, ids: list[int]) -> None:
        """A new generation over the context `ids` begins."""

    def propose(self, ids: list[int], n: int) -> list[int]:
        raise NotImplementedError

    def run(self, model, logits, seen, cfg, gen, stop_ids, decode, constraint, n_new):
        """The token loop with this drafter's proposals (`speculate`): generate.generate calls it, so the
        sampling module does not import this one."""
        return speculate(model, logits, seen, cfg, gen, stop_ids, decode, constraint, n_new, self)

    def kept(self, proposed: int, accepted: int) -> None:
        """Feedback after a verification: `accepted` of `proposed` draft tokens were kept."""


class PromptLookup(Drafter):
    """Draft the tokens that followed the most recent earlier occurrence of the context's last n tokens,
    for n from `ngram` down to `min_ngram`. The n-gram index grows with the context (O(1) per token).
    The draft length adapts: it grows while drafts are kept whole and shrinks when they are cut short;
    after a draft rejected outright, lookups pause for 1, 2, 4 ... 16 tokens (free text rarely repeats
    itself, and a rejected draft costs a forward over it)."""

    def __init__(self, max_tokens: int = 8, ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= ngram or max_tokens < 1:
            raise LlamaforgeError(f"prompt lookup needs 1 <= min_ngram <= ngram and max_tokens >= 1, got {min_ngram}, {ngram}, {max_tokens}")
        self.max_tokens, self.ngram, self.min_ngram = max_tokens, ngram, min_ngram
        self.n = max_tokens
        self._pause, self._skip = 0, 0  # after misses: lookups paused for _skip more tokens
        self._index: dict[tuple, int] = {}
        self._indexed = 0  # ids[:_indexed] are in the index (as n-gram starts whose n-gram ends before the last token)
        self._ids: list[int] = []

    def start(self, ids: list[int]) -> None:
        self._index, self._indexed, self._ids, self.n = {}, 0, [], self.max_tokens
        self._pause = self._skip = 0

    def _extend(self, ids: list[int]) -> None:
        if ids[:len(self._ids)] != self._ids:  # not a continuation: index again
            self._index, self._indexed = {}, 0
        self._ids = list(ids)
        # an n-gram starting at i is indexed once a token follows it: i + n < len(ids)
        for i in range(self._indexed, len(ids)):
            for n in range(self.min_ngram, self.ngram + 1):
                if i + n < len(ids):
                    self._index[(n, *ids[i:i + n])] = i + n  # where its continuation starts: the latest wins
        self._indexed = max(self._indexed, len(ids) - self.ngram)

    def propose(self, ids: list[int], n: int) -> list[int]:
        self._extend(ids)
        if self._skip > 0:
            self._skip -= 1
            return []
        n = min(n, self.n)
        for size in range(self.ngram, self.min_ngram - 1, -1):
            if len(ids) <= size:
                continue
            at = self._index.get((size, *ids[-size:]))
            if at is not None and at < len(ids):
                return ids[at:at + n]
        return []

    def kept(self, proposed: int, accepted: int) -> None:
        self.n = min(self.max_tokens, self.n + 2) if accepted == proposed else max(2, accepted + 1)
        self._pause = 0 if accepted else min(16, max(1, 2 * self._pause))
        self._skip = self._pause


class DraftModel(Drafter):
    """Greedy drafts from `model` (a smaller model with the same tokenizer; its own KV cache, reused
    across calls for the longest common prefix of the contexts)."""

    def __init__(self, model, max_tokens: int = 4):
        self.model, self.max_tokens = model, max_tokens
        self._ids: list[int] = []  # what the draft model's cache row 0 holds

    def start(self, ids: list[int]) -> None:
        self._ids = []

    @torch.no_grad()
    def propose(self, ids: list[int], n: int) -> list[int]:
        m = self.model
        device = next(m.parameters()).device
        ctx = m.config.max_seq_len
        n = min(n, ctx - len(ids))
        if n <= 0:
            return []
        if m.max_seq_len < len(ids) + n:
            m.setup_caches(1, min(ctx, max(256, 1 << (len(ids) + n - 1).bit_length())))
            self._ids = []
        past = common_prefix(self._ids, ids)
        past = min(past, len(ids) - 1)
        logits = m(torch.tensor([ids[past:]], device=device), torch.arange(past, len(ids), device=device), last_only=True)[:, -1]
        out = [int(logits.argmax(-1))]
        for i in range(n - 1):
            logits = m(torch.tensor([[out[-1]]], device=device), torch.tensor([len(ids) + i], device=device))[:, -1]
            out.append(int(logits.argmax(-1)))
        self._ids = ids + out[:-1]
        return out


def verify(row: torch.Tensor, draft: int, cfg: SamplingConfig, gen, seen, constraint, remaining: int) -> int:
    """The token kept at one position whose (1, vocab) logits are `row`, given the drafted token: the
    draft itself when the model agrees (greedy) or with probability p(draft) (sampling), else the
    model's own choice (greedy) or a sample from p without the draft. The constraint moves past it."""
    logits = adjust_logits(row, cfg, seen, constraint, remaining)
    if cfg.temperature == 0:
        token = int(logits.argmax(-1))
    else:
        p = logits_to_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)[0]
        if float(torch.rand(1, generator=gen, device=p.device)) < float(p[draft]):
            token = draft
        else:
            rest = p.clone()
            rest[draft] = 0.0
            token = int(torch.multinomial(rest / rest.sum(), 1, generator=gen)) if rest.sum() > 0 else draft
    return token if constraint is None else constraint.advance(token, remaining)


def speculate(model, logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig, gen, stop_ids, decode,
              constraint, n_new: int, draft: Drafter) -> Iterator[int]:
    """`generate`'s loop with drafts: `logits` (1, vocab) are the prompt's last, `seen` (1, T) the prompt.
    Each round feeds the newest token and the draft in one forward at their positions; the cache rows
    past the kept tokens hold rejected drafts, which later writes overwrite before anything reads them."""
    device = logits.device
    ids = seen[0].tolist()
    draft.start(ids)
    room = model.max_seq_len
    plain = cfg.temperature == 0 and cfg.repetition_penalty == 1.0 and not cfg.logit_bias and constraint is None
    made = 0

    def ended(t: int) -> bool:
        return t in stop_ids or made == n_new or (constraint is not None and constraint.done)

    token = pick(logits, cfg, gen, seen, constraint, n_new)
    made += 1
    yield token
    while not ended(token):
        ids.append(token)
        if cfg.repetition_penalty != 1.0:
            seen = torch.tensor([ids], device=device)
        pos = len(ids) - 1  # where `token` goes
        k = min(draft.max_tokens, n_new - made - 1, room - pos - 1)
        drafts = draft.propose(ids, k) if k > 0 else []
        if not drafts:
            logits = decode(model, torch.tensor([[token]], device=device), torch.tensor([pos], device=device))
            token = pick(logits, cfg, gen, seen, constraint, n_new - made)
            made += 1
            yield token
            continue
        rows = model(torch.tensor([[token, *drafts]], device=device), torch.arange(pos, pos + len(drafts) + 1, device=device))[0]
        best = rows.argmax(-1).tolist() if plain else None  # greedy without penalties: one argmax for all rows
        kept = 0
        for i, d in enumerate(drafts):
            token = best[i] if plain else verify(rows[i:i + 1], d, cfg, gen, seen, constraint, n_new - made)
            made += 1
            yield token
            if token != d or ended(token):
                break
            kept += 1
            ids.append(d)
            if cfg.repetition_penalty != 1.0:
                seen = torch.tensor([ids], device=device)
        draft.kept(len(drafts), kept)
        if kept == len(drafts) and not ended(token):  # all kept: the last row gives one more token
            token = pick(rows[-1:], cfg, gen, seen, constraint, n_new - made)
            made += 1
            yield token
