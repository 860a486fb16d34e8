"""Constrained decoding: JSON Schema, free JSON, regex, Lark and GBNF grammars as a per-sequence token mask.

The grammar engine is llguidance (Microsoft guidance's Rust core, as vLLM and SGLang use it): it
compiles a grammar against the tokenizer's byte strings and, at each step, computes the set of
tokens that keep the output a prefix of some sentence of the grammar in tens of microseconds on a
49k vocabulary (benchmarks/bench_constrain.py compares it with xgrammar and outlines-core).

The token loop knows only `Constraint`'s hook (generate.py `pick`, the engine's `_take`):
`mask(logits, remaining)` before sampling sets disallowed logits to -inf; `advance(token, remaining)`
after sampling moves the grammar on and may replace the token (see below); `done` says the grammar
is complete, so the sequence ends. Every grammar may end: once the output is a whole sentence the
mask allows the end-of-turn tokens, and when it can only end, the sequence stops without waiting.

The token budget: a model can write a JSON string forever. When the tokens left come near what the
cheapest completion needs, the constraint closes the document: from there on it forces, token by
token, a completion found by a deterministic policy (end if the grammar allows it; inside a JSON
string the longest allowed token that ends it, '"' or '"}'...; outside one the longest made only of
']' and '}'; else the longest allowed token), simulated on a copy of the grammar state, so a JSON
output fits max_tokens whenever such a closing does (a schema that needs more tokens than asked for
ends at the limit, finish_reason "length"). Near the limit each sampled token is checked the same
way and replaced by the closing plan's first if it would leave too few tokens to finish. For regex
and Lark grammars the policy may find no end (e.g. `[a-z]+@x[.]com`): those stop at the limit.
"""
from __future__ import annotations

import json
import re
import weakref

import numpy as np
import torch

from .errors import LlamaforgeError, require
from .tokenizer import bytes_to_unicode

# OpenAI's strict JSON looks like json.dumps' default: ", " and ": ", no newlines. Fixed separators
# also keep a small model from spending its budget on whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CLOSERS = frozenset(b'"]}')
QUOTE, BACKSLASH = 0x22, 0x5C
GBNF_RULE = re.compile(r"(?m)^\s*[A-Za-z0-9_-]+\s*::=")  # llama.cpp's `root ::= ...`: GBNF, not Lark
SIM_LIMIT = 512  # most tokens a closing simulation walks before giving up (a grammar with no short end)

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _llguidance():
    return require("llguidance", "structured output")


# ---- the vocabulary as bytes ----

def _spm_piece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def vocabulary_bytes(tok) -> list[bytes]:
    """Each token id's bytes, so that concatenating a sequence's pieces gives its decoded UTF-8 text
    (special tokens: their written form). Byte-level BPE pieces go through GPT-2's byte table,
    SentencePiece pieces map U+2581 to a space and <0xNN> to a byte, tiktoken gives bytes directly."""
    specials = set(tok.specials.values())
    if tok.kind == "tiktoken":
        return [tok.enc.decode_single_token_bytes(i) if i not in specials else tok.id_to_piece(i).encode()
                for i in range(tok.vocab_size)]
    if tok.kind == "sentencepiece":
        sp = tok.sp
        return [tok.id_to_piece(i).encode() if i in specials or sp.is_control(i) or sp.is_unknown(i)
                else _spm_piece_bytes(sp.id_to_piece(i)) for i in range(tok.vocab_size)]
    byte_level = "ByteLevel" in json.dumps(json.loads(tok.tok.to_str()).get("decoder"))
    table = {c: b for b, c in bytes_to_unicode().items()}  # printable character -> byte
    out = []
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i) or ""
        if i in specials or not byte_level:
            out.append(piece.encode() if i in specials else _spm_piece_bytes(piece))
        else:
            out.append(bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode())
    return out


