"""GGUF read/write for LLaMA-architecture models (the llama.cpp file format).

Reading: our own header parser over an mmap of the file (the layout of gguf-py's `GGUFReader`,
ggml `gguf.cpp`), metadata -> `ModelConfig`, tensors -> our names. Q8_0/Q4_0/Q4_1 and the float
types are dequantized by vectorized torch code that equals gguf-py's `quants.dequantize` bit for
bit; every other type gguf-py knows (Q5_0, Q5_1, Q2_K..Q6_K, IQ*) goes through gguf-py. GGUF
stores Q/K for interleaved-pair RoPE, which is our layout, so no permutation happens here.
Writing: `write_gguf` emits the llama.cpp layout (`convert_hf_to_gguf.py` names, hyperparameters,
`rope_freqs`, tokenizer) with tensors quantized by gguf-py's reference quantizers.
"""
from __future__ import annotations

import base64
import json
import math
import mmap
import os
import re
import struct
import uuid
from dataclasses import dataclass
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


# ---- reading: the file layout (ggml gguf.cpp) ----

# GGUF metadata value types -> struct format; 8 is string, 9 is array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_U64 = struct.Struct("<Q")


class _Corrupt(Exception):
    pass


@dataclass
class GGUFTensor:
    name: str
    qtype: object  # gguf.GGMLQuantizationType
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

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise _Corrupt(f"unknown metadata value type {vtype}")
        sub = self.take("<I")
        if sub == 8:
            return self.strings(self.count(8))
        if sub == 9:  # nested arrays (rare): element by element
            return [self.value(9) for _ in range(self.count(12))]
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
        raise _Corrupt(f"invalid general.alignment {align!r}")
    return meta, infos, (c.off + align - 1) // align * align


