"""Reading GGUF files of LLaMA-architecture models (the llama.cpp file format).

Reading: our own header parser over an mmap of the file (the layout of gguf-py's `GGUFReader`,
ggml `gguf.cpp`), metadata -> `ModelConfig`, tensors -> our names. Q8_0/Q4_0/Q4_1 and the float
types are dequantized by vectorized torch code that equals gguf-py's `quants.dequantize` bit for
bit; every other type gguf-py knows (Q5_0, Q5_1, Q2_K..Q6_K, IQ*) goes through gguf-py. GGUF
stores Q/K for interleaved-pair RoPE, which is our layout, so no permutation happens here.
Writing is gguf_writer.py.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import LlamaforgeError
from .weights import check_shapes, checked_config

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


# ---- reading: the file layout (ggml gguf.cpp) ----

# GGUF metadata value types -> struct format; 8 is string, 9 is array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_U64 = struct.Struct("<Q")
_MAX_NESTING = 8  # llama.cpp writes at most arrays of arrays of strings

# Metadata keys llamaforge reads, and the Python type each must have (a file that lies is refused, not crashed on)
_KEY_TYPES = {"general.architecture": str, "general.name": str, "tokenizer.ggml.model": str, "tokenizer.ggml.pre": str,
              "tokenizer.chat_template": str, "tokenizer.ggml.tokens": (list, str), "tokenizer.ggml.merges": (list, str),
              "tokenizer.ggml.token_type": (list, int), "tokenizer.ggml.scores": (list, (int, float)),
              "tokenizer.ggml.bos_token_id": int, "tokenizer.ggml.eos_token_id": int, "tokenizer.ggml.padding_token_id": int,
              "tokenizer.ggml.unknown_token_id": int, "tokenizer.ggml.add_bos_token": bool,
              "tokenizer.ggml.add_space_prefix": bool}


class _Corrupt(Exception):
    pass


# ggml type id -> (name, values per block, bytes per block) for the types LLaMA files carry, as gguf-py's
# GGML_QUANT_SIZES has them (test_gguf checks they agree). Opening a file needs nothing else, and
# `import gguf` costs ~0.17 s of a chat's start (it imports requests and sentencepiece); other ids ask gguf-py.
_GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
               7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
               12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2)}
GGMLType = IntEnum("GGMLType", {name: i for i, (name, _, _) in _GGML_TYPES.items()})  # == gguf-py's members by value


def ggml_type(type_id: int):
    """(type, values per block, bytes per block) of a ggml type id; ValueError for an unknown id."""
    if type_id in _GGML_TYPES:
        _, block, size = _GGML_TYPES[type_id]
        return GGMLType(type_id), block, size
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    qtype = GGMLQuantizationType(type_id)
    return (qtype, *GGML_QUANT_SIZES[qtype])


@dataclass
class GGUFTensor:
    name: str
    qtype: object  # GGMLType or gguf.GGMLQuantizationType (equal by value)
    shape: tuple[int, ...]  # PyTorch order: (out_features, in_features)
    offset: int  # absolute byte offset in the file
    n_bytes: int


class _Cursor:
    """Reads GGUF values from a buffer, checking every length against what is left."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.off = buf, size, 0

    def take(self, fmt: str):
        s = struct.calcsize(fmt)
        if self.off + s > self.size:
            raise _Corrupt("truncated: it ends inside the header")
        v = struct.unpack_from(fmt, self.buf, self.off)[0]
        self.off += s
        return v

    def count(self, min_item_size: int) -> int:
        n = self.take("<Q")
        if n * min_item_size > self.size - self.off:
            raise _Corrupt(f"truncated or corrupt: it claims {n} items, more than the {self.size - self.off} bytes left hold")
        return n

    def string(self) -> str:
        n = self.count(1)
        s = self.buf[self.off:self.off + n]
        self.off += n
        return str(s, "utf-8", "replace")

    def strings(self, n: int) -> list[str]:
        # the tokenizer's 10^5 strings: the hot loop of opening a file, kept minimal
        buf, off, size, unpack, out = self.buf, self.off, self.size, _U64.unpack_from, []
        for _ in range(n):
            if off + 8 > size:
                raise _Corrupt("truncated: it ends inside a string array")
            ln = unpack(buf, off)[0]
            out.append(str(buf[off + 8:off + 8 + ln], "utf-8", "replace"))
            off += 8 + ln
        if off > size:
            raise _Corrupt("truncated: it ends inside a string array")
        self.off = off
        return out

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise _Corrupt(f"unknown metadata value type {vtype}")
        sub = self.take("<I")
        if sub == 8:
            return self.strings(self.count(8))
        if sub == 9:  # nested arrays (rare): element by element, to a bounded depth (no RecursionError)
            if depth >= _MAX_NESTING:
                raise _Corrupt(f"metadata arrays nested more than {_MAX_NESTING} deep")
            return [self.value(9, depth + 1) for _ in range(self.count(12))]
        if sub not in _ARRAY_DTYPES:
            raise _Corrupt(f"unknown metadata array type {sub}")
        dt = np.dtype(_ARRAY_DTYPES[sub])
        n = self.count(dt.itemsize)
        arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.off)
        self.off += n * dt.itemsize
        return arr.tolist()


