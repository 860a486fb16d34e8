"""Tokenizers: byte-level BPE (GPT-2 style: SmolLM2, Llama 3 via tokenizer.json / GGUF `gpt2`),
SentencePiece BPE (LLaMA 1/2: byte fallback, split digits) and the Llama 3 tiktoken file.

Each is built by a well-kept library (`tokenizers`, `sentencepiece`, `tiktoken`), never a
hand-written BPE. One interface over all three: `encode(text, bos, eos, special)`, `decode(ids)`,
special-token ids, and `stop_ids` (end-of-turn tokens). Special tokens are parsed only when
`special=True` (template text), never inside user content: the text is split on the special
token strings, and only the pieces between them go through the BPE.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from .errors import LlamaforgeError

# End-of-turn / end-of-text token strings across the families we load.
STOP_TOKENS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|end|>")

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` (llama.cpp `llama-vocab.cpp`, HF tokenizer.json).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3 / 3.1 special tokens after the 128,000 BPE ranks (meta-llama/llama-models tokenizer.py).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


class Tokenizer:
    """Common interface; subclasses implement `_encode_plain`, `decode`, `id_to_piece`."""

    kind = "?"

    def __init__(self, vocab_size: int, specials: dict[str, int], bos: str | None, eos: str | None,
                 add_bos: bool, pad: str | None = None):
        self.vocab_size = vocab_size
        self.specials = dict(specials)  # token string -> id, parsed only with special=True
        self.bos_id = specials.get(bos) if bos else None
        self.eos_id = specials.get(eos) if eos else None
        self.pad_id = specials.get(pad) if pad else None
        self.add_bos = add_bos and self.bos_id is not None
        self.stop_ids = {specials[s] for s in STOP_TOKENS if s in specials}
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)
        pats = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, pats)) + ")") if pats else None

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> list[int]:
        """Text -> ids. `bos=None` follows the model's default; `special` parses special-token strings."""
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        if special and self._special_re is not None:
            for i, part in enumerate(self._special_re.split(text)):
                if i % 2:
                    ids.append(self.specials[part])
                elif part:
                    ids.extend(self._encode_plain(part))
        elif text:
            ids.extend(self._encode_plain(text))
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def token_id(self, piece: str) -> int | None:
        return self.specials.get(piece)

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE from tokenizer.json or GGUF `gpt2`)."""

    kind = "bpe"

    def __init__(self, tok, specials: dict[str, int], bos=None, eos=None, add_bos=False, pad=None, chat_template=None):
        from tokenizers import Tokenizer as _Tok
        self.tok = tok  # the full tokenizer (saved as tokenizer.json)
        data = json.loads(tok.to_str())
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if not t.get("special")]
        data["post_processor"] = None
        self._plain = _Tok.from_str(json.dumps(data))  # no special-token parsing, no BOS insertion
        self.chat_template = chat_template
        super().__init__(tok.get_vocab_size(with_added_tokens=True), specials, bos, eos, add_bos, pad)

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """tokenizer.json, with tokenizer_config.json beside it for BOS/EOS and the chat template."""
        from tokenizers import Tokenizer as _Tok
        path = Path(path)
        tok = _Tok.from_file(str(path))
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        cfg_path = path.with_name("tokenizer_config.json")
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        name = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        bos, eos, pad = name(cfg.get("bos_token")), name(cfg.get("eos_token")), name(cfg.get("pad_token"))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # Llama 3 style: BOS added by the post-processor template
            add_bos = bool(bos) and bos in (json.dumps(json.loads(tok.to_str()).get("post_processor")) or "")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # list of named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, specials, bos, eos, add_bos, pad, template)

    def _encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

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
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        sp = self.sp
        found = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        found.update(specials or {})
        bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
        eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
        if bos:
            found[bos] = sp.bos_id()
        if eos:
            found[eos] = sp.eos_id()
        super().__init__(sp.get_piece_size(), found, bos, eos, add_bos)

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes())

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids, skip_special=False) -> str:
        ids = [int(i) for i in ids]
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
    """The Llama 3 tiktoken file: base64 token + rank per line, then 256 special tokens."""

    kind = "tiktoken"

    def __init__(self, path: str | Path):
        import tiktoken
        self.path = Path(path)
        ranks = {}
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        n_base = len(ranks)
        names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
        specials = {s: n_base + i for i, s in enumerate(names[:256])}
        self.enc = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        super().__init__(n_base + len(specials), specials, "<|begin_of_text|>", "<|end_of_text|>", True)

    def _encode_plain(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids, skip_special=False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < self.enc.n_vocab - 256]
        return self.enc.decode(ids)

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
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    head = path.read_bytes()[:64]
    if re.match(rb"^[A-Za-z0-9+/=]+ \d+\n", head):
        return TiktokenTokenizer(path)
    try:
        return SentencePieceTokenizer.from_file(path)
    except Exception as e:
        raise LlamaforgeError(f"cannot read tokenizer {path}: not a SentencePiece or tiktoken model ({e})") from None


# ---- GGUF metadata -> tokenizer ----

def _byte_level_tokenizer(tokens: list[str], merges: list[str], pre: str):
    from tokenizers import Regex, Tokenizer as _Tok, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = _Tok(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("gpt-2", "gpt2", "default"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"), byte_level])
    else:
        raise LlamaforgeError(f"unsupported GGUF pre-tokenizer {pre!r}: supported are smollm, gpt-2, llama-bpe")
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_proto(tokens: list[str], scores: list[float], types: list[int], meta: dict) -> bytes:
    """Rebuild a SentencePiece BPE ModelProto from GGUF `llama` vocab (llama.cpp writes it from one)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    # GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    type_map = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
                3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
                5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, type_map.get(ty, pb.ModelProto.SentencePiece.NORMAL)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = any(ty == 6 for ty in types)
    ts.split_digits = True
    ts.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    ts.bos_id = meta.get("tokenizer.ggml.bos_token_id", 1)
    ts.eos_id = meta.get("tokenizer.ggml.eos_token_id", 2)
    ts.pad_id = meta.get("tokenizer.ggml.padding_token_id", -1)
    if ts.pad_id in (ts.unk_id, ts.bos_id, ts.eos_id):
        ts.pad_id = -1
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.escape_whitespaces = True
    ns.remove_extra_whitespaces = False
    return m.SerializeToString()


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise LlamaforgeError("this GGUF file has no tokenizer (tokenizer.ggml.*): pass --tokenizer with tokenizer.json or tokenizer.model")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        return SentencePieceTokenizer(_spm_proto(tokens, scores, types, meta), add_bos=add_bos)
    if model != "gpt2":
        raise LlamaforgeError(f"unsupported GGUF tokenizer model {model!r}: supported are gpt2 (byte-level BPE) and llama (SentencePiece)")
    from tokenizers import AddedToken
    tok = _byte_level_tokenizer(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre", "default"))
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    name = lambda key: tokens[meta[key]] if key in meta and 0 <= meta[key] < len(tokens) else None  # noqa: E731
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        if name(key):
            specials.setdefault(name(key), meta[key])
    return HFTokenizer(tok, specials, name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id"),
                       add_bos, name("tokenizer.ggml.padding_token_id"))