def _tensors(infos: list[tuple], data_start: int, size: int) -> dict[str, GGUFTensor]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    out = {}
    for name, dims, type_id, rel in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise _Corrupt(f"tensor {name!r} has unknown ggml type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
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
        m, a = self.metadata, "llama"
        need = [f"{a}.embedding_length", f"{a}.block_count", f"{a}.attention.head_count", f"{a}.feed_forward_length"]
        missing = [k for k in need if k not in m]
        if missing:
            raise LlamaforgeError(f"{self.path}: GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
        emb = self.tensors.get("token_embd.weight")
        vocab = m.get(f"{a}.vocab_size") or len(m.get("tokenizer.ggml.tokens") or []) or (emb.shape[0] if emb else 0)
        cfg = ModelConfig(
            dim=m[f"{a}.embedding_length"], n_layers=m[f"{a}.block_count"], n_heads=m[f"{a}.attention.head_count"],
            n_kv_heads=m.get(f"{a}.attention.head_count_kv"), hidden_dim=m[f"{a}.feed_forward_length"],
            vocab_size=int(vocab), norm_eps=float(m.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(m.get(f"{a}.rope.freq_base", 10000.0)), max_seq_len=int(m.get(f"{a}.context_length", 2048)),
            tie_embeddings="output.weight" not in self.tensors, name=str(m.get("general.name", "")),
        )
        rot = m.get(f"{a}.rope.dimension_count", cfg.head_dim)
        if rot != cfg.head_dim or m.get(f"{a}.attention.key_length", cfg.head_dim) != cfg.head_dim:
            raise LlamaforgeError(f"{self.path}: head size or rope dimension ({rot}) differs from dim / n_heads = {cfg.head_dim}; not supported")
        if "rope_freqs.weight" in self.tensors:
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


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # (n_blocks, 16) bytes -> (n_blocks, 32): low nibbles are values 0..15, high nibbles 16..31
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c dequantize_row_q4_0: block = f16 d, 16 bytes of nibbles; y = (q - 8) * d."""
    d = blocks[:, :2].view(torch.float16).float()
    return (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float().mul_(d)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c dequantize_row_q4_1: block = f16 d, f16 m, 16 bytes of nibbles; y = q * d + m."""
    d = blocks[:, 0:2].view(torch.float16).float()
    m = blocks[:, 2:4].view(torch.float16).float()
    return _nibbles(blocks[:, 4:]).float().mul_(d).add_(m)


_DEQUANTIZERS = {"Q8_0": (dequantize_q8_0, 32, 34), "Q4_0": (dequantize_q4_0, 32, 18), "Q4_1": (dequantize_q4_1, 32, 20)}
_CHUNK_BLOCKS = 1 << 15  # work on ~1M values at a time so the temporaries stay in cache


def dequantize(raw: torch.Tensor, qtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw uint8 data of a tensor -> fp32 of `shape`. F32 data comes back as a view, not a copy."""
    import gguf
    name = qtype.name
    if name == "F32":
        return raw.view(torch.float32).view(shape)
    if name in ("F16", "BF16"):
        return raw.view(torch.float16 if name == "F16" else torch.bfloat16).float().view(shape)
    if name not in _DEQUANTIZERS:  # everything else: gguf-py's reference code
        arr = gguf.quants.dequantize(raw.numpy(), qtype)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).view(shape)
    fn, block_size, type_size = _DEQUANTIZERS[name]
    blocks = raw.reshape(-1, type_size)  # (n_blocks, type_size)
    out = torch.empty(blocks.size(0), block_size, dtype=torch.float32)
    for s in range(0, blocks.size(0), _CHUNK_BLOCKS):
        out[s:s + _CHUNK_BLOCKS] = fn(blocks[s:s + _CHUNK_BLOCKS])
    return out.view(shape)


# ---- writing ----

_QTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
           "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1")}


def _tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str):
    """The type one tensor is stored as: 1-D tensors stay F32; 4-bit files keep the embedding and
    output at Q8_0 (llama-quantize keeps them at 6+ bits too); rows that are not a whole number of
    blocks fall back to F16, as llama.cpp's converter does."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    if len(shape) == 1:
        return Q.F32
    t = Q[_QTYPES[qtype][0]]
    if t in (Q.Q4_0, Q.Q4_1) and gguf_name in ("token_embd.weight", "output.weight"):
        t = Q.Q8_0
    if shape[-1] % GGML_QUANT_SIZES[t][0]:
        t = Q.F16
    return t


def write_gguf(path: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer=None,
               chat_template: str | None = None, qtype: str = "f32", name: str = "") -> dict[str, tuple[str, float]]:
    """Write a llama.cpp-loadable GGUF file atomically (temp file + rename).

    `state_dict` uses our names, fp32 tensors, interleaved-pair RoPE layout (what `GGUFFile`,
    `load_hf` and `load_meta` return). Returns, per written tensor, (type, max abs error of the
    stored values), the quantizers' reconstruction error.
    """
    import gguf
    if qtype not in _QTYPES:
        raise LlamaforgeError(f"unknown GGUF tensor type {qtype!r}; choose one of {', '.join(_QTYPES)}")
    path = Path(path)
    tensors = _gguf_tensors(cfg, state_dict)
    w = gguf.GGUFWriter(None, "llama")
    _write_hparams(w, cfg, name, gguf.LlamaFileType[_QTYPES[qtype][1]])
    if tokenizer is not None:
        _write_tokenizer(w, tokenizer, cfg.vocab_size)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        w.add_chat_template(template)
    plan = []
    for gname, t in tensors.items():
        ttype = _tensor_type(gname, tuple(t.shape), qtype)
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), t.numel() // block * type_size, raw_dtype=ttype)
        plan.append((gname, t, ttype))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same directory: rename is atomic
    report = {}
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, t, ttype in plan:  # one tensor at a time: quantize, write, forget
            arr = t.detach().float().contiguous().numpy()
            data = gguf.quants.quantize(arr, ttype)
            w.write_tensor_data(data)
            report[gname] = (ttype.name, _max_error(data, ttype, t))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return report


def _max_error(data: np.ndarray, ttype, t: torch.Tensor) -> float:
    if ttype.name == "F32" or t.numel() == 0:
        return 0.0
    back = dequantize(torch.from_numpy(data.view(np.uint8)).view(math.prod(t.shape[:-1]), -1), ttype, tuple(t.shape))
    return float(back.sub_(t.detach().float()).abs_().max())


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv, d, h = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    layer = {"attention_norm": (d,), "ffn_norm": (d,), "attention.wq": (q, d), "attention.wk": (kv, d),
             "attention.wv": (kv, d), "attention.wo": (d, q), "feed_forward.w1": (h, d), "feed_forward.w2": (d, h),
             "feed_forward.w3": (h, d)}
    out = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (cfg.vocab_size, d)
    out.update({f"layers.{i}.{k}.weight": s for i in range(cfg.n_layers) for k, s in layer.items()})
    return out


def _gguf_tensors(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> GGUF names, checked against the config; tied output omitted, rope_freqs added."""
    want = _expected_shapes(cfg)
    sd = {k: v for k, v in state_dict.items() if not (k == "output.weight" and cfg.tie_embeddings)}
    for k, v in sd.items():
        if map_name(k, to_gguf=True) is None:
            raise LlamaforgeError(f"cannot write tensor {k!r} to GGUF: not a llama weight (quantized or LoRA modules must be merged first)")
        if not v.is_floating_point():
            raise LlamaforgeError(f"cannot write tensor {k!r} of dtype {v.dtype} to GGUF: pass floating-point weights")
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} (config: {want[k]})" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or extra or wrong:
        raise LlamaforgeError(f"the state dict does not match the config: missing {missing[:3]}, unexpected {extra[:3]}, "
                              f"wrong shapes {wrong[:2]}")
    out = {}
    if cfg.rope_scaling:
        out["rope_freqs.weight"] = rope_freq_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    out.update({map_name(k, to_gguf=True): v for k, v in sd.items()})
    return out


def _write_hparams(w, cfg: ModelConfig, name: str, file_type) -> None:
    if name or cfg.name:
        w.add_name(name or cfg.name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_file_type(int(file_type))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    if file_type.name not in ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"):
        w.add_quantization_version(2)  # GGML_QNT_VERSION


# ---- tokenizer -> tokenizer.ggml.* (convert_hf_to_gguf.py get_vocab_base / _set_vocab_sentencepiece) ----

_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # GGUF token types (gguf-py TokenType)


def _write_tokenizer(w, tokenizer, vocab_size: int) -> None:
    kind = getattr(tokenizer, "kind", None)
    if kind == "bpe":
        v = _bpe_vocab(tokenizer.tok, tokenizer.specials)
    elif kind == "tiktoken":
        v = _tiktoken_vocab(tokenizer)
    elif kind == "sentencepiece":
        v = _spm_vocab(tokenizer)
    else:
        raise LlamaforgeError(f"cannot write a {type(tokenizer).__name__} tokenizer to GGUF: "
                              "supported are byte-level BPE, SentencePiece and tiktoken")
    tokens, types, scores = v["tokens"], v["types"], v.get("scores")
    if len(tokens) > vocab_size:
        raise LlamaforgeError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    for i in range(len(tokens), vocab_size):  # padded embedding rows, named as llama.cpp's converter does
        tokens.append(f"[PAD{i}]")
        types.append(_UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    w.add_tokenizer_model(v["model"])
    if v.get("pre"):
        w.add_tokenizer_pre(v["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if v.get("merges"):
        w.add_token_merges(v["merges"])
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else v.get("pad")
    for add, i in ((w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id),
                   (w.add_unk_token_id, v.get("unk")), (w.add_pad_token_id, pad)):
        if i is not None:
            add(int(i))
    if "add_space_prefix" in v:
        w.add_add_space_prefix(v["add_space_prefix"])
    w.add_add_bos_token(bool(tokenizer.add_bos))
    w.add_add_eos_token(False)


def _pre_name(pt: dict | None) -> str:
    """tokenizer.json `pre_tokenizer` -> llama.cpp's `tokenizer.ggml.pre` name."""
    from .tokenizer import GPT2_PATTERN, LLAMA3_PATTERN
    items = (pt.get("pretokenizers") if pt and pt.get("type") == "Sequence" else [pt] if pt else []) or []
    kinds = [p.get("type") for p in items]
    regex = lambda p: (p.get("pattern") or {}).get("Regex")  # noqa: E731
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and regex(items[0]) == GPT2_PATTERN and not items[1].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and regex(items[0]) == LLAMA3_PATTERN and not items[1].get("use_regex", True):
        return "llama-bpe"
    raise LlamaforgeError(f"cannot name this tokenizer's pre-tokenizer for llama.cpp ({json.dumps(pt)[:120]}); "
                          "supported are GPT-2 (gpt-2), SmolLM (smollm) and Llama 3 (llama-bpe) byte-level BPE")


def _bpe_vocab(tok, specials: dict[str, int]) -> dict:
    """A byte-level BPE `tokenizers.Tokenizer` -> GGUF `gpt2` vocabulary."""
    data = json.loads(tok.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise LlamaforgeError("GGUF 'gpt2' vocabularies are byte-level BPE; this tokenizer.json is "
                              f"{model.get('type')} with a {(data.get('decoder') or {}).get('type')} decoder")
    pre = _pre_name(data.get("pre_tokenizer"))
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [_UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, _NORMAL
    for i, added in tok.get_added_tokens_decoder().items():
        types[i] = _CONTROL if added.special else _USER_DEFINED
    for t, i in specials.items():
        types[i] = _CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges, "add_space_prefix": False,
            "unk": vocab.get(model.get("unk_token")) if model.get("unk_token") else None}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tiktoken_vocab(tokenizer) -> dict:
    """tiktoken ranks -> byte-level tokens and merges: transformers' TikTokenConverter, which lists
    every split of a token into two tokens of lower rank, ordered by (rank, left rank, right rank)."""
    ranks = {}
    for line in Path(tokenizer.path).read_text().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = _bytes_to_unicode()
    text = lambda b: "".join(b2u[c] for c in b)  # noqa: E731
    merges = []
    for token, rank in ranks.items():
        found = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                found.append((ranks[left], ranks[right], left, right))
        merges.extend((rank, lr, rr, f"{text(left)} {text(right)}") for lr, rr, left, right in found)
    merges.sort(key=lambda m: m[:3])
    tokens = [""] * len(ranks)
    for token, rank in ranks.items():
        tokens[rank] = text(token)
    types = [_NORMAL] * len(tokens)
    for s, i in sorted(tokenizer.specials.items(), key=lambda kv: kv[1]):
        if i != len(tokens):
            raise LlamaforgeError(f"tiktoken special token {s!r} has id {i}; expected the specials right after the {len(ranks)} ranks")
        tokens.append(s)
        types.append(_CONTROL)
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": [m[3] for m in merges],
            "add_space_prefix": False}


def _spm_vocab(tokenizer) -> dict:
    """SentencePiece ModelProto -> GGUF `llama` vocabulary; sentencepiece's piece types are GGUF's token types."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(tokenizer.proto)
    if m.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise LlamaforgeError("GGUF 'llama' vocabularies are SentencePiece BPE; this tokenizer.model is a "
                              f"{pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)} model")
    sp = tokenizer.sp
    return {"model": "llama", "tokens": [p.piece for p in m.pieces], "types": [int(p.type) for p in m.pieces],
            "scores": [float(p.score) for p in m.pieces], "unk": sp.unk_id() if sp.unk_id() >= 0 else None,
            "pad": sp.pad_id() if sp.pad_id() >= 0 else None, "add_space_prefix": bool(m.normalizer_spec.add_dummy_prefix)}