def _parse(buf, size: int) -> tuple[dict, list[tuple], int]:
    """-> (metadata, [(name, dims in file order, type id, relative offset)], data start)."""
    c = _Cursor(buf, size)
    if c.take("<I") != 0x46554747:  # b"GGUF"
        raise _Corrupt("no GGUF magic")
    version = c.take("<I")
    if version not in (2, 3):
        if version in (2 << 24, 3 << 24):
            raise _Corrupt("big-endian GGUF; llamaforge reads little-endian files")
        raise _Corrupt(f"GGUF version {version}; llamaforge reads versions 2 and 3")
    n_tensors, n_kv = c.count(8 + 4 + 4 + 8 + 8), c.count(8 + 4 + 1)
    meta = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("<I")
        if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
        dims = tuple(c.take("<Q") for _ in range(n_dims))
        infos.append((name, dims, c.take("<I"), c.take("<Q")))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Corrupt(f"invalid general.alignment {str(align)[:40]!r}")
    for key, want in _KEY_TYPES.items():
        v = meta.get(key)
        kind, item = want if isinstance(want, tuple) else (want, None)
        if v is not None and (not isinstance(v, kind) or (item and not all(isinstance(x, item) for x in v))):
            raise _Corrupt(f"metadata {key} is not a {kind.__name__}{' of ' + str(item) if item else ''}")
    return meta, infos, (c.off + align - 1) // align * align


