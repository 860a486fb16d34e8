"""Continuous batching: many sequences decode together, one token each per step (Orca, vLLM).

Token ids in, token ids out: this module knows nothing of text or HTTP (nanochat `engine.py`).
One thread owns the model (and its KV caches: nothing else may use them while an engine runs).
Between two decode steps it runs jobs handed to it (`call`), drops finished, cancelled and
timed-out sequences, and admits waiting ones into free cache rows, prefilling those that arrived
together in one left-padded forward. Then one forward feeds every active sequence its last token
at its own position, through the model's per-row `input_pos` (B, 1), and each row samples with
its own settings and generator.

Active sequences stay packed in cache rows 0..n-1, so a step costs n rows, not the whole cache:
new sequences are prefilled into rows 0..k-1 after those rows' sequences move past the others,
and a finished sequence's row is filled by the last row's. A move copies only a row's filled prefix.

Prefix caching (vLLM's automatic prefix caching, SGLang's RadixAttention, llama.cpp's cache_prompt):
a finished sequence's keys and values go into a pool (`PrefixCache`, least recently used evicted
beyond a byte budget); a new prompt starts from the longest prefix it shares with a pooled or a
running sequence, copied into its row, and only the rest is prefilled. Two waiting prompts that
share a long prefix are not prefilled together: the second one starts from the first one's row.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import LlamaforgeError
from ..generate import SamplingConfig, common_prefix, pick

PREFILL_TOKENS = 2048  # most (padded) prompt tokens prefilled in one forward
SHARE_TOKENS = 32  # a waiting prompt sharing this many leading tokens with one being prefilled waits for it



def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fit_context(cfg, max_batch: int, kv_bytes: int, available: int, share: float = 0.5) -> int:
    """The model's context window, halved until `max_batch` sequences' KV caches fit in `share` of the
    available memory (at least 512 tokens, or the model's window when it is smaller)."""
    ctx = cfg.max_seq_len
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_bytes * max_batch  # keys and values, every row
    while available and ctx > 512 and ctx * per_token > share * available:
        ctx //= 2
    return ctx


def default_context(model, max_batch: int) -> int:
    """The context a server gives each of `max_batch` sequences when nobody said: the model's window,
    bounded by memory (`fit_context`; the caches take the model's float dtype, model.setup_caches)."""
    return fit_context(model.config, max_batch, model.norm.weight.element_size(), available_memory())


class PrefixCache:
    """Keys and values of finished sequences, keyed by their token ids, within `budget` bytes (least
    recently used evicted). Each entry is one whole sequence: an entry that another extends is replaced
    by the longer one. `lookup` returns the longest common prefix any entry shares with a prompt."""

    def __init__(self, budget: int):
        self.budget, self.bytes = budget, 0
        self.entries: collections.OrderedDict[tuple, tuple[np.ndarray, list, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, ids: list[int]) -> tuple[int, list | None]:
        """-> (n, kvs): the first n tokens of `ids` have keys and values kvs[layer] = (k, v), (1, h, >= n, d)."""
        best, key = 0, None
        a = np.asarray(ids)
        for k, (arr, _, _) in self.entries.items():
            n = common_prefix(arr, a)
            if n > best:
                best, key = n, k
        if key is None:
            return 0, None
        self.entries.move_to_end(key)
        return best, self.entries[key][1]

    def put(self, ids: list[int], read) -> None:
        """Pool the sequence `ids`; read() gives its per-layer (k, v) (called only if it is kept)."""
        key, a = tuple(ids), np.asarray(ids)
        for k, (arr, _, _) in list(self.entries.items()):
            n = common_prefix(arr, a)
            if n == len(a):  # already held (this or a longer sequence): just used
                self.entries.move_to_end(k)
                return
            if n == len(arr):  # the new sequence extends it
                self._drop(k)
        kvs = read()
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kvs)
        if size > self.budget:
            return
        self.entries[key] = (a, kvs, size)
        self.bytes += size
        while self.bytes > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple) -> None:
        self.bytes -= self.entries.pop(key)[2]


class QueueFull(Exception):
    """Every cache row is busy and the waiting line is at its limit: the caller should retry later."""


