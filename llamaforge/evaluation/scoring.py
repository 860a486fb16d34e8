"""Batched log-likelihood scoring and batched greedy generation over a built `Transformer`.

Token ids in, numbers (or token ids) out: this module knows nothing of tasks or text.

Scoring packs each *group* of requests (one benchmark item: its 2-5 choices) into one row as a
prefix tree: the tokens every choice shares are run once, then each choice's own suffix, with a
tree attention mask (a suffix sees the shared prefix and itself, never a sibling) and per-token
positions (every suffix restarts at the prefix's end). Rows of many items are batched, sorted by
length so padding stays small, and the output projection runs only where a token is scored.
Tokens shared by *all* groups of one call (MMLU's 5-shot header) are run once per call and kept as
a key/value past. This is what lm-evaluation-harness computes request by request, without the
repeated context: a 2-choice PIQA item costs its context once instead of twice.

Everything runs through the model's own forward (`Transformer.forward` with per-row positions, an
explicit mask and cache slots, `hidden=True`), so weight swaps (quantized Linear, LoRA) apply
unchanged. The KV cache is sized for each batch and freed at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..generate import common_prefix

MIN_SHARED = 32  # a call-wide shared prefix shorter than this is not worth a separate past


@dataclass
class Request:
    """Score `tokens[start:]` given `tokens[:start]` (1 <= start < len(tokens))."""
    tokens: list[int]
    start: int


@dataclass
class Score:
    logprob: float  # sum of log p(token | preceding tokens) over the scored tokens
    n_tokens: int
    greedy: bool  # every scored token was the argmax


def run_rows(model, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
             past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """tokens, pos: (B, T); mask: (B, 1, T, S + T) bool over [past (S slots); these tokens].
    -> final-norm hidden states (B, T, dim). The cache is set up for exactly this batch, the past
    (per layer (1, n_kv_heads, S, head_dim)) copied into every row."""
    B, T = tokens.shape
    S = past[0][0].size(2) if past else 0
    model.setup_caches(B, S + T, exact=True)
    if past:
        model.write_cache(past, slice(0, B))
    slots = torch.arange(S, S + T, device=tokens.device)
    return model(tokens, pos, mask=mask, slots=slots, hidden=True)


def token_logprobs(model, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk: int = 256):
    """hidden (N, dim) at distinct positions; rows, targets (M,): log p(target | the position `rows[m]`)
    (M,) and whether the target is that position's argmax. A position shared by several choices
    (their common prefix) runs the output layer once."""
    lp = torch.empty(rows.size(0), device=hidden.device)
    greedy = torch.empty(rows.size(0), dtype=torch.bool, device=hidden.device)
    for i in range(0, hidden.size(0), chunk):
        logits = model.output(hidden[i:i + chunk]).float()  # (n, vocab)
        lse, best = torch.logsumexp(logits, -1), logits.argmax(-1)
        sel = ((rows >= i) & (rows < i + chunk)).nonzero()[:, 0]
        r, t = rows[sel] - i, targets[sel]
        lp[sel] = logits[r, t] - lse[r]
        greedy[sel] = best[r] == t
    return lp, greedy


def shared_prefix(seqs: list[list[int]]) -> int:
    """Length of the prefix all of `seqs` share."""
    return min([len(seqs[0])] + [common_prefix(seqs[0], s) for s in seqs[1:]])


@dataclass
class _Row:
    """One group packed as a prefix tree (indices relative to the call-wide shared prefix S)."""
    tokens: list[int]
    pos: list[int]
    seg: list[int]  # 0: the group's shared prefix, k + 1: request k's own suffix
    where: list[list[int]]  # per request: row index of the input predicting each scored token
    targets: list[list[int]]


def pack_group(group: list[Request], shared: int) -> _Row:
    """Request k's inputs are tokens[:-1]; its target tokens[j] (j >= start) is predicted at input j - 1,
    which lies in the group's common prefix (run once) or in k's own suffix."""
    inputs = [r.tokens[:-1] for r in group]
    p = max(shared_prefix(inputs), shared)
    tokens, pos, seg = list(inputs[0][shared:p]), list(range(shared, p)), [0] * (p - shared)
    where, targets = [], []
    for k, (r, x) in enumerate(zip(group, inputs)):
        off = len(tokens)
        tokens += x[p:]
        pos += range(p, len(x))
        seg += [k + 1] * (len(x) - p)
        idx = range(r.start - 1, len(x))
        where.append([i - shared if i < p else off + i - p for i in idx])
        targets.append(r.tokens[r.start:])
    return _Row(tokens, pos, seg, where, targets)


def batch_rows(rows: list[_Row], shared: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows into (B, T) tokens and positions and a (B, 1, T, shared + T) tree mask."""
    T = max(len(r.tokens) for r in rows)
    B = len(rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        tokens[b, :n] = torch.tensor(r.tokens)
        pos[b, :n] = torch.tensor(r.pos)
        seg[b, :n] = torch.tensor(r.seg)
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])  # (B, T query, T key)
    tree = same & (pos[:, None, :] <= pos[:, :, None]) & (seg[:, None, :] >= 0)
    tree |= torch.eye(T, dtype=torch.bool)  # padding attends to itself: no all-masked row
    mask = torch.cat([torch.ones(B, T, shared, dtype=torch.bool), tree], dim=2)[:, None]
    return tokens.to(device), pos.to(device), mask.to(device)