def _tensors(infos: list[tuple], data_start: int, size: int) -> dict[str, GGUFTensor]:
    out = {}
    for name, dims, type_id, rel in infos:
        try:
            qtype, block, type_size = ggml_type(type_id)
        except ValueError:
            raise _Corrupt(f"tensor {name!r} has unknown ggml type id {type_id}") from None
        n = math.prod(dims)
        if dims[0] % block:
            raise _Corrupt(f"tensor {name!r} has rows of {dims[0]} values, not a multiple of the {qtype.name} block ({block})")
        n_bytes = n // block * type_size
        if data_start + rel + n_bytes > size:
            raise _Corrupt(f"truncated: tensor {name!r} ends past the end of the file")
        out[name] = GGUFTensor(name, qtype, tuple(int(d) for d in reversed(dims)), data_start + rel, n_bytes)
    return out


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> python value) and `tensors` (name -> GGUFTensor).

    The file is mapped copy-on-write: F32 tensors are returned as views of the mapping (no copy),
    quantized ones are dequantized from it. `check_architecture=False` opens any architecture.
    """

    def __init__(self, path: str | Path, check_architecture: bool = True):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 24:
                    raise _Corrupt(f"{size} bytes long, too short for a GGUF header")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self.metadata, infos, data_start = _parse(self._mm, size)
            self.tensors = _tensors(infos, data_start, size)
        except _Corrupt as e:
            raise LlamaforgeError(f"{self.path} is not a readable GGUF file: {e}") from None
        except OSError as e:
            raise LlamaforgeError(f"cannot read {self.path}: {e.strerror or e}") from None
        self.architecture = self.metadata.get("general.architecture")
        if check_architecture and self.architecture != "llama":
            raise LlamaforgeError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported; llamaforge runs 'llama' models")

    def config(self) -> ModelConfig:
        """The model config in the metadata, checked against sane bounds and against the tensors' shapes
        (read from the header: nothing is built or dequantized), so that a file that lies is refused."""
        m, a = self.metadata, "llama"
        need = [f"{a}.embedding_length", f"{a}.block_count", f"{a}.attention.head_count", f"{a}.feed_forward_length"]
        missing = [k for k in need if k not in m]
        if missing:
            raise LlamaforgeError(f"{self.path}: GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
        emb = self.tensors.get("token_embd.weight")
        vocab = m.get(f"{a}.vocab_size") or len(m.get("tokenizer.ggml.tokens") or []) or (emb.shape[0] if emb else 0)
        keys = {"dim": "embedding_length", "n_layers": "block_count", "n_heads": "attention.head_count",
                "n_kv_heads": "attention.head_count_kv", "hidden_dim": "feed_forward_length", "vocab_size": "vocab_size",
                "norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base", "max_seq_len": "context_length"}
        cfg = checked_config(self.path, {k: f"{a}.{v}" for k, v in keys.items()},
                             dim=m[f"{a}.embedding_length"], n_layers=m[f"{a}.block_count"], n_heads=m[f"{a}.attention.head_count"],
                             n_kv_heads=m.get(f"{a}.attention.head_count_kv"), hidden_dim=m[f"{a}.feed_forward_length"],
                             vocab_size=vocab, norm_eps=m.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
                             rope_theta=m.get(f"{a}.rope.freq_base", 10000.0), max_seq_len=m.get(f"{a}.context_length", 2048),
                             tie_embeddings="output.weight" not in self.tensors, name=str(m.get("general.name", "")))
        rot = m.get(f"{a}.rope.dimension_count", cfg.head_dim)
        if rot != cfg.head_dim or m.get(f"{a}.attention.key_length", cfg.head_dim) != cfg.head_dim:
            raise LlamaforgeError(f"{self.path}: head size or rope dimension ({str(rot)[:20]}) differs from dim / n_heads = {cfg.head_dim}; not supported")
        shapes = {}
        for name, t in self.tensors.items():
            ours = map_name(name, to_gguf=False)
            if ours is None and name != "rope_freqs.weight":
                raise LlamaforgeError(f"{self.path}: unexpected tensor {name!r} for a llama model")
            shapes[ours] = t.shape
        shapes.pop(None, None)
        check_shapes(self.path, cfg, shapes)
        if "rope_freqs.weight" in self.tensors:
            if self.tensors["rope_freqs.weight"].shape != (cfg.head_dim // 2,):
                raise LlamaforgeError(f"{self.path}: rope_freqs.weight has shape {self.tensors['rope_freqs.weight'].shape}, "
                                      f"expected ({cfg.head_dim // 2},): the file is corrupt")
            cfg.rope_scaling = _match_rope_scaling(cfg, self.tensor("rope_freqs.weight"))
        return cfg

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 view of the mapping: (rows, bytes per row)."""
        t = self.tensors[name]
        raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=t.n_bytes, offset=t.offset)
        return raw.view(math.prod(t.shape[:-1]), -1)

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that has been copied out (madvise DONTNEED), so that loading
        a model tensor by tensor never holds the whole file and the whole model in memory at once."""
        t = self.tensors[name]
        page = mmap.PAGESIZE
        start = (t.offset + page - 1) // page * page  # only whole pages inside this tensor
        end = (t.offset + t.n_bytes) // page * page
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to fp32, shape in PyTorch order (out_features, in_features)."""
        t = self.tensors[name]
        try:
            return dequantize(self.raw(name), t.qtype, t.shape)
        except NotImplementedError:
            raise LlamaforgeError(f"{self.path}: tensor {name} has quantization type {t.qtype.name}, which llamaforge "
                                  "cannot read; re-quantize it as Q8_0, Q4_0, Q4_1 or a K-quant (Q4_K, Q6_K...)") from None

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
        return [(t.name, t.qtype.name, t.shape, t.n_bytes) for t in self.tensors.values()]


