"""The LLaMA transformer, for training and inference: one file, one architecture.

RMSNorm pre-normalization, SwiGLU feed-forward, rotary embeddings (with Llama 3.1 frequency
scaling), grouped-query attention through `F.scaled_dot_product_attention`, tied or untied output,
and a static KV cache so a decode step has fixed shapes and can be compiled.

Follows meta-llama `llama/model.py` (names, interleaved-pair RoPE) and gpt-fast `model.py`
(static `KVCache`, `setup_caches`, mask slicing by `input_pos`). RoPE rotates interleaved pairs
(x0, x1), (x2, x3), ... as Meta and GGUF checkpoints do; HF checkpoints, which rotate halves,
are permuted once by the weight loader. This file knows nothing of quantization, LoRA,
parallelism, compilation or tokenizers: those transform a built model from outside.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


SPAN_ROUND = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused op, the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()  # normalize in fp32, as Meta and HF do
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def scale_rope_frequencies(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling (meta-llama/llama-models `apply_scaling`).

    Wavelengths shorter than original_ctx / high_freq_factor keep their frequency, those longer
    than original_ctx / low_freq_factor are divided by `factor`, and the band between is blended.
    """
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_seq_len"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old_ctx / low, freqs / factor, freqs)
    mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(mid, blended, out)