class _Vocab:
    """What the constraint needs from a tokenizer, built once per tokenizer (~0.5 s for 49k tokens)."""

    def __init__(self, tok):
        lg = _llguidance()
        self.tok = tok
        self.pieces = vocabulary_bytes(tok)
        self.specials = sorted(set(tok.specials.values()))
        eos = [tok.eos_id] if tok.eos_id is not None else []
        self.stop_ids = eos + sorted(set(tok.stop_ids) - set(eos))  # the closing plan ends with the first
        if not self.stop_ids:
            raise LlamaforgeError("constrained output needs a tokenizer with an end-of-sequence token")
        wrapper = _Wrapper(tok, self.pieces, self.specials)
        self.llg = lg.LLTokenizer(lg.TokenizerWrapper(wrapper), n_vocab=tok.vocab_size, eos_token=self.stop_ids)
        special = set(self.specials)
        # longest first, specials last; a leading '-' ranks a little lower (a closing number is "0", not "-0")
        n = np.array([len(p) - 0.5 * p.lstrip().startswith(b"-") if i not in special else -1 for i, p in enumerate(self.pieces)])
        self.by_length = np.argsort(-n, kind="stable")

        self.rank = np.empty(len(n), dtype=np.int64)
        self.rank[self.by_length] = np.arange(len(n))

        def kind(pred):  # (vocab,) bools: the tokens whose bytes satisfy pred
            return np.array([bool(p) and i not in special and pred(p) for i, p in enumerate(self.pieces)])
        self.end_string = kind(lambda p: p[0] == QUOTE and set(p) <= CLOSERS)  # '"', '"}', '"]}'...
        self.end_nesting = kind(lambda p: set(p) <= CLOSERS - {QUOTE})  # '}', ']', '}]'...


class _Wrapper:
    """llguidance's TokenizerWrapper protocol over our tokenizer."""

    def __init__(self, tok, pieces, specials):
        self._tok = tok
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self.tokens, self.special_token_ids = pieces, specials

    def __call__(self, s):
        return self._tok.encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s, bos=False)


def vocab_for(tok) -> _Vocab:
    v = _TOKENIZERS.get(tok)
    if v is None:
        v = _TOKENIZERS[tok] = _Vocab(tok)
    return v


# ---- grammars ----