def _match_rope_scaling(cfg: ModelConfig, factors: torch.Tensor) -> dict:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors (`rope_freqs`); recover the parameters."""
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        for orig in (8192, 4096, 2048):
            sc = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": orig}
            if torch.allclose(rope_freq_factors(cfg.head_dim, cfg.rope_theta, sc), factors.flatten(), rtol=1e-3):
                return sc
    raise LlamaforgeError("GGUF rope_freqs do not match Llama 3.1-style scaling; this RoPE variant is not supported")


def rope_freq_factors(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling as llama.cpp's per-frequency divisors (convert_hf_to_gguf.py LlamaModel): (head_dim // 2,)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    factor, low, high, old_ctx = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# ---- dequantization: one function per block type, each equal to gguf-py quants.py bit for bit ----
# blocks: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32. The products and sums
# are single fp32 operations in the same order as gguf-py, so the roundings are identical.

def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c dequantize_row_q8_0: block = f16 d, 32 x int8 q; y = q * d."""
    d = blocks[:, :2].view(torch.float16).float()  # (n_blocks, 1)
    return blocks[:, 2:].view(torch.int8).float().mul_(d)


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    # (..., 16) bytes -> (..., 32): low nibbles are values 0..15, high nibbles 16..31 (ggml-quants.c)
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c dequantize_row_q4_0: block = f16 d, 16 bytes of nibbles; y = (q - 8) * d."""
    d = blocks[:, :2].view(torch.float16).float()
    return (nibbles(blocks[:, 2:]).to(torch.int8) - 8).float().mul_(d)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c dequantize_row_q4_1: block = f16 d, f16 m, 16 bytes of nibbles; y = q * d + m."""
    d = blocks[:, 0:2].view(torch.float16).float()
    m = blocks[:, 2:4].view(torch.float16).float()
    return nibbles(blocks[:, 4:]).float().mul_(d).add_(m)


_DEQUANTIZERS = {"Q8_0": (dequantize_q8_0, 32, 34), "Q4_0": (dequantize_q4_0, 32, 18), "Q4_1": (dequantize_q4_1, 32, 20)}
_CHUNK_BLOCKS = 1 << 15  # work on ~1M values at a time so the temporaries stay in cache


def dequantize(raw: torch.Tensor, qtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw uint8 data of a tensor -> fp32 of `shape`. F32 data comes back as a view, not a copy."""
    name = qtype.name
    if name == "F32":
        return raw.view(torch.float32).view(shape)
    if name in ("F16", "BF16"):
        return raw.view(torch.float16 if name == "F16" else torch.bfloat16).float().view(shape)
    if name not in _DEQUANTIZERS:  # everything else: gguf-py's reference code
        import gguf
        arr = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(int(qtype)))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).view(shape)
    fn, block_size, type_size = _DEQUANTIZERS[name]
    blocks = raw.reshape(-1, type_size)  # (n_blocks, type_size)
    out = torch.empty(blocks.size(0), block_size, dtype=torch.float32)
    for s in range(0, blocks.size(0), _CHUNK_BLOCKS):
        out[s:s + _CHUNK_BLOCKS] = fn(blocks[s:s + _CHUNK_BLOCKS])
    return out.view(shape)
