"""Fine-tuning data: JSONL lines -> token ids with target masks -> padded rows, in a seeded order.

The format is told apart per line: chat (`{"messages": [{"role", "content"}, ...]}`, the OpenAI
shape, with OpenAI's optional `"weight": 0` on assistant turns that are context only, as Ghost
Attention's earlier turns), instruction (`instruction` / optional `input` / `output`, one user and
one assistant turn), plain `text`, or a preference (`prompt` / `chosen` / `rejected`, for DPO and
reward models). Chat and instruction lines go through the model's chat format (chat.py) and train
only on the assistant's tokens; text lines train on every token. Every line is read, checked and
encoded before anything is written; a bad one is reported as file:line.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LlamaforgeError
from .loop import IGNORE


@dataclass
class Example:
    where: str  # file:line
    ids: list[int]
    mask: list[bool]  # mask[i]: token i is a training target (predicted from ids[:i])


def read_jsonl(path: str | Path) -> list[tuple[str, object]]:
    """-> [(file:line, parsed object or a ValueError)] for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise LlamaforgeError(f"no such data file: {path}")
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not _valid_unicode(rec):  # JSON's "\ud800" escapes make strings no tokenizer encodes
                    rec = ValueError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode")
                out.append((f"{path}:{i}", rec))
            except ValueError as e:
                out.append((f"{path}:{i}", ValueError(f"not valid JSON ({e})")))
            except RecursionError:
                out.append((f"{path}:{i}", ValueError("not valid JSON (it nests too deeply)")))
    return out


def _valid_unicode(rec) -> bool:
    stack = [rec]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            stack += x
    return True


def line_format(rec) -> str:
    """chat | instruction | text | pref, told from the keys of one line."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        return "chat"
    if "instruction" in rec and "output" in rec:
        return "instruction"
    if "text" in rec:
        return "text"
    if {"prompt", "chosen", "rejected"} <= set(rec):
        return "pref"
    raise ValueError(f"unknown line format (keys {sorted(rec)[:6]}): expected messages, instruction/output, text, "
                     "or prompt/chosen/rejected")


def _strings(rec: dict, *keys: str) -> None:
    for k in keys:
        if not isinstance(rec.get(k, ""), str):
            raise ValueError(f"{k!r} must be a string")


def encode_sft(rec, tok, chat, broken: str | None = None) -> tuple[list[int], list[bool]]:
    """One SFT line -> (ids, target mask): assistant tokens for chat/instruction, all tokens for text.
    `broken`: why the model's own chat template cannot be used (`LLM.chat_format_error`), when it cannot."""
    fmt = line_format(rec)
    if fmt == "text":
        _strings(rec, "text")
        if not rec["text"]:
            raise ValueError("empty text")
        ids = tok.encode(rec["text"]) + ([tok.eos_id] if tok.eos_id is not None else [])
        return ids, [False] + [True] * (len(ids) - 1)
    if fmt == "pref":
        raise ValueError("a preference line (prompt/chosen/rejected) in SFT data: use `llamaforge dpo`")
    if fmt == "instruction":
        _strings(rec, "instruction", "input", "output")
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    else:
        messages = rec["messages"]
        if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise ValueError("'messages' needs at least one assistant message to learn from")
    if chat is None:
        raise ValueError(broken or "a chat line, but the model has no chat format: pass --chat-format chatml|llama2|llama3")
    weights = [_weight(m) for m in messages]
    messages = [{k: v for k, v in m.items() if k != "weight"} if isinstance(m, dict) else m for m in messages]
    try:
        ids, mask = chat.encode(messages, add_generation_prompt=False)
        for j, w in enumerate(weights):
            if w == 0:  # this assistant turn is context: its tokens (and end of turn) are no target
                start = _shared(chat.encode_prompt(messages[:j]), ids)
                end = _shared(chat.encode(messages[:j + 1], add_generation_prompt=False)[0], ids)
                mask[start:end] = [False] * (end - start)
    except LlamaforgeError as e:
        raise ValueError(str(e)) from None
    if not any(mask):
        raise ValueError("every assistant turn has weight 0: nothing to train on")
    return ids, mask


def _weight(m) -> int:
    """An assistant message's `weight` (OpenAI's fine-tuning field): 1 trains it (default), 0 keeps it as context."""
    if not isinstance(m, dict) or "weight" not in m:
        return 1
    if m.get("role") != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
        raise ValueError(f"'weight' is 0 or 1 on assistant messages only; got {m['weight']!r} on a {m.get('role')!r} message")
    return m["weight"]