def precompute_rope(head_dim: int, seq_len: int, theta: float, scaling: dict | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """cos/sin table in fp32: (seq_len, head_dim // 2, 2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)[: head_dim // 2] / head_dim)
    if scaling:
        freqs = scale_rope_frequencies(freqs, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x: (B, T, n_heads, head_dim); rope: (T, head_dim // 2, 2) or per row (B, T, ...)."""
    # as complex numbers (x0 + i x1)(cos + i sin), the pairs rotate in one op (meta-llama `apply_rotary_emb`)
    xs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, n_heads, head_dim // 2)
    rot = torch.view_as_complex(rope).view(-1, xs.size(1), 1, xs.size(3))  # (1 or B, T, 1, head_dim // 2)
    return torch.view_as_real(xs * rot).flatten(3).type_as(x)


class KVCache(nn.Module):
    """A static key/value cache: (B, n_kv_heads, max_seq_len, head_dim), written at `slots`."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # k, v: (B, n_kv_heads, T, head_dim); slots: (T,), or (B, T) for per-row slots
        B = k.size(0)
        if slots.dim() == 1:
            self.k_cache[:B, :, slots] = k.to(self.k_cache.dtype)
            self.v_cache[:B, :, slots] = v.to(self.v_cache.dtype)
        else:  # row b writes its own slots: the indexed view is (B, T, n_kv_heads, head_dim)
            rows = torch.arange(B, device=k.device)[:, None]
            self.k_cache[rows, :, slots] = k.transpose(1, 2).to(self.k_cache.dtype)
            self.v_cache[rows, :, slots] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache[:B], self.v_cache[:B]


def causal(input_pos: torch.Tensor, S: int) -> torch.Tensor:
    """(*input_pos.shape, S) bool: the token at position p sees cache slots 0..p. Made per call rather than
    kept as a (max_seq_len, max_seq_len) table, which is 67 MB at an 8k window."""
    return torch.arange(S, device=input_pos.device) <= input_pos[..., None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rope, mask=None, slots=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if self.kv_cache is not None and slots is not None:
            k_all, v_all = self.kv_cache.update(slots, k, v)  # (B, n_kv_heads, max_seq_len, head_dim)
            if mask is not None:  # attend to the cache prefix the mask covers (see Transformer.forward)
                S = mask.size(-1)
                k, v = k_all[:, :, :S].to(q.dtype), v_all[:, :, :S].to(q.dtype)
            # else: a prompt from position 0, whose keys are exactly the fresh k, v: plain causal attention
        rep = self.n_heads // self.n_kv_heads
        if rep > 1 and mask is not None:
            # with a cache: fold each group's query heads into the query axis rather than copying the
            # cached K/V rep times; folded row r*T + t is row t, so one query row broadcasts its mask
            q = q.reshape(B, self.n_kv_heads, rep * T, self.head_dim)
            m = mask if T == 1 else mask.repeat(1, 1, rep, 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m).view(B, self.n_heads, T, -1)
        else:
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)  # (B, n_heads, T, head_dim)
                v = v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask=None, slots=None):
        h = x + self.attention(self.attention_norm(x), rope, mask, slots)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # _weight skips nn.Embedding's normal_() init (which imports torch._dynamo: ~1 s at first load);
        # init_weights() initializes for training, loaders assign checkpoint tensors.
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope: torch.Tensor | None = None  # plain attribute: recomputed on demand, never loaded
        self.max_batch_size = self.max_seq_len = -1

    def rope(self, seq_len: int, device) -> torch.Tensor:
        r = self._rope
        if r is None or r.size(0) < seq_len or r.device != torch.device(device):
            c = self.config
            r = precompute_rope(c.head_dim, max(seq_len, 256), c.rope_theta, c.rope_scaling, device)
            self._rope = r
        return r

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     exact: bool = False) -> None:
        """Allocate static KV caches (kept when the present ones are large enough, unless `exact`)."""
        if self.max_batch_size >= max_batch_size and self.max_seq_len >= max_seq_len and dtype is None:
            if not exact or (self.max_batch_size, self.max_seq_len) == (max_batch_size, max_seq_len):
                return
        self.clear_caches()  # the old caches go before the new ones are allocated
        w = self.norm.weight  # always a float parameter, whatever the embedding became
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        c = self.config
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_len, c.n_kv_heads, c.head_dim, dtype, w.device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.rope(max_seq_len, w.device)

    def decode_span(self, pos: int) -> int:
        """Cache slots a one-token step at `pos` needs: the filled prefix rounded up to SPAN_ROUND slots
        (llama.cpp pads its n_kv the same way), so the step's shapes change only every SPAN_ROUND tokens."""
        return min(self.max_seq_len, (pos // SPAN_ROUND + 1) * SPAN_ROUND)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size = self.max_seq_len = -1

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, span: int | None = None, last_only: bool = False,
                hidden: bool = False) -> torch.Tensor:
        """tokens: (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with `last_only`; with `hidden`, the
        final-norm hidden states (B, T, dim) instead, for callers that project only some positions.

        input_pos: None (no cache: positions 0..T-1, causal unless `mask` (B or 1, 1, T, T) says
        otherwise), or the positions of the tokens, (T,) shared by all rows or (B, T) per row, so rows
        at different lengths decode together (continuous batching). With positions, keys and values
        go into the static cache at `slots` (default: the positions; scoring packs several
        continuations at the same positions into other slots) and attention covers cache slots
        [0, S): S = mask.size(-1) with an explicit `mask` (B or 1, 1, T, S), else up to the largest
        position. span: a one-token step with shared positions attends to cache slots [0, span) only
        (default: the whole static cache, fixed shapes for torch.compile); see `decode_span`.
        """
        B, T = tokens.shape
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        if input_pos is None:  # no cache: positions 0..T-1
            rope = self.rope(T, x.device)[:T]
        else:
            rope = self.rope(self.max_seq_len, x.device)[input_pos]  # (T or B x T, head_dim // 2, 2)
            slots = input_pos if slots is None else slots
            if mask is not None:
                pass
            elif input_pos.dim() == 1 and T == 1:  # decode: over `span` slots or the whole cache; empty slots masked
                mask = causal(input_pos, span or self.max_seq_len)[None, None]  # (1, 1, 1, span or max_seq_len)
            elif input_pos.dim() == 1:  # a prompt chunk attends to the filled prefix; from position 0 plain causal
                S = int(input_pos.max()) + 1
                mask = None if S == T else causal(input_pos, S)[None, None]  # (1, 1, T, S)
            else:
                S = int(input_pos.max()) + 1
                mask = causal(input_pos, S)[:, None]  # (B, 1, T, S)
        for layer in self.layers:
            x = layer(x, rope, mask, slots)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if hidden else self.output(x)

    def read_cache(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of cache row `row`'s first `length` slots, per layer: (1, n_kv_heads, length, head_dim) each."""
        out = []
        for layer in self.layers:
            c = layer.attention.kv_cache
            out.append((c.k_cache[row:row + 1, :, :length].clone(), c.v_cache[row:row + 1, :, :length].clone()))
        return out

    def write_cache(self, kvs: list[tuple[torch.Tensor, torch.Tensor]], rows, start: int = 0) -> None:
        """Put per-layer (k, v) of shape (1 or len(rows), n_kv_heads, n, head_dim) into cache `rows`
        (an int, a slice or a list), slots start..start + n."""
        for layer, (k, v) in zip(self.layers, kvs):
            c = layer.attention.kv_cache
            c.k_cache[rows, :, start:start + k.size(2)] = k
            c.v_cache[rows, :, start:start + v.size(2)] = v

    def copy_cache(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached slots of row src to row dst, in every layer."""
        for layer in self.layers:
            c = layer.attention.kv_cache
            c.k_cache[dst, :, :length] = c.k_cache[src, :, :length]
            c.v_cache[dst, :, :length] = c.v_cache[src, :, :length]

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for matrices, with the residual projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)
