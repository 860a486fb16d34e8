"""GGUF read/write for LLaMA-architecture models, on top of the `gguf` package (gguf-py).

Reading: metadata -> `ModelConfig`, tensors -> our names, block dequantization by gguf-py's
`quants.dequantize` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K). GGUF stores Q/K
for interleaved-pair RoPE, which is our layout, so no permutation happens here.
Writing: `write_gguf` emits the llama.cpp layout (names, metadata, tokenizer) with F32, F16,
BF16 or Q8_0/Q4_0/Q4_1 tensors, quantized by gguf-py's reference quantizers.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import LlamaforgeError

# ours <-> GGUF tensor names (gguf-py constants.py MODEL_TENSOR names for LLM_ARCH_LLAMA)
GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
}


def _name_maps():
    def rx(p):
        return re.compile("^" + re.escape(p).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
    return [(rx(g), o) for o, g in GGUF_NAMES.items()], [(rx(o), g) for o, g in GGUF_NAMES.items()]


_FROM_GGUF, _TO_GGUF = _name_maps()


def map_name(name: str, to_gguf: bool) -> str | None:
    for pat, out in (_TO_GGUF if to_gguf else _FROM_GGUF):
        m = pat.match(name)
        if m:
            return out.format(**m.groupdict())
    return None


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> python value) and `tensors` (gguf-py ReaderTensors)."""

    def __init__(self, path: str | Path):
        import gguf
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
            raise LlamaforgeError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
        self.metadata = {}
        for key, field in self.reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception:
                continue
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.metadata.get("general.architecture")
        if self.architecture != "llama":
            raise LlamaforgeError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported; llamaforge runs 'llama' models")

    def config(self) -> ModelConfig:
        m, a = self.metadata, "llama"
        need = [f"{a}.embedding_length", f"{a}.block_count", f"{a}.attention.head_count", f"{a}.feed_forward_length"]
        missing = [k for k in need if k not in m]
        if missing:
            raise LlamaforgeError(f"{self.path}: GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
        vocab = m.get(f"{a}.vocab_size") or len(m.get("tokenizer.ggml.tokens") or []) or int(self.tensors["token_embd.weight"].shape[1])
        cfg = ModelConfig(
            dim=m[f"{a}.embedding_length"], n_layers=m[f"{a}.block_count"], n_heads=m[f"{a}.attention.head_count"],
            n_kv_heads=m.get(f"{a}.attention.head_count_kv"), hidden_dim=m[f"{a}.feed_forward_length"],
            vocab_size=int(vocab), norm_eps=float(m.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(m.get(f"{a}.rope.freq_base", 10000.0)), max_seq_len=int(m.get(f"{a}.context_length", 2048)),
            tie_embeddings="output.weight" not in self.tensors, name=str(m.get("general.name", "")),
        )
        cfg.norm_eps = float(np.float32(cfg.norm_eps))  # stored as f32 in the file
        if "rope_freqs.weight" in self.tensors:
            cfg.rope_scaling = _match_rope_scaling(cfg, self.tensor("rope_freqs.weight"))
        return cfg

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to fp32, shape in PyTorch order (out_features, in_features)."""
        import gguf
        t = self.tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LlamaforgeError(f"{self.path}: tensor {name} has quantization type {t.tensor_type.name}, "
                                  "which llamaforge cannot read; re-quantize it as Q8_0, Q4_0, Q4_1 or Q4_K/Q5_K/Q6_K") from None
        shape = tuple(int(d) for d in reversed(t.shape))
        return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.tensors:
            if name == "rope_freqs.weight":
                continue
            ours = map_name(name, to_gguf=False)
            if ours is None:
                raise LlamaforgeError(f"{self.path}: unexpected tensor {name!r} for a llama model")
            out[ours] = self.tensor(name)
        return out

    def tensor_info(self) -> list[tuple[str, str, tuple, int]]:
        """(name, type, shape, bytes) for `llamaforge info`."""
        return [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes)) for t in self.reader.tensors]


def _match_rope_scaling(cfg: ModelConfig, factors: torch.Tensor) -> dict:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors (`rope_freqs`); recover the parameters."""
    from .model import precompute_rope  # local: the model module must not depend on file formats
    base = precompute_rope(cfg.head_dim, 2, cfg.rope_theta)[1, :, :]
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        for orig in (8192, 4096, 2048):
            sc = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": orig}
            scaled = precompute_rope(cfg.head_dim, 2, cfg.rope_theta, sc)[1, :, :]
            want = torch.atan2(base[:, 1], base[:, 0]) / torch.atan2(scaled[:, 1], scaled[:, 0])
            if torch.allclose(want, factors.flatten(), rtol=1e-3):
                return sc
    raise LlamaforgeError("GGUF rope_freqs do not match Llama 3.1-style scaling; this RoPE variant is not supported")