def _shared(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def encode_pref(rec, tok, chat, broken: str | None = None) -> tuple[list[int], list[bool], list[int], list[bool]]:
    """One preference line -> (chosen ids, chosen targets, rejected ids, rejected targets): the targets
    are the completion's tokens (and its end of turn) after the shared prompt."""
    if line_format(rec) != "pref":
        raise ValueError("DPO lines need prompt, chosen and rejected")
    _strings(rec, "chosen", "rejected")
    prompt = rec["prompt"]
    out = []
    for answer in (rec["chosen"], rec["rejected"]):
        if chat is None:
            if broken:  # the model has a chat template, and it is unusable: no silent fallback to plain text
                raise ValueError(broken)
            if not isinstance(prompt, str):
                raise ValueError("'prompt' must be a string for a model without a chat format")
            p = tok.encode(prompt)
            ids = p + tok.encode(answer, bos=False) + ([tok.eos_id] if tok.eos_id is not None else [])
            out += [ids, [False] * len(p) + [True] * (len(ids) - len(p))]
            continue
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            head = chat.encode_prompt(msgs)
            ids, mask = chat.encode(list(msgs) + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        except LlamaforgeError as e:
            raise ValueError(str(e)) from None
        shared = _shared(head, ids)
        out += [ids, [m and i >= shared for i, m in enumerate(mask)]]
    return tuple(out)


def load_examples(path: str | Path, encode, seq_len: int, on_bad_line: str = "stop") -> list:
    """Read, check and encode every line; a bad one (malformed, no target, longer than `seq_len`) is
    reported as file:line and stops everything (before any file is written) or is skipped."""
    bad, out = [], []
    for where, rec in read_jsonl(path):
        try:
            if isinstance(rec, ValueError):
                raise rec
            enc = encode(rec)
            seqs = [(enc[i], enc[i + 1]) for i in range(0, len(enc), 2)]
            for ids, mask in seqs:
                if len(ids) - 1 > seq_len:
                    raise ValueError(f"{len(ids)} tokens, longer than the {seq_len}-token context (--seq-len): "
                                     "shorten it or raise --seq-len")
                if not any(mask[1:]):
                    raise ValueError("no tokens to train on (empty answer?)")
            out.append([Example(where, ids, mask) for ids, mask in seqs])
        except ValueError as e:
            bad.append(f"{where}: {e}")
            if on_bad_line == "stop":
                break
    if bad and on_bad_line == "stop":
        raise LlamaforgeError(f"{bad[0]} (nothing was written; fix the line or pass --on-bad-line skip)")
    for msg in bad[:10]:
        print(f"skipping {msg}", file=sys.stderr)
    if len(bad) > 10:
        print(f"skipping {len(bad) - 10} more malformed lines", file=sys.stderr)
    if not out:
        raise LlamaforgeError(f"{path}: no examples to train on" + (f" ({len(bad)} malformed lines skipped)" if bad else
                                                                     " (the file is empty)"))
    return out


class SFTBatches:
    """Rows of examples in a seeded order, epoch after epoch, with data.Batches' plan/read/state API.

    A row is one example, or with packing several whose (input, target) pairs are concatenated up to
    `seq_len`: every target stays its own example's. Rows pad on the right (IGNORE targets) to the
    longest in each micro-batch."""

    def __init__(self, examples: list[Example], seq_len: int, pad_id: int, seed: int = 0, packing: bool = False):
        self.seq_len, self.pad_id, self.seed = seq_len, pad_id, seed
        pairs = [(e.ids[:-1], [t if m else IGNORE for t, m in zip(e.ids[1:], e.mask[1:])]) for e in examples]
        if packing:
            self.rows, cur = [], ([], [])
            for i in random.Random(seed).sample(range(len(pairs)), len(pairs)):
                x, y = pairs[i]
                if cur[0] and len(cur[0]) + len(x) > seq_len:
                    self.rows.append(cur)
                    cur = ([], [])
                cur = (cur[0] + x, cur[1] + y)
            self.rows.append(cur)
        else:
            self.rows = pairs
        self.epoch, self.cursor, self.n_seen = 0, 0, 0

    def __len__(self) -> int:
        return len(self.rows)

    def _order(self) -> list[int]:
        return random.Random(self.seed * 1_000_003 + self.epoch).sample(range(len(self.rows)), len(self.rows))

    def plan(self, n: int) -> list[int]:
        out, order = [], self._order()
        for _ in range(n):
            out.append(order[self.cursor])
            self.cursor += 1
            if self.cursor == len(self.rows):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
        self.n_seen += n
        return out

    def read(self, plan: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows([self.rows[i] for i in plan], self.pad_id)

    def tokens(self, plan: list[int]) -> int:
        return sum(len(self.rows[i][0]) for i in plan)

    def epochs(self) -> float:
        return self.epoch + self.cursor / len(self.rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_seen": self.n_seen, "rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, st: dict) -> None:
        if (st["rows"], st["seed"]) != (len(self.rows), self.seed):
            raise LlamaforgeError(f"the checkpoint's data position is for {st['rows']} rows with seed {st['seed']}; this run has "
                                  f"{len(self.rows)} rows with seed {self.seed}: resume with the same data and settings")
        self.epoch, self.cursor, self.n_seen = st["epoch"], st["cursor"], st["n_seen"]


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[(inputs, targets)] -> (x, y), each (len(rows), longest row) int64, padded on the right."""
    L = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    for r, (xi, yi) in enumerate(rows):
        x[r, :len(xi)], y[r, :len(yi)] = torch.tensor(xi), torch.tensor(yi)
    return x, y


class PairBatches(SFTBatches):
    """Preference pairs; read() stacks the chosen rows, then the rejected rows: (2 len(plan), L)."""

    def __init__(self, pairs: list[list[Example]], seq_len: int, pad_id: int, seed: int = 0):
        super().__init__([e for pair in pairs for e in pair], seq_len, pad_id, seed)
        self.rows = [(self.rows[2 * i], self.rows[2 * i + 1]) for i in range(len(pairs))]

    def read(self, plan):
        return pad_rows([self.rows[i][0] for i in plan] + [self.rows[i][1] for i in plan], self.pad_id)

    def tokens(self, plan):
        return sum(len(self.rows[i][0][0]) + len(self.rows[i][1][0]) for i in plan)