@dataclass
class Step:
    """One generated token, with its log-probability and the top alternatives when asked for."""
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Sequence:
    """One request: a prompt, its sampling settings, and the tokens produced so far.

    The engine calls `on_step(Step)` for each token and `on_step(None)` once at the end, from its
    own thread; without `on_step`, iterate the sequence to receive the steps (blocking).
    `finish_reason`: "stop" (a stop id, or the constraint's grammar is complete), "length",
    "cancelled" / any reason given to `cancel`, "timeout" or "error" (then `error` holds the exception).
    `constraint`: a constrain.Constraint (a grammar) that masks this sequence's tokens.
    """
    _ids = itertools.count()

    def __init__(self, prompt: list[int], sampling: SamplingConfig | None = None, stop_ids=frozenset(),
                 logprobs: int | None = None, timeout: float | None = None,
                 on_step: Callable[[Step | None], None] | None = None, constraint=None):
        self.id = next(self._ids)
        self.constraint = constraint
        self.prompt = [int(t) for t in prompt]
        self.sampling = sampling or SamplingConfig()
        self.stop_ids = frozenset(stop_ids)
        self.logprobs = logprobs  # None: off; k >= 0: the chosen token's logprob and the top k
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.arrived = time.monotonic()
        self.deadline = self.arrived + timeout if timeout else None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cancel: str | None = None
        self._steps: queue.SimpleQueue | None = None
        if on_step is None:
            self._steps = queue.SimpleQueue()
            on_step = self._steps.put
        self._on_step = on_step
        self.cached_tokens = 0  # leading prompt tokens whose keys and values came from the prefix cache
        self._gen: torch.Generator | None = None
        self._seen: torch.Tensor | None = None  # (1, n) prompt + output ids, for the repetition penalty

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the engine to stop this sequence before its next step (thread-safe)."""
        if self._cancel is None:
            self._cancel = reason

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def pos(self) -> int:
        """Where the next fed token goes: the last output token has not been through the model yet."""
        return len(self.prompt) + len(self.tokens) - 1

    def __iter__(self) -> Iterator[Step]:
        if self._steps is None:
            raise RuntimeError("this sequence reports through on_step; it cannot be iterated")
        while (step := self._steps.get()) is not None:
            yield step


class Engine:
    """Runs sequences on `model` with up to `max_batch` at once and `max_queue` more waiting."""

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None, max_queue: int = 64,
                 prefix_cache_bytes: int = 256 << 20):
        if max_batch < 1 or max_queue < 0 or prefix_cache_bytes < 0:
            raise LlamaforgeError(f"the engine needs max_batch >= 1, max_queue >= 0 and prefix_cache_bytes >= 0, got "
                                  f"{max_batch}, {max_queue} and {prefix_cache_bytes}")
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_seq_len = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.device = next(model.parameters()).device
        model.setup_caches(max_batch, self.max_seq_len)
        self.active: list[Sequence] = []  # active[i] lives in cache row i
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._jobs: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = True  # submit() works before start(): the sequences wait for the thread
        # steps, prompt_tokens (asked), prefilled_tokens (run), cached_tokens (reused), generated_tokens, finished_<reason>
        self.stats = collections.Counter()
        self.batch_sizes = collections.Counter()  # decode-step batch size -> count

    # ---- the caller's side (any thread) ----

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llamaforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finish every sequence as cancelled and end the thread."""
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a sequence; raise LlamaforgeError if it cannot fit, QueueFull if the line is full."""
        n = len(seq.prompt)
        if n == 0:
            raise LlamaforgeError("the prompt is empty: give at least one token")
        if n >= self.max_seq_len:
            raise LlamaforgeError(f"the prompt is {n} tokens, but the context window is {self.max_seq_len}")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in seq.prompt):
            raise LlamaforgeError(f"prompt token ids must be in 0..{vocab - 1}")
        with self._cond:
            if not self._running:
                raise LlamaforgeError("the engine is not running")
            if len(self.active) + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self.active)} sequences are running and {len(self.waiting)} waiting")
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn() on the engine thread between two steps (the model is never used by two threads)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self._running:
                raise LlamaforgeError("the engine is not running")
            self._jobs.append((fn, fut))
            self._cond.notify()
        return fut

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.active), len(self.waiting)

    # ---- the engine thread ----

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while self._running and not (self.active or self.waiting or self._jobs):
                        self._cond.wait()
                    if not self._running:
                        break
                    jobs, self._jobs = list(self._jobs), collections.deque()
                for fn, fut in jobs:
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as e:  # noqa: BLE001 - handed to the caller
                            fut.set_exception(e)
                try:
                    self._drop_finished()
                    self._admit()
                    if self.active:
                        self._decode_step()
                        self._drop_finished()
                except Exception as e:  # a bug or out of memory: fail what was running, keep serving
                    for seq in list(self.active):
                        seq.error = e
                    self._finish_all("error")
        with self._cond:
            rest = list(self.waiting)
            self.waiting.clear()
        for seq in rest + self.active:
            self._finish(seq, "cancelled")
        self.active = []
        for fn, fut in self._jobs:
            fut.cancel()

    def _expire_waiting(self) -> None:
        """Called under the lock: cancelled or timed-out sequences leave the waiting line."""
        now = time.monotonic()
        for seq in [s for s in self.waiting if s._cancel or (s.deadline and now > s.deadline)]:
            self.waiting.remove(seq)
            self._finish(seq, seq._cancel or "timeout")

    def _drop_finished(self) -> None:
        with self._cond:
            self._expire_waiting()
        now = time.monotonic()
        for i in reversed(range(len(self.active))):
            seq = self.active[i]
            reason = seq.finish_reason or seq._cancel or ("timeout" if seq.deadline and now > seq.deadline else None)
            if reason:
                if self.prefix_cache is not None and reason != "error" and seq.pos > 0:
                    self.prefix_cache.put((seq.prompt + seq.tokens)[:seq.pos], lambda: self.model.read_cache(i, seq.pos))
                self._release_row(i)
                self._finish(seq, reason)

    def _admit(self) -> None:
        """Move waiting sequences into free rows, prefilling together as many as PREFILL_TOKENS allows."""
        while len(self.active) < self.max_batch:
            with self._cond:
                group, longest = [], 0
                while self.waiting and len(self.active) + len(group) < self.max_batch:
                    n = max(longest, len(self.waiting[0].prompt))
                    if group and (n * (len(group) + 1) > PREFILL_TOKENS or self._shares(self.waiting[0], group)):
                        break
                    group.append(self.waiting.popleft())
                    longest = n
            if not group:
                return
            if not self._try_prefill(group) and len(group) > 1:
                for seq in group:  # one by one, so that a sequence's failure stays its own
                    self._try_prefill([seq])
            self._drop_finished()  # those done after one token

    def _shares(self, seq: Sequence, group: list[Sequence]) -> bool:
        """Whether `seq` should wait for a group member's prefill to reuse its prefix (identical prompts,
        a request's `n` choices, share one prefill anyway)."""
        if self.prefix_cache is None:
            return False
        a = np.asarray(seq.prompt)
        return any(g.prompt != seq.prompt and common_prefix(np.asarray(g.prompt), a) >= SHARE_TOKENS for g in group)

    def _reuse(self, seq: Sequence, row: int, sources: list[tuple[int, Sequence]]) -> int:
        """Fill cache `row` with the longest prefix of `seq.prompt` held by the pool or by a running
        sequence (`sources`: (row, sequence)); -> its length (at most the prompt's length - 1)."""
        if self.prefix_cache is None:
            return 0
        a = np.asarray(seq.prompt)
        best, kvs = self.prefix_cache.lookup(seq.prompt)
        src = None
        for r, other in sources:
            n = min(common_prefix(np.asarray((other.prompt + other.tokens)[:other.pos]), a), other.pos)
            if n > best:
                best, src = n, r
        best = min(best, len(seq.prompt) - 1)
        if best and src is not None:
            self.model.copy_cache(src, row, best)
        elif best:
            self.model.write_cache([(k[:, :, :best], v[:, :, :best]) for k, v in kvs], row)
        return best

    def _try_prefill(self, group: list[Sequence]) -> bool:
        """`_prefill`; if it fails, a single sequence fails with the error (a group is left to the caller)."""
        try:
            self._prefill(group)
            return True
        except Exception as e:  # noqa: BLE001 - these sequences fail, the others go on
            if len(group) == 1:
                group[0].error = e
                self._finish(group[0], "error")
            return False

    def _prefill(self, group: list[Sequence]) -> None:
        """Put `group` in rows 0..k-1 (their sequences move to the end), run the prompts, take first tokens.

        Each row first gets the longest prefix of its prompt that the prefix cache or a running row holds
        (`_reuse`, c_b tokens); the rest is run. Those rests are left-padded to one length T. Row b's pad
        columns take positions len_b, len_b + 1, ... (clamped to the cache's last slot): they write junk
        into cache slots that no query of this call can see (causal mask) and that decoding overwrites
        before reading, so the last column is every row's last prompt token. Sequences with
        the same prompt as an earlier one (a request's `n` choices) are not run: their rows get a copy
        of its cache row and its logits."""
        first: dict[tuple, Sequence] = {}
        for seq in group:
            first.setdefault(tuple(seq.prompt), seq)
        uniq = list(first.values())
        group = uniq + [s for s in group if first[tuple(s.prompt)] is not s]  # rows 0..u-1 run, the rest copy
        k, n, u = len(group), len(self.active), len(uniq)
        movers = self.active[:k]  # rows 0..k-1 are needed: their sequences go to the first free rows past both
        for i, seq in enumerate(movers):
            self.model.copy_cache(i, max(n, k) + i, seq.pos)
        self.active = group + self.active[k:] + movers
        try:
            running = list(enumerate(self.active))[k:]
            cached = [self._reuse(seq, b, running) for b, seq in enumerate(uniq)]
            T = max(len(s.prompt) - c for s, c in zip(uniq, cached))
            ids = torch.zeros(u, T, dtype=torch.long)
            pos = torch.zeros(u, T, dtype=torch.long)
            last = self.model.max_seq_len - 1
            for b, (seq, c) in enumerate(zip(uniq, cached)):
                L = len(seq.prompt)
                ids[b, T - (L - c):] = torch.tensor(seq.prompt[c:])
                pos[b] = torch.cat([torch.arange(L, L + T - (L - c)).clamp(max=last), torch.arange(c, L)])
                seq.cached_tokens = c
            logits = self.model(ids.to(self.device), pos.to(self.device), last_only=True)[:, -1]  # (u, vocab)
        except BaseException:
            for i in reversed(range(k)):
                self._release_row(i)
            raise
        row = {id(s): b for b, s in enumerate(uniq)}
        src = [row[id(first[tuple(s.prompt)])] for s in group]  # the row each sequence's prompt ran in
        for b in range(u, k):
            self.model.copy_cache(src[b], b, len(group[b].prompt))
        logits = logits[src]  # (k, vocab)
        for b in range(u, k):
            group[b].cached_tokens = group[src[b]].cached_tokens
        self.stats["prompt_tokens"] += sum(len(s.prompt) for s in uniq)
        self.stats["cached_tokens"] += sum(cached)
        self.stats["prefilled_tokens"] += sum(len(s.prompt) for s in uniq) - sum(cached)
        self.stats["prefills"] += 1
        for b, seq in enumerate(group):
            try:
                if seq.sampling.seed is not None:
                    seq._gen = torch.Generator(device=self.device).manual_seed(seq.sampling.seed)
                if seq.sampling.repetition_penalty != 1.0:
                    seq._seen = torch.tensor([seq.prompt], device=self.device)
                self._take(seq, logits[b])
            except Exception as e:  # noqa: BLE001 - this row fails (it leaves at the next _drop_finished), the others go on
                seq.error, seq.finish_reason = e, "error"

    def _decode_step(self) -> None:
        seqs = [s for s in self.active]
        toks = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)  # (B, 1)
        pos = torch.tensor([[s.pos] for s in seqs], device=self.device)  # (B, 1)
        logits = self.model(toks, pos)[:, -1]  # (B, vocab)
        self.stats["steps"] += 1
        self.batch_sizes[len(seqs)] += 1
        greedy = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            cfg = seq.sampling
            plain = cfg.temperature == 0 and cfg.repetition_penalty == 1.0 and not cfg.logit_bias and seq.constraint is None
            try:
                self._take(seq, logits[i], greedy[i] if plain else None)
            except Exception as e:  # noqa: BLE001 - as in _prefill: this row fails, the others go on
                seq.error, seq.finish_reason = e, "error"

    def _take(self, seq: Sequence, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample the next token of `seq` from its (vocab,) logits, report it, and mark the end."""
        cfg = seq.sampling
        if token is None:
            left = min(cfg.max_new_tokens - len(seq.tokens), self.max_seq_len - len(seq.prompt) - len(seq.tokens))
            try:
                token = pick(logits[None], cfg, seq._gen, seq._seen, seq.constraint, left)
            except LlamaforgeError as e:  # a broken grammar state or a bad logit_bias: this sequence fails alone
                seq.error, seq.finish_reason = e, "error"
                return
        if seq._seen is not None:
            seq._seen = torch.cat([seq._seen, torch.tensor([[token]], device=self.device)], dim=1)
        step = Step(token)
        if seq.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            step.logprob = float(lp[token])
            if seq.logprobs > 0:
                top = torch.topk(lp, min(seq.logprobs, lp.numel()))
                step.top = list(zip(top.indices.tolist(), top.values.tolist()))
        if token in seq.stop_ids:
            seq.finish_reason = "stop"  # the stop token itself is not reported
            return
        seq.tokens.append(token)
        self.stats["generated_tokens"] += 1
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        seq._on_step(step)
        if len(seq.tokens) >= cfg.max_new_tokens or seq.pos + 1 >= self.max_seq_len:
            seq.finish_reason = "length"
        if seq.constraint is not None and seq.constraint.done:
            seq.finish_reason = "stop"

    def _release_row(self, i: int) -> None:
        """Free row i: the last row's sequence moves into it."""
        last = len(self.active) - 1
        if i != last:
            self.model.copy_cache(last, i, self.active[last].pos)
            self.active[i] = self.active[last]
        self.active.pop()

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finished_at is not None:
            return
        seq.finish_reason = reason
        seq.finished_at = time.monotonic()
        self.stats[f"finished_{seq.finish_reason}"] += 1
        seq._on_step(None)

    def _finish_all(self, reason: str) -> None:
        for seq in self.active:
            self._finish(seq, reason)
        self.active = []
