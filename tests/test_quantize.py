"""Quantized layers and models: error bounds, GGUF block repacking, KL to fp32, quantize -> load round trip."""
import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llamaforge
from llamaforge.gguf import GGUFFile
from llamaforge.gguf_writer import write_gguf
from llamaforge.model import Transformer
from llamaforge import native
from llamaforge.quantize import (BlockLinear, Int4Linear, Int8Linear, dequantize_int4, int4_from_gguf, quantize_int4, quantize_int8,
                                 quantize_model, weight_bytes)

from conftest import needs_default_model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rows", [1, 3, 64])  # kernel path (few rows) and dequantize path (many rows)
def test_int8_linear_within_bound(rows):
    w, x = torch.randn(256, 128), torch.randn(rows, 128)
    lin = Int8Linear.from_float(w)
    q, s = quantize_int8(w)
    assert (q.float() * s.float()[:, None] - w).abs().max() <= s.float().max() / 2 * 1.01  # half a step per weight
    assert rel_err(lin(x), x @ w.t()) < 0.01  # + bf16 activations on the kernel path


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_within_bound(rows, group_size):
    w, x = torch.randn(128, 256), torch.randn(rows, 256)
    q, scales, zeros = quantize_int4(w, group_size)
    back = dequantize_int4(q, scales, zeros)
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()  # min-max grid: at most half a step
    lin = Int4Linear.from_float(w, group_size)
    assert torch.equal(lin.int4_values(), q)  # the packed layout unpacks to the same nibbles
    assert rel_err(lin(x), x @ w.t()) < 0.12  # 4-bit: ~1/30 of each group's range


def test_own_packing_equals_atens():
    from llamaforge.quantize import _pack_blocked, cpu_int4_width
    width = cpu_int4_width()
    if not width:
        pytest.skip("the CPU int4 kernel layout is unknown on this machine")
    q = torch.randint(0, 16, (256, 96), dtype=torch.uint8)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(_pack_blocked(q, width), ref.view(256, 48))


def test_int4_rows_layout_matches_cpu_layout():
    w, x = torch.randn(128, 64), torch.randn(2, 64)
    packed, rows = Int4Linear.from_float(w), Int4Linear.from_int4(*quantize_int4(w), pack_for_cpu=False)
    assert rows.layout == "rows"
    assert torch.equal(packed.dequantize(), rows.dequantize())
    assert torch.allclose(packed(x), rows(x), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_repack_exactly(qtype):
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    raw = torch.from_numpy(gguf.quants.quantize(w, qt).view(np.uint8).copy()).view(64, -1)
    ref = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qt)).reshape(64, 128)
    q, scales, zeros = int4_from_gguf(raw, qtype, (64, 128))
    assert torch.allclose(dequantize_int4(q, scales, zeros), ref, atol=1e-6)  # exact up to fp32 rounding
    lin = Int4Linear.from_int4(q, scales, zeros)
    assert rel_err(lin.dequantize(), ref) < 0.01  # only d, m rounded to bf16 by the kernel format


def kl(logits_q, logits_ref):
    return F.kl_div(logits_q.log_softmax(-1), logits_ref.log_softmax(-1), log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("mode,bound", [("int8", 1e-3), ("int4", 0.05)])
def test_quantized_tiny_model_kl(tiny_config, mode, bound):
    model = Transformer(tiny_config).eval()
    model.init_weights(std=0.1)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 48))
    with torch.no_grad():
        ref = model(ids)[0]
        full_bytes = weight_bytes(model)
        quantize_model(model, mode)
        out = model(ids)[0]
        model.setup_caches(1, 64)
        step = model(ids[:, :1], torch.tensor([0]))[0]  # the kernel path (one row)
    assert kl(out, ref) < bound and kl(step, ref[:1]) < bound
    assert weight_bytes(model) < full_bytes / (3 if mode == "int8" else 4)  # int8 tables dominate a tiny model


@needs_default_model
def test_default_model_quantized_close_to_fp32(default_llm, default_llm_q):
    ids = default_llm.tokenizer.encode("The history of the printing press begins in the fifteenth century, when "
                                       "Johannes Gutenberg combined movable metal type, oil-based ink and a wooden press.")
    ref, q = default_llm.logits(ids), default_llm_q.logits(ids)
    assert kl(q, ref) < 0.01
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert weight_bytes(default_llm_q.model) < 110e6  # stays 4/8-bit in memory: never a full fp32 copy
    # the file's Q4_1 blocks as stored when the native kernels are built; else repacked for PyTorch's int4 kernel
    assert isinstance(default_llm_q.model.layers[0].attention.wq, BlockLinear if native.available() else Int4Linear)


def test_quantize_writes_gguf_that_loads_back(tiny_config, tmp_path):
    from llamaforge.commands import main
    model = Transformer(tiny_config).eval()
    model.init_weights(std=0.1)
    src = tmp_path / "f32.gguf"
    write_gguf(src, tiny_config, {k: v for k, v in model.state_dict().items()}, qtype="f32")
    for mode, qt in (("int8", "Q8_0"), ("int4", "Q4_0")):
        dst = tmp_path / f"{mode}.gguf"
        assert main(["quantize", str(src), str(dst), "--mode", mode]) == 0
        gf = GGUFFile(dst)
        assert gf.tensors["blk.0.attn_q.weight"].qtype.name == qt
        # the file loads back identically: our dequantization equals gguf-py's for every tensor
        for name, t in gf.tensors.items():
            ref = gguf.quants.dequantize(gf.raw(name).numpy(), t.qtype).reshape(t.shape)
            assert np.array_equal(gf.tensor(name).numpy(), ref)
        llm = llamaforge.load(dst, quantize="none")
        ids = torch.randint(0, tiny_config.vocab_size, (32,))
        with torch.no_grad():
            ref_logits = model(ids[None])[0]
        assert kl(llm.logits(ids.tolist()), ref_logits) < (1e-3 if mode == "int8" else 0.05)


def test_perplexity_matches_direct_cross_entropy(tiny_config):
    from llamaforge.llm import LLM
    from llamaforge.evaluation.perplexity import perplexity
    model = Transformer(tiny_config).eval()
    model.init_weights(std=0.1)
    llm = LLM(model, None, None)
    ids = torch.randint(0, tiny_config.vocab_size, (200,)).tolist()
    with torch.no_grad():
        direct = F.cross_entropy(model(torch.tensor([ids]))[0, :-1], torch.tensor(ids[1:])).item()
    one = perplexity(llm, ids, window=200)
    assert one["tokens"] == 199 and abs(one["nll"] - direct) < 1e-5
    strided = perplexity(llm, ids, window=64, stride=32)
    assert strided["tokens"] == 199 and abs(strided["nll"] - direct) < 0.5  # less context per token, same text
    disjoint = perplexity(llm, ids, window=50, stride=50)
    assert disjoint["tokens"] == 199
