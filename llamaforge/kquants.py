"""K-quants written as llama.cpp writes them: Q4_K and Q6_K blocks from a port of ggml-quants.c's
reference quantizers (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref`: what llama-quantize runs
without an importance matrix), vectorized across blocks with numpy, and llama.cpp's per-tensor type
mixes for the Q4_K_M and Q6_K file types (`llama_tensor_get_type` in llama-quant.cpp).

The port aims at the same bytes as llama.cpp: values stay float32, every sum runs in C's order (a
loop over the 16 or 32 values of a sub-block, vectorized across sub-blocks; numpy's own sums are
pairwise), C's `nearest_int` is round-half-to-even (`np.rint`), and fp16 conversion rounds to
nearest even as GGML_FP32_TO_FP16 does.
"""
from __future__ import annotations

import re

import numpy as np

QK_K = 256
F = np.float32
_CHUNK = 4096  # super-blocks (1M weights) per vectorized pass: bounded scratch memory
GROUP_MAX_EPS = F(1e-15)

# file type -> (the type most tensors get, gguf.LlamaFileType name)
FILE_TYPES = {"q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"), "q6_k": ("Q6_K", "MOSTLY_Q6_K")}
# llama.cpp's fallback when a row is not a whole number of 256-weight super-blocks (tensor_type_fallback)
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """a[0] + a[1] + ... in that order over the first axis, in float32: a C accumulation loop."""
    s = a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def _round(v: np.ndarray) -> np.ndarray:
    return np.rint(v)  # nearest_int: adding 1.5 * 2**23 in float32 rounds half to even


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants over the columns of x (n values x M sub-blocks): levels 0..nmax, a scale and a
    min fitted by weighted least squares over nstep+1 trial grids. Returns (L, scale, the_min)."""
    mx = x.max(axis=0)
    mn = np.minimum(x.min(axis=0), F(0))
    flat = mx == mn
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(nmax) / (mx - mn)
        scale = F(1) / iscale
        L = np.clip(_round(iscale * (x - mn)), 0, nmax)
        diff = scale * L + mn - x
        best = _seq_sum(w * (diff * diff))
        for step in range(nstep + 1):
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)  # mn is the best fit so far
            La = np.clip(_round(iscale * (x - mn)), 0, nmax)
            wl = w * La
            sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * La), _seq_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, F(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            diff = this_scale * La + this_min - x
            cur = _seq_sum(w * (diff * diff))
            take = (D > 0) & (cur < best) & ~flat
            L = np.where(take, La, L)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, F(0), scale).astype(F)
    return L.astype(np.uint8), scale, (-mn).astype(F)


def _make_qx_quants(x: np.ndarray, nmax: int):
    """make_qx_quants(rmse_type=1, no importance weights) over the columns of x (n x M): a signed
    scale for levels -nmax..nmax-1 (stored +nmax), searched over 19 trial grids. Returns (L, scale)."""
    m = x.shape[1]
    ax = np.abs(x)
    idx = ax.argmax(axis=0)  # the first largest |x|, as C's strict '>' keeps
    mx = x[idx, np.arange(m)]
    zero = ax[idx, np.arange(m)] < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(-nmax) / mx
        lv = np.clip(_round(iscale * x), -nmax, nmax - 1)
        sumlx, suml2 = _seq_sum(wx * lv), _seq_sum(w * lv * lv)
        scale = np.where(suml2 != 0, sumlx / suml2, F(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F(nmax) + F(0.1) * F(step)) / mx
            l2 = np.clip(_round(iscale * x), -nmax, nmax - 1)
            slx, sl2 = _seq_sum(wx * l2), _seq_sum(w * l2 * l2)
            take = (sl2 > 0) & (slx * slx > best * sl2) & ~zero
            lv = np.where(take, l2, lv)
            scale = np.where(take, slx / sl2, scale)
            best = np.where(take, scale * slx, best)
    L = np.where(zero, 0, lv + nmax)
    return L.astype(np.int16), np.where(zero, F(0), scale).astype(F)


def _sub_blocks(x: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) -> (n, nb*256/n): one sub-block per column, its values down the rows."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref on nb super-blocks (nb, 256) float32 -> (nb, 144) uint8."""
    nb = x.shape[0]
    xt = _sub_blocks(x, 32)
    av_x = np.sqrt(_seq_sum(xt * xt) / F(32))
    L, scales, mins = _make_qkx2_quants(xt, av_x + np.abs(xt), 15, -1.0, 0.1, 20)
    L = L.T.reshape(nb, 8, 32)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F(0))
    max_min = np.maximum(mins.max(axis=1), F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0)).astype(F)
        inv_min = np.where(max_min > 0, F(63) / max_min, F(0)).astype(F)
    ls = np.minimum(_round(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)  # uint8_t cast
    lm = np.minimum(_round(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d = (max_scale / F(63)).astype(np.float16)
    dmin = (max_min / F(63)).astype(np.float16)
    sc = np.zeros((nb, 12), np.uint8)
    sc[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    dl = d.astype(F)[:, None] * ls.astype(F)
    ml = dmin.astype(F)[:, None] * lm.astype(F)
    with np.errstate(divide="ignore", invalid="ignore"):
        req = np.clip(_round((x.reshape(nb, 8, 32) + ml[..., None]) / dl[..., None]), 0, 15)
    L = np.where(dl[..., None] != 0, req, L).astype(np.uint8).reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), sc, qs], axis=1)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref on nb super-blocks (nb, 256) float32 -> (nb, 210) uint8."""
    nb = x.shape[0]
    L, scales = _make_qx_quants(_sub_blocks(x, 16), 32)
    L = L.T.reshape(nb, 16, 16)
    scales = scales.reshape(nb, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), pick]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F(-128) / max_scale
        d = (F(1) / iscale).astype(np.float16)
        sc = np.minimum(_round(iscale[:, None] * scales), 127)
        sc = np.where(zero[:, None], 0, sc).astype(np.int8)
        dl = d.astype(F)[:, None] * sc.astype(F)
        req = np.clip(_round(x.reshape(nb, 16, 16) / dl[..., None]), -32, 31) + 32
    L = np.where(dl[..., None] != 0, req, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # [half][quarter][l]
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(nb, 1).view(np.uint8)], axis=1)
    out[zero] = 0
    return out


_BLOCKS = {"Q4_K": (_q4_k_blocks, 144), "Q6_K": (_q6_k_blocks, 210)}
BLOCK_TYPES = tuple(_BLOCKS)


def quantize(arr: np.ndarray, type_name: str) -> np.ndarray:
    """A float array (..., K) with K a multiple of 256 -> its Q4_K or Q6_K bytes (..., K/256 * block bytes),
    the layout `gguf.quants.quantize` returns for the types it implements."""
    fn, nbytes = _BLOCKS[type_name]
    if arr.shape[-1] % QK_K:
        raise ValueError(f"{type_name} rows hold whole {QK_K}-weight super-blocks; got rows of {arr.shape[-1]}")
    flat = np.ascontiguousarray(arr, dtype=F).reshape(-1, QK_K)
    out = np.empty((flat.shape[0], nbytes), np.uint8)
    for i in range(0, flat.shape[0], _CHUNK):
        out[i:i + _CHUNK] = fn(flat[i:i + _CHUNK])
    return out.reshape(*arr.shape[:-1], arr.shape[-1] // QK_K * nbytes)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type_name(gguf_name: str, ncols: int, ftype: str, n_layer: int, has_output: bool) -> str:
    """llama.cpp's choice for one 2-D weight in a Q4_K_M or Q6_K file: Q4_K_M gives the output (or the
    tied embedding) Q6_K, and attn_v / ffn_down Q6_K in the first and last eighth of the layers and
    every third layer between; other tensors get the file's base type. Rows that are not whole
    super-blocks fall back (Q4_K -> Q5_0, Q6_K -> Q8_0, and F16 past that), as llama-quantize does."""
    base = FILE_TYPES[ftype][0]
    t = base
    m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight$", gguf_name)
    if gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output):
        t = "Q6_K" if ncols % QK_K == 0 else "Q8_0"
    elif ftype == "q4_k_m" and m and _use_more_bits(int(m.group(1)), n_layer):
        t = "Q6_K"
    if t in _FALLBACK and ncols % QK_K:
        t = _FALLBACK[t]
    if ncols % 32:
        t = "F16"
    return t