def grammar_source(json_schema=None, json_object: bool = False, regex: str | None = None, lark: str | None = None,
                   gbnf: str | None = None) -> str:
    """One grammar spec -> llguidance's grammar text. Exactly one of the arguments. A `lark` text in
    GBNF (llama.cpp's `::=` rules) is converted."""
    given = [k for k, v in dict(json_schema=json_schema, json_object=json_object or None, regex=regex, lark=lark,
                                 gbnf=gbnf).items() if v is not None]
    if len(given) != 1:
        raise LlamaforgeError(f"give exactly one of json_schema, json_object, regex, lark or gbnf, got {given or 'none'}")
    M = _llguidance().LLMatcher
    if json_object:
        json_schema = {"type": "object"}
    if json_schema is not None:
        if hasattr(json_schema, "model_json_schema"):  # a pydantic model class
            json_schema = json_schema.model_json_schema()
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise LlamaforgeError(f"the JSON schema is not valid JSON ({e}): fix it") from None
        if not isinstance(json_schema, (dict, bool)):
            raise LlamaforgeError(f"a JSON schema is an object, got {type(json_schema).__name__}")
        try:
            return M.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise LlamaforgeError(f"invalid JSON schema: {e}") from None
    if regex is not None:
        return M.grammar_from_regex(regex)
    if gbnf is not None or GBNF_RULE.search(lark):
        from llguidance.gbnf_to_lark import gbnf_to_lark
        try:
            lark = gbnf_to_lark(gbnf if gbnf is not None else lark)
        except Exception as e:  # noqa: BLE001 -- the converter raises plain exceptions on bad input
            raise LlamaforgeError(f"invalid GBNF grammar: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return M.grammar_from_lark(lark)


class Grammar:
    """A grammar checked against one tokenizer: `Grammar(tok, source)` raises LlamaforgeError naming
    the problem (unsupported schema keys, a syntax error, a grammar that matches nothing)."""

    def __init__(self, tok, source: str, kind: str = "grammar"):
        lg = _llguidance()
        self.vocab, self.source, self.kind = vocab_for(tok), source, kind
        failed, messages = lg.LLMatcher.validate_grammar_with_warnings(source, self.vocab.llg)
        if failed:
            raise LlamaforgeError(f"the {kind} cannot be used: {_first_line(messages[0])}")
        self._matcher = lg.LLMatcher(self.vocab.llg, source, log_level=0)
        if self._matcher.is_error():
            raise LlamaforgeError(f"the {kind} cannot be used: {_first_line(self._matcher.get_error())}")
        allowed = _allowed(self._matcher, self.vocab.llg.vocab_size)
        if self._matcher.is_stopped() and not self._matcher.is_accepting() or not allowed.any():
            raise LlamaforgeError(f"the {kind} matches no text: check it for contradictions")

    def constraint(self) -> "Constraint":
        return Constraint(self._matcher.deep_copy(), self.vocab)


def _first_line(msg: str) -> str:
    keys = re.match(r"Unimplemented keys: \[(.*)\]", msg.strip())
    if keys:
        return f"it uses JSON Schema keywords that constrained decoding cannot enforce: {keys.group(1).replace(chr(34), '')}"
    if msg.startswith("oneOf constraints are not supported"):
        return "it uses oneOf, which constrained decoding cannot enforce: use anyOf"
    lines = [x.strip() for x in msg.strip().splitlines() if x.strip()]
    head = lines[0] if lines else "unknown error"
    if head.startswith(("at ", "regex parse error")) and len(lines) > 1:  # llguidance puts the reason on later lines
        head += " " + " ".join(x for x in lines[1:3] if not x[0].isdigit() and x != "^")
    return head[:300]


def compile_grammar(tok, **spec) -> Grammar:
    """`compile_grammar(tok, json_schema={...})` (or json_object=True, regex=, lark=, gbnf=) -> Grammar."""
    kind = next((k for k, v in spec.items() if v not in (None, False)), "grammar")
    names = {"json_schema": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "gbnf": "GBNF grammar"}
    return Grammar(tok, grammar_source(**spec), names.get(kind, "grammar"))


def _allowed(matcher, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """The matcher's next-token mask as (n,) bools."""
    words = out if out is not None else np.empty((n + 31) // 32, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:n].view(bool)  # 0/1 bytes are valid bools


# ---- the per-sequence hook ----

class Constraint:
    """One sequence's grammar state: the token loop's hook (see the module docstring)."""

    def __init__(self, matcher, vocab: _Vocab):
        self.m, self.vocab = matcher, vocab
        self.n = vocab.llg.vocab_size
        self._words = np.empty((self.n + 31) // 32, dtype=np.int32)
        self.plan: list[int] = []  # a forced closing, in order
        self.cost: int | None = None  # tokens the closing policy needs from the present state (None: unknown)
        self._since_check = 0
        self._fresh: list[int] | None = None  # the closing plan from the present state, when just computed
        self._string = 0  # JSON string state of the output so far (see _scan)
        self._last: list[int] | None = None  # the closing most recently simulated

    def fork(self) -> "Constraint":
        c = Constraint(self.m.deep_copy(), self.vocab)
        c.plan, c.cost, c._string, c._last = list(self.plan), self.cost, self._string, self._last
        return c

    @property
    def done(self) -> bool:
        """The output is complete: the grammar can only end, or the closing plan ends it here."""
        return self.m.is_stopped() or (len(self.plan) == 1 and self.plan[0] in self.vocab.stop_ids)

    @property
    def error(self) -> str:
        return self.m.get_error()

    def mask(self, logits: torch.Tensor, remaining: int | None = None) -> torch.Tensor:
        """(B, vocab) or (vocab,) logits -> the same with every token the grammar forbids at -inf."""
        if remaining is not None and not self.plan:
            self._check_budget(remaining)
        if self.plan:
            allowed = np.zeros(self.n, dtype=bool)
            allowed[self.plan[0]] = True
        else:
            allowed = _allowed(self.m, self.n, self._words)
        keep = torch.from_numpy(allowed).to(logits.device)
        V = logits.size(-1)
        if V > self.n:  # the model's vocabulary is padded past the tokenizer's
            keep = torch.cat([keep, keep.new_zeros(V - self.n)])
        return torch.where(keep[:V], logits, float("-inf"))

    def advance(self, token: int, remaining: int | None = None) -> int:
        """Move the grammar past `token` and return the token taken: the sampled one, or, near the end of
        the budget (`remaining` tokens left, this one included), the closing plan's first token when the
        sampled one would leave too few tokens to finish."""
        if self.plan:
            token = self.plan.pop(0)  # the mask allowed nothing else
        elif self._near(remaining):
            state = self._string
            self._consume(token)
            after = self._plan_from_here(remaining - 1)
            if after is not None and len(after) - 1 <= remaining - 1:
                self.cost, self._fresh = len(after) - 1, after
                return token
            self.m.rollback(1)
            self._string = state
            closing = self._plan_from_here()
            if closing is not None:
                token, self.plan = closing[0], closing[1:]
        self._consume(token)
        return token

    def _consume(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise LlamaforgeError(f"token {token} breaks the grammar: {_first_line(self.m.get_error())}")
        self._string = _scan(self._string, self.vocab.pieces[token])

    def _near(self, remaining: int | None) -> bool:
        return remaining is not None and self.cost is not None and remaining <= 2 * self.cost + 32

    def _check_budget(self, remaining: int) -> None:
        """Estimate the closing cost now and then (each step near the end); start closing when it no longer fits."""
        self._since_check += 1
        if self.cost is not None and not self._near(remaining) and self._since_check < 8:
            return
        self._since_check = 0
        plan, self._fresh = self._fresh or self._plan_from_here(), None
        self.cost = None if plan is None else len(plan) - 1  # the final stop token costs no budget
        if plan is not None and self.cost >= remaining:
            self.plan = plan

    def _plan_from_here(self, budget: int | None = None) -> list[int] | None:
        """A closing from the present state: the last one found, if it is still a valid ending from here
        (a model token inside a string rarely changes it: a 5 µs check) and fits `budget` tokens, else a
        new simulation (~0.5 ms)."""
        last = self._last
        if last is not None and (budget is None or len(last) - 1 <= budget) and self.m.validate_tokens(last) == len(last):
            return last
        self._last = self._simulate(self.m)
        return self._last

    def _simulate(self, matcher) -> list[int] | None:
        """The closing policy's tokens from `matcher`'s state to its end (a stop token last), on a copy;
        None when it finds no end within SIM_LIMIT tokens. Inside a JSON string (a quote-and-escape scan
        of the output's bytes) the policy prefers tokens that close it ('"', '"}'...), outside one tokens
        of only ']' and '}', else the longest allowed token."""
        m, v, out, state = matcher.deep_copy(), self.vocab, [], self._string
        for _ in range(SIM_LIMIT):
            if m.is_accepting() or m.is_stopped():
                return out + [v.stop_ids[0]]
            ids = np.flatnonzero(_allowed(m, self.n))
            if state != 2:
                closing = ids[(v.end_string if state == 1 else v.end_nesting)[ids]]
                ids = closing if len(closing) else ids
            if not len(ids):
                return None
            pick = int(ids[np.argmin(v.rank[ids])])  # the longest
            if not m.consume_token(pick):
                return None
            out.append(pick)
            state = _scan(state, v.pieces[out[-1]])
        return None


def _scan(state: int, data: bytes) -> int:
    """JSON string state after `data`: 0 outside a string, 1 inside, 2 just after a backslash inside."""
    for b in data:
        if state == 2:
            state = 1
        elif state == 1:
            state = 0 if b == QUOTE else 2 if b == BACKSLASH else 1
        elif b == QUOTE:
            state = 1
    return state
