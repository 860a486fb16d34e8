"""Tokenizers: byte-level BPE (GPT-2 style: SmolLM2, Llama 3 via tokenizer.json / GGUF `gpt2`),
SentencePiece BPE (LLaMA 1/2: byte fallback, split digits) and the Llama 3 tiktoken file.

Each is built by a well-kept library (`tokenizers`, `sentencepiece`, `tiktoken`), never a
hand-written BPE. One interface over all three: `encode(text, bos, eos, special)`, `decode(ids)`,
special-token ids, and `stop_ids` (end-of-turn tokens). Special tokens are parsed only when
`special=True` (template text), never inside user content: the text is split on the special
token strings, and only the pieces between them go through the BPE. That is llama.cpp's
`tokenize(..., parse_special)`; the tests hold each path to its reference library (and the GGUF
byte-level path to llama.cpp's own token ids).
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from .errors import LlamaforgeError

# End-of-turn / end-of-text token strings across the families we load.
STOP_TOKENS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|end|>")

# Without a tokenizer_config.json, BOS/EOS come from these well-known names; the families
# that use them (LLaMA 1/2, Llama 3) were trained with BOS on every sequence.
KNOWN_BOS_EOS = (("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>"))

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (llama.cpp `llama-vocab.cpp`, HF tokenizer.json).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
DIGIT_PRES = ("smollm", "starcoder", "refact", "codeshell")  # single digits, then the GPT-2 regex

# Llama 3.1 special tokens after the 128,000 BPE ranks (meta-llama/llama-models tokenizer.py).
# Llama 3.0 named the same ids <|reserved_special_token_N|> except 128000/1/6/7/9; 3.1 gives the
# reserved slots meaning (<|eom_id|>, <|python_tag|>) and is otherwise identical.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
N_LLAMA3_SPECIALS = 256

Offsets = list[tuple[int, int, int]]  # (token id, start char, end char) over the encoded text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map of byte-level BPE vocabularies (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_to_char(text: str) -> list[int]:
    """Table: UTF-8 byte offset -> index of the character holding it (len(text) at the end)."""
    table = []
    for i, ch in enumerate(text):
        table += [i] * len(ch.encode("utf-8"))
    table.append(len(text))
    return table


class Tokenizer:
    """Common interface; subclasses implement `_encode_plain`, `encode_with_offsets`, `_decode`, `id_to_piece`."""

    kind = "?"

    def __init__(self, vocab_size: int, specials: dict[str, int], bos: str | None, eos: str | None,
                 add_bos: bool, pad: str | None = None):
        self.vocab_size = vocab_size
        self.specials = dict(specials)  # token string -> id, parsed only with special=True
        self.bos_id = specials.get(bos) if bos else None
        self.eos_id = specials.get(eos) if eos else None
        self.pad_id = specials.get(pad) if pad else None
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.stop_ids = {specials[s] for s in STOP_TOKENS if s in specials}
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)
        pats = sorted(self.specials, key=len, reverse=True)  # longest first: "<|a|>x" before "<|a|>"
        self._special_re = re.compile("(" + "|".join(map(re.escape, pats)) + ")") if pats else None

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> list[int]:
        """Text -> ids. `bos=None` follows the model's default; `special` parses special-token strings."""
        if not isinstance(text, str):
            raise LlamaforgeError(f"encode takes a str, got {type(text).__name__}: decode bytes to text first")
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        for part, sid in self.split_special(text) if special else [(text, None)]:
            if sid is not None:
                ids.append(sid)
            elif part:
                ids.extend(self._encode_plain(part))
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """Text -> [(piece, special id or None)], cutting at special-token strings."""
        if self._special_re is None:
            return [(text, None)]
        parts = self._special_re.split(text)  # odd indices are the matched special tokens
        return [(p, self.specials[p] if i % 2 else None) for i, p in enumerate(parts) if p]

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text; an incomplete UTF-8 sequence (a streaming prefix) decodes to U+FFFD, never raises."""
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise LlamaforgeError(f"decode takes a list of integer token ids, got {ids!r:.60}: pass the ids that encode returned") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LlamaforgeError(f"token id {bad[0]} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1}): "
                                  "the ids come from a different model or tokenizer")
        return self._decode(ids, skip_special)

    def token_id(self, piece: str) -> int | None:
        return self.specials.get(piece)

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> Offsets:
        """Plain text (no special parsing, no BOS) -> [(id, start, end)] in characters of `text`."""
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE from tokenizer.json or GGUF `gpt2`)."""

    kind = "bpe"

    def __init__(self, tok, specials: dict[str, int], bos=None, eos=None, add_bos=False, pad=None, chat_template=None):
        self.tok = tok
        # Special added tokens are matched as plain text: we cut at them ourselves, only with
        # special=True. Non-special added tokens stay always-matched, as in transformers.
        tok.encode_special_tokens = True
        self.chat_template = chat_template
        super().__init__(tok.get_vocab_size(with_added_tokens=True), specials, bos, eos, add_bos, pad)

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """tokenizer.json, with tokenizer_config.json beside it for BOS/EOS and the chat template."""
        from tokenizers import Tokenizer as _Tok
        path = Path(path)
        try:
            tok = _Tok.from_file(str(path))
        except Exception as e:
            raise LlamaforgeError(f"cannot read {path} as a tokenizer.json ({str(e)[:120]}): pass the model's own tokenizer.json") from None
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        cfg_path = path.with_name("tokenizer_config.json")
        try:
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
        except (ValueError, RecursionError) as e:
            raise LlamaforgeError(f"{cfg_path} is not valid JSON ({str(e) or 'it nests too deeply'}): fix or remove it") from None
        if cfg is not None and not isinstance(cfg, dict):
            raise LlamaforgeError(f"{cfg_path} holds a JSON {type(cfg).__name__}, expected an object: fix or remove it")
        name = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        if cfg is None:
            bos, eos = next(((b, e) for b, e in KNOWN_BOS_EOS if b in specials), (None, None))
            pad, add_bos, template = None, bos is not None, None
        else:
            bos, eos, pad = (v if isinstance(v, str) else None for v in map(name, (cfg.get("bos_token"), cfg.get("eos_token"),
                                                                                       cfg.get("pad_token"))))
            add_bos = cfg.get("add_bos_token")
            template = cfg.get("chat_template")
        for piece in (bos, eos, pad):  # a BOS/EOS that is a plain vocab entry still needs its id
            if piece and piece not in specials and tok.token_to_id(piece) is not None:
                specials[piece] = tok.token_to_id(piece)
        if add_bos is None and bos in specials:  # Llama 3 style: BOS added by the post-processor template
            add_bos = tok.encode("a").ids[:1] == [specials[bos]]
        if isinstance(template, list):  # list of named templates
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        return cls(tok, specials, bos, eos, add_bos, pad, template)

    def _encode_plain(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> Offsets:
        enc = self.tok.encode(text, add_special_tokens=False)  # offsets are in characters
        return [(i, a, b) for i, (a, b) in zip(enc.ids, enc.offsets)]

    def _decode(self, ids, skip_special=False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def save(self, out: Path) -> list[str]:
        self.tok.save(str(out / "tokenizer.json"))
        return ["tokenizer.json"]


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE (LLaMA 1/2), from tokenizer.model bytes or GGUF `llama` vocab."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, add_bos: bool = True, specials: dict[str, int] | None = None):
        import sentencepiece as spm
        self.proto = model_proto
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:
            raise LlamaforgeError(f"not a valid SentencePiece model ({str(e)[:160]}): pass the model's tokenizer.model") from None
        sp = self.sp
        found = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        found.update(specials or {})
        bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
        pad = sp.id_to_piece(sp.pad_id()) if sp.pad_id() >= 0 else None
        for piece, i in ((bos, sp.bos_id()), (eos, sp.eos_id()), (pad, sp.pad_id())):
            if piece:
                found[piece] = i
        super().__init__(sp.get_piece_size(), found, bos, eos, add_bos, pad)

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes())

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_with_offsets(self, text: str) -> Offsets:
        try:  # sentencepiece >= 0.2.1; 0.2.0 only has out_type="immutable_proto"
            pieces = self.sp.encode(text, return_type="proto").pieces
        except (TypeError, ValueError):
            pieces = self.sp.encode(text, out_type="immutable_proto").pieces
        ch = _byte_to_char(text)  # begin/end are byte offsets into the UTF-8 input
        return [(p.id, ch[p.begin], ch[p.end]) for p in pieces]

    def _decode(self, ids, skip_special=False) -> str:
        if not skip_special:  # sentencepiece drops control tokens in decode; keep them visible
            out, run = [], []
            for i in ids:
                if self.sp.is_control(i):
                    out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                    run = []
                else:
                    run.append(i)
            return "".join(out + [self.sp.decode(run)])
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def save(self, out: Path) -> list[str]:
        (out / "tokenizer.model").write_bytes(self.proto)
        return ["tokenizer.model"]


class TiktokenTokenizer(Tokenizer):
    """The Llama 3 tiktoken file: base64 token + rank per line; the 256 special tokens follow the ranks."""

    kind = "tiktoken"

    def __init__(self, path: str | Path):
        import tiktoken
        self.path = Path(path)
        ranks = {}
        try:
            for line in self.path.read_text().splitlines():
                if line.strip():
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except (ValueError, UnicodeDecodeError) as e:
            raise LlamaforgeError(f"{self.path} is not a tiktoken file (lines of 'base64 rank'): {e}") from None
        n_base = len(ranks)
        reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, N_LLAMA3_SPECIALS - len(LLAMA3_SPECIALS) + 2)]
        specials = {s: n_base + i for i, s in enumerate(LLAMA3_SPECIALS + reserved)}
        self.n_base = n_base
        self.enc = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        super().__init__(n_base + len(specials), specials, "<|begin_of_text|>", "<|end_of_text|>", True)

    def _encode_plain(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def encode_with_offsets(self, text: str) -> Offsets:
        ids = self._encode_plain(text)
        ch, pos, out = _byte_to_char(text), 0, []
        for i in ids:  # byte-level: each token is exactly its bytes of the input
            n = len(self.enc.decode_single_token_bytes(i))
            out.append((i, ch[pos], ch[pos + n]))
            pos += n
        return out

    def _decode(self, ids, skip_special=False) -> str:
        if skip_special:
            ids = [i for i in ids if i < self.n_base]
        return self.enc.decode(ids)  # errors="replace": a split UTF-8 sequence becomes U+FFFD

    def id_to_piece(self, i: int) -> str:
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def save(self, out: Path) -> list[str]:
        (out / "tokenizer.model").write_bytes(self.path.read_bytes())
        return ["tokenizer.model"]


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """tokenizer.json, a SentencePiece tokenizer.model, or a tiktoken tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).exists():
                return load_tokenizer_file(path / name)
        raise LlamaforgeError(f"no tokenizer.json or tokenizer.model in {path}: copy the model's tokenizer files there")
    if not path.is_file():
        raise LlamaforgeError(f"tokenizer file {path} does not exist: pass a tokenizer.json or tokenizer.model path")
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    head = path.read_bytes()[:64]
    if re.match(rb"^[A-Za-z0-9+/=]+ \d+\n", head):
        return TiktokenTokenizer(path)
    try:
        return SentencePieceTokenizer.from_file(path)
    except LlamaforgeError:
        raise LlamaforgeError(f"cannot read tokenizer {path}: not a tokenizer.json, SentencePiece or tiktoken model") from None


# ---- GGUF metadata -> tokenizer ----

def _byte_level_tokenizer(tokens: list[str], merges: list[str], pre: str):
    """llama.cpp's BPE vocab as a `tokenizers` BPE with the pre-tokenizer named by `tokenizer.ggml.pre`."""
    from tokenizers import Regex, Tokenizer as _Tok, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]  # byte-level symbols never hold a space (it is Ġ)
    try:  # llama.cpp sets ignore_merges for Llama 3: a whole pre-token found in the vocab is one token.
        tok = _Tok(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in LLAMA3_PRES))
    except Exception as e:  # noqa: BLE001 - merges that are not "a b" pairs, or name pieces the vocab lacks
        raise LlamaforgeError(f"the GGUF tokenizer's merges are not valid ({' '.join(str(e).split())[:120]}): "
                              "the file is damaged; re-convert it") from None
    if pre in DIGIT_PRES:  # llama.cpp: regexes "\p{N}" then GPT-2's, applied one after the other
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("gpt-2", "gpt2", "default"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in LLAMA3_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise LlamaforgeError(f"unsupported GGUF pre-tokenizer {pre!r}: supported are {', '.join(DIGIT_PRES + LLAMA3_PRES)}, gpt-2; "
                              "pass --tokenizer with the model's tokenizer.json")
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_proto(tokens: list[str], scores: list[float], types: list[int], meta: dict) -> bytes:
    """Rebuild a SentencePiece BPE ModelProto from GGUF `llama` vocab (llama.cpp writes it from one).

    GGUF keeps pieces, scores and types but not the normalizer: LLaMA's is identity with a dummy
    prefix (`tokenizer.ggml.add_space_prefix`), which is also all llama.cpp implements.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    if not (len(tokens) == len(scores) == len(types)):
        raise LlamaforgeError(f"GGUF tokenizer arrays differ in length (tokens {len(tokens)}, scores {len(scores)}, "
                              f"types {len(types)}): the file is damaged; re-convert it")
    m = pb.ModelProto()
    P = pb.ModelProto.SentencePiece
    # GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    type_map = {1: P.NORMAL, 2: P.UNKNOWN, 3: P.CONTROL, 4: P.USER_DEFINED, 5: P.UNUSED, 6: P.BYTE}
    role_ids = {}  # sentencepiece finds bos/eos/unk/pad by piece string, not id: name them from the GGUF ids
    for role, key, default in (("unk", "tokenizer.ggml.unknown_token_id", 0), ("bos", "tokenizer.ggml.bos_token_id", 1),
                               ("eos", "tokenizer.ggml.eos_token_id", 2), ("pad", "tokenizer.ggml.padding_token_id", -1)):
        i = meta.get(key, default)
        ok = isinstance(i, int) and 0 <= i < len(tokens) and i not in role_ids.values()
        role_ids[role] = i if ok else -1
    if role_ids["unk"] < 0:  # sentencepiece needs one unknown piece
        role_ids["unk"] = next((j for j, ty in enumerate(types) if ty == 2), 0)
    seen = set()
    for i, (t, s, ty) in enumerate(zip(tokens, scores, types)):
        kind = type_map.get(ty, P.NORMAL)
        # Converted vocabs are loose (Phi-3's GGUF: <unk> typed control, 53 pad entries typed
        # unknown): sentencepiece wants exactly one UNKNOWN piece, the one at unknown_token_id.
        if i == role_ids["unk"]:
            kind = P.UNKNOWN
        elif kind == P.UNKNOWN:
            kind = P.UNUSED
        if t in seen:  # a duplicate string can never be produced; keep its id with a placeholder
            t, kind = f"<duplicate piece {i}>", P.UNUSED
        seen.add(t)
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, kind
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = any(ty == 6 for ty in types)
    # (split_digits is a training option; at encode time digits split because the vocab has no runs)
    for role, i in role_ids.items():
        setattr(ts, f"{role}_id", i)
        if i >= 0:
            setattr(ts, f"{role}_piece", m.pieces[i].piece)
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.escape_whitespaces = True
    ns.remove_extra_whitespaces = False
    return m.SerializeToString()


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """The tokenizer stored in GGUF metadata (`tokenizer.ggml.*`): `llama` (SentencePiece) or `gpt2` (byte-level BPE)."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise LlamaforgeError("this GGUF file has no tokenizer (tokenizer.ggml.*): pass --tokenizer with tokenizer.json or tokenizer.model")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre", "default")
    # llama.cpp adds BOS by default for SentencePiece and Llama 3 vocabs; the GGUF key overrides.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama" or pre in LLAMA3_PRES))
    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        return SentencePieceTokenizer(_spm_proto(tokens, scores, types, meta), add_bos=add_bos)
    if model != "gpt2":
        raise LlamaforgeError(f"unsupported GGUF tokenizer model {model!r}: supported are gpt2 (byte-level BPE) and llama (SentencePiece)")
    from tokenizers import AddedToken
    tok = _byte_level_tokenizer(tokens, meta.get("tokenizer.ggml.merges") or [], pre)
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # User-defined tokens are matched in any text, special parsing or not (llama.cpp, HF added tokens).
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    name = lambda key: tokens[meta[key]] if isinstance(meta.get(key), int) and 0 <= meta[key] < len(tokens) else None  # noqa: E731
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        if name(key):
            specials.setdefault(name(key), meta[key])
    return HFTokenizer(tok, specials, name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id"),
                       add_bos, name("tokenizer.ggml.padding_token_id"))