def _batches(lengths: list[int], batch_tokens: int, batch_size: int | None) -> Iterable[list[int]]:
    """Indices grouped into batches, longest first, each within `batch_tokens` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    i = 0
    while i < len(order):
        width, j = lengths[order[i]], i + 1
        while j < len(order) and (j - i + 1) * width <= batch_tokens and (batch_size is None or j - i < batch_size):
            j += 1
        yield order[i:j]
        i = j


@torch.no_grad()
def score_groups(model, groups: list[list[Request]], batch_tokens: int = 4096, batch_size: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[list[Score]]:
    """Log-likelihood of every request, one row per group; `progress(n_groups_done, n_tokens_run)`."""
    device = next(model.parameters()).device
    for g in groups:
        for r in g:
            if not 1 <= r.start < len(r.tokens):
                raise ValueError(f"a request scores tokens[{r.start}:] of {len(r.tokens)} tokens: nothing to score")
    flat = [r for g in groups for r in g]
    shared = min(shared_prefix([r.tokens[:-1] for r in flat]), min(r.start for r in flat) - 1) if flat else 0
    try:
        return _score(model, groups, flat, shared, device, batch_tokens, batch_size, progress)
    finally:
        model.clear_caches()


def _score(model, groups, flat, shared, device, batch_tokens, batch_size, progress) -> list[list[Score]]:
    past = None
    if shared >= MIN_SHARED and len(groups) > 1:
        ids = torch.tensor([flat[0].tokens[:shared]], device=device)
        mask = torch.ones(1, 1, shared, shared, dtype=torch.bool, device=device).tril()
        run_rows(model, ids, torch.arange(shared, device=device)[None], mask)
        past = model.read_cache(0, shared)
        if progress:
            progress(0, shared)
    else:
        shared = 0
    rows = [pack_group(g, shared) for g in groups]
    out: list[list[Score]] = [[] for _ in groups]
    for idx in _batches([len(r.tokens) for r in rows], batch_tokens, batch_size):
        batch = [rows[i] for i in idx]
        tokens, pos, mask = batch_rows(batch, shared, device)
        hidden = run_rows(model, tokens, pos, mask, past)
        pairs = [(b, t) for b, r in enumerate(batch) for w in r.where for t in w]
        where = {p: i for i, p in enumerate(dict.fromkeys(pairs))}  # distinct positions, in order
        b_idx, t_idx = zip(*where)
        targets = torch.tensor([t for r in batch for ts in r.targets for t in ts], device=device)
        rows_of = torch.tensor([where[p] for p in pairs], device=device)
        lp, greedy = token_logprobs(model, hidden[list(b_idx), list(t_idx)], rows_of, targets)
        lp, greedy = lp.tolist(), greedy.tolist()
        k = 0
        for i, r in zip(idx, batch):
            for ts in r.targets:
                n = len(ts)
                out[i].append(Score(sum(lp[k:k + n]), n, all(greedy[k:k + n])))
                k += n
        if progress:
            progress(len(idx), sum(len(r.tokens) for r in batch))
    return out


@torch.no_grad()
def generate_greedy(model, prompts: list[list[int]], max_new_tokens: int, is_done: Callable[[list[int]], bool],
                    batch_tokens: int = 4096, batch_size: int | None = 64,
                    progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of many prompts, batched, each stopping when `is_done(new_ids)`.

    Rows are right-padded; each keeps its own positions, and the mask hides the padding between
    a row's prompt and the tokens it generates (all rows write new tokens to the same cache slots).
    """
    try:
        return _generate_greedy(model, prompts, max_new_tokens, is_done, batch_tokens, batch_size, progress)
    finally:
        model.clear_caches()


def _generate_greedy(model, prompts, max_new_tokens, is_done, batch_tokens, batch_size, progress) -> list[list[int]]:
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    for idx in _batches([len(p) + max_new_tokens for p in prompts], batch_tokens, batch_size):
        rows = [prompts[i] for i in idx]
        B, N = len(rows), max(len(r) for r in rows)
        n = torch.tensor([len(r) for r in rows], device=device)  # (B,)
        tokens = torch.zeros(B, N, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = torch.tensor(r)
        cols = torch.arange(N, device=device)
        mask = (cols[None, None, :] <= cols[None, :, None]) & (cols[None, None, :] < n[:, None, None])
        mask = (mask | torch.eye(N, dtype=torch.bool, device=device))[:, None]  # (B, 1, N, N)
        model.setup_caches(B, N + max_new_tokens, exact=True)
        hidden = model(tokens, cols.expand(B, N), mask=mask, slots=cols, hidden=True)
        last = hidden[torch.arange(B), n - 1]  # (B, dim)
        done = [False] * B
        new: list[list[int]] = [[] for _ in rows]
        for step in range(max_new_tokens):
            nxt = model.output(last).argmax(-1)  # (B,)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    new[b].append(t)
                    done[b] = is_done(new[b])
            if all(done) or step == max_new_tokens - 1:
                break
            S = N + step  # slots filled so far; this token goes to slot S
            cols = torch.arange(S + 1, device=device)
            keep = (cols[None, :] < n[:, None]) | (cols >= N)  # (B, S + 1): the prompt and the new tokens
            hidden = model(nxt[:, None], (n + step)[:, None], mask=keep[:, None, None, :],
                           slots=torch.tensor([S], device=device), hidden=True)
            last = hidden[:, -1]
        for i, r in zip(idx, new):
            out[i] = r
        if progress:
            progress(len(idx), sum(len(r) for r in rows) + sum(len(r) for r in new))
    return out
