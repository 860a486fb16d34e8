"""Weight-only quantization: int8 (per output channel) and int4 (groupwise, asymmetric) Linear
layers with PyTorch's packed CPU kernels, GGUF block repacking, and `quantize_model()`.

Order as gpt-fast `quantize.py`: tensor primitives, then modules holding buffers, then functions
that swap modules of a built model in place (model.py knows nothing of this).

Kernels (measured on the 2-core AVX-512 CI machine, see shared/PERF-NOTES.md): few-row inputs
(decode) go through `aten._weight_int4pack_mm_for_cpu` / `aten._weight_int8pack_mm` with bf16
activations, which are fast only with bf16 inputs; many-row inputs (prefill, training) dequantize
the weight to the activation dtype and use the fp32 GEMM, which beats the packed kernels there.
On other devices the same modules dequantize and run a dense matmul (bf16 on CUDA).

The int4 format is tinygemm's: w = (q - 8) * scale + zero, q in 0..15, one (scale, zero) per
group of `group_size` inputs. GGUF Q4_0 (w = (q - 8) d) and Q4_1 (w = q d + m) blocks of 32 map
onto it exactly (scale = d, zero = 0 or m + 8d; ggml-quants.c), up to rounding d and m to bf16.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import LlamaforgeError

DECODE_ROWS = 16  # inputs with at most this many rows use the packed kernels; more rows dequantize
OUTPUT_REFINE = 64  # top logits per row recomputed in fp32 by a quantized output layer


# ---- tensor primitives ----

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) -> q int8 (N, K), scales bf16 (N,).

    Scales are bf16 because the packed kernel takes them so; q is computed against the rounded scale."""
    w = w.float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-10) / 127.0).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric groupwise int4: w (N, K) -> q uint8 (N, K) in 0..15, scales and zeros (N, K // G).

    scale = (max - min) / 15 per group and w ~ (q - 8) * scale + zero with zero = min + 8 scale.
    """
    N, K = w.shape
    if K % group_size:
        raise LlamaforgeError(f"int4 needs in_features ({K}) divisible by the group size ({group_size})")
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(N, K), scales, lo + 8 * scales


ROW_CHUNK = 2048  # rows quantized at a time, so a 7B embedding never needs a whole fp32 copy plus temporaries


def quantize_rows(rows, n_rows: int, fn):
    """Apply a row-wise quantizer `fn` to rows(start, end) -> fp32 chunk, writing each chunk's outputs
    into place (no list of parts plus a concatenated copy: the peak stays one output and one chunk)."""
    outs = None
    for s in range(0, n_rows, ROW_CHUNK):
        e = min(s + ROW_CHUNK, n_rows)
        parts = fn(rows(s, e))
        if outs is None:
            outs = tuple(p.new_empty((n_rows, *p.shape[1:])) for p in parts)
        for out, p in zip(outs, parts):
            out[s:e] = p
    return outs


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    N, K = q.shape
    G = K // scales.size(1)
    g = q.reshape(N, -1, G).to(dtype) - 8
    return (g * scales[..., None].to(dtype) + zeros[..., None].to(dtype)).reshape(N, K)


def _probe_cpu_int4_layout() -> int:
    """Block width of `_convert_weight_to_int4pack_for_cpu` on this CPU (64 on AVX-512, 32 on AVX2), found by
    packing a known matrix: rows n and n + width/2 of each block share a byte, k-major inside the block."""
    N, K = 128, 64
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for width in (64, 32, 16, 8):
        try:
            if torch.equal(_unpack_blocked(packed, N, K, width), q.to(torch.uint8)):
                return width
        except RuntimeError:
            continue
    return 0


def _unpack_blocked(packed: torch.Tensor, N: int, K: int, width: int) -> torch.Tensor:
    b = packed.reshape(N // width, K, width // 2)  # (N / width, K, width / 2)
    q = torch.cat([b & 0x0F, b >> 4], dim=2)  # (N / width, K, width)
    return q.permute(0, 2, 1).reshape(N, K)


def _pack_blocked(q: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of `_unpack_blocked`, in uint8 ops (the ATen packer wants an int32 copy of the matrix)."""
    N, K = q.shape
    b = q.reshape(N // width, 2, width // 2, K)  # rows n and n + width / 2 of each block
    packed = b[:, 0] | (b[:, 1] << 4)  # (N / width, width / 2, K)
    return packed.transpose(1, 2).contiguous().view(N, K // 2)


_CPU_INT4_WIDTH: int | None = None


def cpu_int4_width() -> int:
    global _CPU_INT4_WIDTH
    if _CPU_INT4_WIDTH is None:
        _CPU_INT4_WIDTH = _probe_cpu_int4_layout()
    return _CPU_INT4_WIDTH


_SCRATCH = threading.local()


def _scratch(numel: int, device) -> torch.Tensor:
    """This thread's reusable fp32 buffer for one dequantized weight at a time (grown to the largest)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel or buf.device != torch.device(device):
        buf = _SCRATCH.buf = None  # drop the old one before allocating the larger
        buf = _SCRATCH.buf = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


# ---- modules ----

class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows and one bf16 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Linear":
        return cls.from_rows(lambda s, e: w[s:e], w.size(0), w.size(1), w.device)

    @classmethod
    def from_rows(cls, rows, n_rows: int, n_cols: int, device=None) -> "Int8Linear":
        """rows(start, end) -> fp32 (end - start, n_cols): quantized a chunk at a time."""
        m = cls(n_cols, n_rows, device=device)
        m.weight, m.scales = quantize_rows(rows, n_rows, quantize_int8)
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scales[:, None].to(dtype)

    refine = 0  # for output layers: recompute this many top logits per row exactly (see forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.size(0) <= DECODE_ROWS and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)
            if self.refine:
                # The kernel's bf16 output keeps ~3 significant digits: logits near 20 come out in steps
                # of 0.125, enough to tie or swap the top candidates. Recompute the best `refine` in fp32.
                idx = y.topk(self.refine, dim=-1).indices  # (R, refine)
                rows = self.weight[idx].float() * self.scales[idx].float()[..., None]  # (R, refine, K)
                y = y.scatter(-1, idx, torch.bmm(rows, x2.float()[..., None]).squeeze(-1).to(y.dtype))
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x W^T with W as groupwise int4 (tinygemm format), packed for the CPU kernel when on CPU.

    Buffers: `weight` (packed nibbles), `scales_and_zeros` (K // G, N, 2) bf16; `layout` says how
    the nibbles are packed ('cpu:W' for the CPU kernel's W-row blocks, 'rows' for plain row-major)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = "rows"
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16))

    @classmethod
    def from_int4(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, pack_for_cpu: bool = True) -> "Int4Linear":
        """q (N, K) uint8 0..15, scales/zeros (N, K // G)."""
        N, K = q.shape
        m = cls(K, N, K // scales.size(1))
        m.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        width = cpu_int4_width() if pack_for_cpu and q.device.type == "cpu" else 0
        if width and N % width == 0 and K % 2 == 0:
            m.weight = _pack_blocked(q.to(torch.uint8), width)  # what _convert_weight_to_int4pack_for_cpu makes
            m.layout = f"cpu:{width}"
        else:
            m.weight = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
            m.layout = "rows"
        return m

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 32) -> "Int4Linear":
        return cls.from_rows(lambda s, e: w[s:e], w.size(0), group_size)

    @classmethod
    def from_rows(cls, rows, n_rows: int, group_size: int = 32) -> "Int4Linear":
        return cls.from_int4(*quantize_rows(rows, n_rows, lambda w: quantize_int4(w, group_size)))

    def int4_values(self) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        if self.layout == "rows":
            return torch.stack([self.weight & 0x0F, self.weight >> 4], dim=-1).reshape(N, K)
        return _unpack_blocked(self.weight, N, K, int(self.layout.split(":")[1]))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W (N, K): computed in fp32, then cast. For the CPU packing it is a transposed view of
        `dequantize_t`, which F.linear and matmuls take as is."""
        if self.layout == "rows":
            sz = self.scales_and_zeros  # (K // G, N, 2)
            w = dequantize_int4(self.int4_values(), sz[..., 0].t(), sz[..., 1].t(), torch.float32)
        else:
            w = self.dequantize_t().t()
        return w if dtype == torch.float32 else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.size(0) <= DECODE_ROWS and self.layout.startswith("cpu"):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.weight, self.group_size,
                                                           self.scales_and_zeros).to(x.dtype)
        elif self.layout.startswith("cpu"):
            y = torch.mm(x2.float(), self.dequantize_t(scratch=not torch.is_grad_enabled())).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize_t(self, scratch: bool = False) -> torch.Tensor:
        """W^T (K, N) in fp32 from the CPU kernel's packing, for many-row inputs. The packed bytes run along
        N inside each block of W rows, as the scales and zeros do (K // G, N, 2), so the passes here read
        and write contiguous runs. With `scratch` the result lives in this thread's reused buffer, valid
        until the next call (so never when autograd keeps it): at 7B shapes, page faults on a fresh
        67-180 MB buffer cost more than filling it."""
        N, K, G = self.out_features, self.in_features, self.group_size
        width = int(self.layout.split(":")[1])
        b = self.weight.view(N // width, K, width // 2).transpose(0, 1)  # (K, N / width, width / 2)
        w = (_scratch(K * N, self.weight.device) if scratch else
             torch.empty(K * N, dtype=torch.float32, device=self.weight.device)).view(K, N // width, 2, width // 2)
        w[:, :, 0] = (b & 0x0F).view(torch.int8) - 8  # rows n and n + width / 2 of a block share a byte
        w[:, :, 1] = (b >> 4).view(torch.int8) - 8
        scales, zeros = (t.contiguous() for t in self.scales_and_zeros.float().unbind(-1))  # (K // G, N) each
        g = w.view(K // G, G, N)
        return torch.addcmul(zeros[:, None], g, scales[:, None], out=g).view(K, N)  # (q - 8) * scale + zero

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, layout={self.layout}"


class Int8Embedding(nn.Module):
    """Token embedding as int8 rows + per-row scales; shares its buffers with a tied Int8Linear output."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.weight[ids].float() * self.table.scales[ids][..., None].float()


class BlockLinear(nn.Module):
    """y = x W^T with W kept as the GGUF file's Q4_0 / Q4_1 / Q8_0 blocks, as stored (rows of blocks, uint8,
    a view of the mapped file: nothing is repacked at load). Few-row inputs (decode) run native int8 dot
    products over the blocks (llamaforge.native); many-row inputs dequantize the weight natively and run a
    GEMM: bf16 where the CPU does bf16 in hardware (AMX / AVX512_BF16), fp32 elsewhere."""

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int):
        super().__init__()
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.size(0)
        self.register_buffer("weight", blocks)  # (N, K / 32 * bytes per block) uint8

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        from . import native
        k = native.kernels()
        if k is not None and self.weight.device.type == "cpu":
            kd = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
            return k.dequantize(self.weight, native.QTYPES[self.qtype], self.in_features, kd).to(dtype)
        import gguf
        from .gguf import dequantize
        w = dequantize(self.weight.cpu(), gguf.GGMLQuantizationType[self.qtype], (self.out_features, self.in_features))
        return w.to(device=self.weight.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import native
        x2 = x.reshape(-1, self.in_features)
        k = native.kernels() if x.device.type == "cpu" else None
        grad = torch.is_grad_enabled() and x.requires_grad  # the native kernels have no backward
        if k is not None and not grad and x2.size(0) <= DECODE_ROWS:
            y = k.linear(x2, self.weight, native.QTYPES[self.qtype], self.in_features).to(x.dtype)
        elif not grad and x.dtype == torch.float32 and x.device.type == "cpu" and bf16_prefill():
            y = F.linear(x2.to(torch.bfloat16), self.dequantize(torch.bfloat16)).float()
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


class BlockEmbedding(nn.Module):
    """Token embedding read from GGUF blocks (shares its table with a tied BlockLinear output)."""

    def __init__(self, table: BlockLinear):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        rows = BlockLinear(t.weight[ids.reshape(-1)], t.qtype, t.in_features)  # (n, row bytes): only these rows
        return rows.dequantize().view(*ids.shape, t.in_features)


def bf16_prefill() -> bool:
    """Prompt GEMMs in bf16: on where the CPU has AMX / AVX512_BF16 (475 -> 75 ms for a 512-token
    SmolLM2 prefill), off where oneDNN emulates bf16 (4-5x slower than fp32); LLAMAFORGE_BF16=0/1 forces it."""
    global _BF16
    if _BF16 is None:
        import os
        from .native import cpu_has_fast_bf16
        env = os.environ.get("LLAMAFORGE_BF16")
        _BF16 = env not in ("0", "false", "off") if env is not None else cpu_has_fast_bf16()
    return _BF16


_BF16: bool | None = None

QUANTIZED_LINEARS = (Int8Linear, Int4Linear, BlockLinear)  # weights that are not float parameters


# ---- whole models ----

def quantize_model(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Swap the model's projections for int8/int4 layers in place; the embedding and output become int8
    (tied models share one int8 table). int4 layers whose inputs are not a whole number of groups stay
    int8. Returns the model."""
    if mode not in ("int8", "int4"):
        raise LlamaforgeError(f"unknown quantization mode {mode!r}: use int8 or int4")
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    w = child.weight.detach()
                    int4 = mode == "int4" and w.size(1) % group_size == 0  # otherwise int8, as llama.cpp falls back
                    parent.add_module(name, Int4Linear.from_float(w, group_size) if int4 else Int8Linear.from_float(w))
    quantize_embeddings(model)
    return model


def quantize_embeddings(model: nn.Module) -> None:
    """int8 embedding table and output layer (one shared table when tied)."""
    emb = model.tok_embeddings
    if isinstance(emb, Int8Embedding):
        return
    table = Int8Linear.from_float(emb.weight.detach())
    model.tok_embeddings = Int8Embedding(table)
    model.output = table if model.config.tie_embeddings else Int8Linear.from_float(model.output.weight.detach())
    model.output.refine = OUTPUT_REFINE


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, shared tensors counted once (KV caches excluded)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "cache" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---- GGUF blocks -> quantized modules ----

def int4_from_gguf(raw: torch.Tensor, qtype: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks (rows, bytes per row) uint8 -> (q (N, K) uint8, scales, zeros (N, K // 32)), exactly.

    Q4_0 block: f16 d, 16 bytes; w = (q - 8) d  -> scale d, zero 0.
    Q4_1 block: f16 d, f16 m, 16 bytes; w = q d + m = (q - 8) d + (m + 8 d)  -> scale d, zero m + 8 d."""
    from .gguf import nibbles
    N, K = shape
    header = {"Q4_0": 2, "Q4_1": 4}[qtype]
    blocks = raw.reshape(N, K // 32, header + 16)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # (N, K // 32)
    q = nibbles(blocks[..., header:]).reshape(N, K)
    if qtype == "Q4_0":
        return q, d, torch.zeros_like(d)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    return q, d, m + 8 * d


def module_from_gguf(raw: torch.Tensor, qtype: str, shape: tuple[int, int], mode: str = "auto",
                     group_size: int = 32) -> nn.Module | None:
    """A quantized Linear for one GGUF weight (raw: (rows, bytes per row) uint8), or None to keep it float.

    mode 'auto' keeps the file's precision class: Q4_0/Q4_1 repack exactly into int4, other 4/5-bit
    types requantize to int4, 6- and 8-bit types to int8, float types stay float. 'int8' / 'int4'
    force that format. Requantization dequantizes a chunk of rows at a time."""
    from .gguf import dequantize
    bits = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q2_K": 4, "Q3_K": 4,
            "Q6_K": 8, "Q8_0": 8, "Q8_K": 8}.get(qtype, 16)
    target = mode if mode in ("int8", "int4") else {4: "int4", 5: "int4", 8: "int8"}.get(bits)
    if target is None:
        return None
    if target == "int4" and qtype in ("Q4_0", "Q4_1") and group_size == 32:
        return Int4Linear.from_int4(*int4_from_gguf(raw, qtype, shape))
    import gguf
    N, K = shape
    rows = lambda s, e: dequantize(raw[s:e], gguf.GGMLQuantizationType[qtype], (e - s, K))  # noqa: E731
    return Int4Linear.from_rows(rows, N, group_size) if target == "int4" else Int8Linear.from_rows(rows, N, K)


def build_quantized_from_gguf(gf, cfg: ModelConfig, mode: str, group_size: int, dtype: torch.dtype, device: str):
    """Build the model tensor by tensor from the mapped GGUF file: quantized weights are repacked
    into int4/int8 modules (quantize.module_from_gguf) and never exist as a whole fp32 model."""
    from . import native
    from .gguf import map_name
    from .model import Transformer
    with torch.device("meta"):
        net = Transformer(cfg)
    floats = {}
    as_blocks = mode == "auto" and device == "cpu" and group_size == 32 and native.available()
    for gname, t in gf.tensors.items():
        if gname == "rope_freqs.weight":
            continue
        name = map_name(gname, to_gguf=False)
        if name is None:
            raise LlamaforgeError(f"{gf.path}: unexpected tensor {gname!r} for a llama model")
        if as_blocks and t.qtype.name in native.BLOCK_BYTES and len(t.shape) == 2 and t.shape[1] % 32 == 0:
            _put_blocks(net, name, BlockLinear(gf.raw(gname), t.qtype.name, t.shape[1]), cfg)  # mapped, not copied
            continue
        if t.qtype.name not in ("F32", "F16", "BF16") or mode in ("int8", "int4"):
            if name in ("tok_embeddings.weight", "output.weight"):  # int8 table (Q8_0-class precision)
                table = module_from_gguf(gf.raw(gname), t.qtype.name, t.shape, "int8")
                if name == "tok_embeddings.weight":
                    net.tok_embeddings = Int8Embedding(table.to(device))
                    if cfg.tie_embeddings:
                        net.output = net.tok_embeddings.table
                else:
                    net.output = table.to(device)
                gf.release(gname)
                continue
            mod = module_from_gguf(gf.raw(gname), t.qtype.name, t.shape, mode, group_size) if len(t.shape) == 2 else None
            if mod is not None:
                parent, attr = name.removesuffix(".weight").rsplit(".", 1)
                net.get_submodule(parent).add_module(attr, mod.to(device))
                gf.release(gname)
                continue
        floats[name] = gf.tensor(gname).to(dtype=dtype).clone()  # own copy: the mapping is released below
        gf.release(gname)
    if isinstance(net.output, Int8Linear):
        net.output.refine = OUTPUT_REFINE
    if "tok_embeddings.weight" in floats:  # a float table, kept float
        net.tok_embeddings = nn.Embedding.from_pretrained(floats.pop("tok_embeddings.weight").to(device), freeze=False)
        if cfg.tie_embeddings:
            net.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False, device="meta")
            net.output.weight = net.tok_embeddings.weight
    missing = [k for k, v in net.state_dict(keep_vars=True).items() if v.is_meta and k not in floats]
    if missing:
        raise LlamaforgeError(f"{gf.path}: missing tensors {missing[:4]}: the file is incomplete")
    net.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in floats.items()}, strict=False, assign=True)
    _trim_heap()
    return net.eval()


def _put_blocks(net: nn.Module, name: str, mod: BlockLinear, cfg: ModelConfig) -> None:
    if name == "tok_embeddings.weight":
        net.tok_embeddings = BlockEmbedding(mod)
        if cfg.tie_embeddings:
            net.output = mod
    elif name == "output.weight":
        net.output = mod
    else:
        parent, attr = name.removesuffix(".weight").rsplit(".", 1)
        net.get_submodule(parent).add_module(attr, mod)


def _trim_heap() -> None:
    """Hand the repacking temporaries back to the OS (glibc keeps freed heap pages otherwise)."""
    import ctypes
    import ctypes.util
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
