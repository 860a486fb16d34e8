"""K-quant writing (llamaforge/kquants.py): block layout, error, llama.cpp's Q4_K_M mix, files that
load and generate, and (where llama-cpp-python is importable) the same bytes as llama-quantize."""
import importlib.util
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

import llamaforge
from llamaforge import kquants
from llamaforge.config import ModelConfig
from llamaforge.gguf import GGUFFile
from llamaforge.generate import SamplingConfig
from llamaforge.gguf_writer import write_gguf
from llamaforge.model import Transformer

from test_gguf import bpe_tokenizer  # noqa: F401  (a fixture)


def normal_rows(rows=64, cols=1024, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def round_trip(x, name) -> np.ndarray:
    q = kquants.quantize(x, name) if name in kquants.BLOCK_TYPES else gguf.quants.quantize(x, Q[name])
    return gguf.quants.dequantize(q, Q[name])


@pytest.mark.parametrize("name,nbytes", [("Q4_K", 144), ("Q6_K", 210)])
def test_block_layout_and_size(name, nbytes):
    x = normal_rows(3, 768)
    q = kquants.quantize(x, name)
    assert q.dtype == np.uint8 and q.shape == (3, 3 * nbytes)
    assert gguf.GGML_QUANT_SIZES[Q[name]] == (256, nbytes)
    assert kquants.quantize(x.reshape(3, 3, 256), name).shape == (3, 3, nbytes)  # leading dims kept
    with pytest.raises(ValueError, match="256"):
        kquants.quantize(normal_rows(2, 576), name)


def test_error_against_the_32_weight_types_on_normal_data():
    x = normal_rows()
    err = {t: rmse(round_trip(x, t), x) for t in ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q6_K", "Q8_0")}
    assert err["Q4_K"] < 0.9 * err["Q4_0"] and err["Q4_K"] < err["Q4_1"]  # 4.5 bits/weight, like Q4_0
    assert err["Q6_K"] < 0.5 * err["Q5_0"] and err["Q6_K"] < 0.3 * err["Q4_K"]
    assert err["Q8_0"] < err["Q6_K"]
    assert 0.05 < err["Q4_K"] < 0.08 and 0.012 < err["Q6_K"] < 0.022  # 1/sigma-scaled grids: 15 and 63 steps


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_edge_blocks(name):
    x = normal_rows(6, 512)
    x[0] = 0                          # all zero
    x[1] = 0.5                        # constant
    x[2, :256] = 1e-20                # below the zero threshold
    x[3] *= 1e4                       # large
    x[4] = np.abs(x[4])               # all positive (Q4_K's min clamps to 0)
    x[5, 7] = 40                      # one outlier
    back = round_trip(x, name)
    assert np.isfinite(back).all()
    assert (back[0] == 0).all() and np.allclose(back[1], 0.5, rtol=2e-3)
    assert np.abs(back[2, :256]).max() < 1e-6
    for i in (3, 4, 5):
        assert rmse(back[i], x[i]) < 0.15 * np.abs(x[i]).max()
    assert abs(back[5, 7] - 40) < 0.5


def test_q4_k_m_mix_follows_llama_cpp():
    # LLaMA-7B (32 layers): attn_v and ffn_down at Q6_K in the first and last 4 layers and every third between
    six = [i for i in range(32) if kquants.tensor_type_name(f"blk.{i}.ffn_down.weight", 11008, "q4_k_m", 32, True) == "Q6_K"]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [kquants.tensor_type_name(f"blk.{i}.attn_v.weight", 4096, "q4_k_m", 32, True) for i in (5, 6)] == ["Q4_K", "Q6_K"]
    t = lambda name, cols=4096, has_output=True: kquants.tensor_type_name(name, cols, "q4_k_m", 32, has_output)
    assert t("blk.6.attn_q.weight") == t("blk.6.ffn_up.weight") == "Q4_K"
    assert t("output.weight") == "Q6_K" and t("token_embd.weight") == "Q4_K"    # untied: embedding stays base
    assert t("token_embd.weight", has_output=False) == "Q6_K"                  # tied: quantized as the output
    # rows that are not whole super-blocks (SmolLM2's 576): llama-quantize's fallbacks
    assert t("blk.5.attn_q.weight", 576) == "Q5_0" and t("blk.0.attn_v.weight", 576) == "Q8_0"
    assert t("token_embd.weight", 576, has_output=False) == "Q8_0" and t("blk.0.attn_q.weight", 100) == "F16"
    q6 = lambda name, cols=4096: kquants.tensor_type_name(name, cols, "q6_k", 32, True)
    assert q6("blk.3.attn_q.weight") == q6("output.weight") == "Q6_K" and q6("blk.3.attn_q.weight", 576) == "Q8_0"


def kq_config(**kw) -> ModelConfig:
    """Small, but every row a whole number of 256-weight super-blocks (head_dim 64, as llama.cpp wants)."""
    d = dict(name="kq", dim=256, n_layers=8, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=512, max_seq_len=256)
    d.update(kw)
    return ModelConfig(**d)


def random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.05)
    return model


def state_dict(model: Transformer, cfg: ModelConfig) -> dict:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


@pytest.mark.parametrize("qtype,file_type", [("q4_k_m", 15), ("q6_k", 18)])
def test_written_file_loads_and_generates(tmp_path, qtype, file_type):
    cfg = kq_config()
    model = random_model(cfg)
    path = tmp_path / f"kq-{qtype}.gguf"
    report = write_gguf(path, cfg, state_dict(model, cfg), qtype=qtype, name="kq")
    g = GGUFFile(path)
    assert g.metadata["general.file_type"] == file_type
    types = {n: t.qtype.name for n, t in g.tensors.items()}
    if qtype == "q4_k_m":
        assert types["blk.0.ffn_down.weight"] == types["blk.7.attn_v.weight"] == types["output.weight"] == "Q6_K"
        assert types["blk.1.ffn_down.weight"] == types["blk.1.attn_q.weight"] == types["token_embd.weight"] == "Q4_K"
    else:
        assert {t for n, t in types.items() if n.endswith("weight") and "norm" not in n} == {"Q6_K"}
    for name, (ttype, err) in report.items():  # the reported error is the stored blocks' real error
        if ttype != "F32":
            back = gguf.quants.dequantize(g.raw(name).numpy(), Q[ttype]).reshape(g.tensors[name].shape)
            assert np.array_equal(g.tensor(name).numpy(), back)
    ids = torch.randint(0, cfg.vocab_size, (32,))
    with torch.no_grad():
        ref = model(ids[None])[0]
    for quantize in ("none", "auto"):  # dequantized fp32, and the requantized in-memory path
        llm = llamaforge.load(path, quantize=quantize)
        got = llm.logits(ids.tolist())
        kl = F.kl_div(F.log_softmax(got.float(), -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
        assert kl < (0.05 if qtype == "q4_k_m" else 0.01), quantize
        out = list(llm.generate_ids(ids[:8].tolist(), SamplingConfig(max_new_tokens=5, temperature=0)))
        assert len(out) == 5 and all(0 <= t < cfg.vocab_size for t in out)


def test_quantize_command_checks_quality_for_q4_k_m(tmp_path, capsys, bpe_tokenizer):
    from llamaforge.commands import main
    cfg = kq_config()
    src, dst = tmp_path / "f32.gguf", tmp_path / "q4km.gguf"
    write_gguf(src, cfg, state_dict(random_model(cfg), cfg), tokenizer=bpe_tokenizer, qtype="f32", name="kq")
    assert main(["quantize", "-m", str(src), "-o", str(dst), "--type", "q4_k_m", "--threads", "1"]) == 0
    err = capsys.readouterr()
    assert "Q4_K_M" in err.err and "quality vs source" in err.err and "perplexity" in err.err
    assert "blk.0.ffn_down.weight" in err.out and "Q6_K" in err.out
    assert GGUFFile(dst).tensors["blk.1.attn_k.weight"].qtype.name == "Q4_K"


# ---- the same bytes as llama.cpp ----

PEER_SCRIPT = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), 1
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def llama_cpp_python() -> str | None:
    """An interpreter with llama-cpp-python: this one, or $LLAMA_CPP_PYTHON."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return os.environ.get("LLAMA_CPP_PYTHON")


@pytest.mark.skipif(llama_cpp_python() is None, reason="llama-cpp-python not importable (or set LLAMA_CPP_PYTHON)")
@pytest.mark.parametrize("qtype,ftype,cfg_kw", [("q4_k_m", 15, {}), ("q6_k", 18, {}),
                                                ("q4_k_m", 15, dict(dim=320, n_heads=5, n_kv_heads=5, tie_embeddings=True))])
def test_bytes_match_llama_quantize(tmp_path, qtype, ftype, cfg_kw):
    cfg = kq_config(**cfg_kw)
    sd = state_dict(random_model(cfg), cfg)
    src, ref, ours = tmp_path / "f32.gguf", tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    write_gguf(src, cfg, sd, qtype="f32", name="kq")
    p = subprocess.run([llama_cpp_python(), "-c", PEER_SCRIPT, str(src), str(ref), str(ftype)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1000:]
    write_gguf(ours, cfg, sd, qtype=qtype, name="kq")
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    theirs = {t.name: t for t in b.tensors}
    assert {t.name for t in a.tensors} == set(theirs)
    for t in a.tensors:
        u = theirs[t.name]
        assert t.tensor_type == u.tensor_type, t.name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)), t.name


def test_quantize_names_a_quantized_source(tmp_path):
    from llamaforge.commands.run import _source_quant_types
    from llamaforge.llm import read_weights
    cfg = kq_config(n_layers=2)
    sd = state_dict(random_model(cfg), cfg)
    for qtype, want in (("f32", []), ("q4_1", ["Q4_1", "Q8_0"]), ("q4_k_m", ["Q4_K", "Q6_K"])):
        write_gguf(tmp_path / f"{qtype}.gguf", cfg, sd, qtype=qtype)
        assert _source_quant_types(read_weights(tmp_path / f"{qtype}.gguf")) == want, qtype
