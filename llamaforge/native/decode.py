"""The fused one-token decode step: the whole model (embedding, all layers' norms, projections, RoPE,
KV cache write, attention over the cache, SwiGLU, final norm, output head) in one native call, so a
decode step pays no Python or per-op cost (a ~1,000-op eager step for SmolLM2-135M).

`install(model)` puts it in front of the model's forward (an instance attribute, so model.py stays
unaware of it): every caller that runs `model(tokens, input_pos)` for one token per row against the
static KV cache (generate(), the serving engine's batched rows at their own positions, evaluation's
padded batches with a key mask and a shared slot, hidden states or logits) gets it, and every other
call (prompts, scoring, training with gradients) runs the eager forward. The step reads and writes the model's own KVCache tensors, so eager
prefill and native decode share one cache. A swapped module (an unmerged LoRA layer) or a cache the
step cannot read sends the call back to the eager forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import QTYPES, kernels

PROJECTIONS = (("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
               ("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3"))


def _weight(mod: nn.Module):
    """(tensor, type id) the kernels read for a projection, or None if they cannot read it."""
    from ..quantize import BlockEmbedding, BlockLinear
    if type(mod) is BlockLinear:
        return mod.weight, QTYPES[mod.qtype]
    if type(mod) is BlockEmbedding:
        return _weight(mod.table)
    if type(mod) in (nn.Linear, nn.Embedding) and mod.weight.dtype == torch.float32 and getattr(mod, "bias", None) is None:
        return mod.weight.detach(), QTYPES["F32"]
    return None


class NativeDecode:
    """model.forward with the fused step in front; `enabled` switches it (LLM.set_decode)."""

    def __init__(self, model: nn.Module, net, eager):
        self.model, self.net, self.eager, self.enabled = model, net, eager, True
        self.modules = [(p, a, p._modules[a]) for p, a in _parents(model)]  # what the step was built from
        self.steps = 0

    def usable(self, tokens, input_pos, mask, slots) -> bool:
        """One token per row at known positions, against a float32 CPU cache, no gradients, the weights the
        step was built from. Masks and slots are the one-token kinds: a key mask (B or 1, 1, 1, S) and
        one shared or per-row slot (evaluation's padded batches)."""
        if not self.enabled or input_pos is None or tokens.dim() != 2 or tokens.size(1) != 1:
            return False
        B = tokens.size(0)
        if tokens.device.type != "cpu" or torch.is_grad_enabled() or input_pos.numel() not in (1, B):
            return False
        if mask is not None and (mask.dim() != 4 or mask.dtype != torch.bool or mask.shape[1:3] != (1, 1) or mask.size(0) not in (1, B)):
            return False
        if slots is not None and slots.numel() not in (1, B):
            return False
        cache = self.model.layers[0].attention.kv_cache
        if cache is None or cache.k_cache.dtype != torch.float32 or cache.k_cache.size(0) < B:
            return False
        return all(p._modules.get(a) is m for p, a, m in self.modules)

    def verifiable(self, tokens, input_pos, mask, slots, last_only, hidden) -> bool:
        """A few tokens continuing one cached sequence, all rows' logits wanted: a speculative verify.
        The step runs them as rows of one pass (weights read once), each with a one-token step's arithmetic,
        so greedy output with drafts equals greedy output without."""
        if (not self.enabled or input_pos is None or tokens.dim() != 2 or tokens.size(0) != 1 or mask is not None
                or slots is not None or last_only or hidden or not 2 <= tokens.size(1) <= VERIFY_TOKENS
                or tokens.device.type != "cpu" or torch.is_grad_enabled() or input_pos.numel() != tokens.size(1)):
            return False
        cache = self.model.layers[0].attention.kv_cache
        if cache is None or cache.k_cache.dtype != torch.float32:
            return False
        pos = input_pos.reshape(-1)
        start, T = int(pos[0]), tokens.size(1)
        if start < 1 or start + T > cache.k_cache.size(2) or not torch.equal(pos, torch.arange(start, start + T)):
            return False
        return all(p._modules.get(a) is m for p, a, m in self.modules)

    def __call__(self, tokens, input_pos=None, mask=None, slots=None, span=None, last_only=False, hidden=False):
        if self.verifiable(tokens, input_pos, mask, slots, last_only, hidden):
            return self._verify(tokens, input_pos)
        if not self.usable(tokens, input_pos, mask, slots):
            return self.eager(tokens, input_pos, mask, slots, span, last_only, hidden)
        m = self.model
        B = tokens.size(0)
        pos = input_pos.reshape(-1).expand(B).long().contiguous()
        slots = pos if slots is None else slots.reshape(-1).expand(B).long().contiguous()
        keys = _EMPTY if mask is None else mask[:, 0, 0].expand(B, -1).contiguous()  # (B, S): the slots each row attends
        ks, vs = [], []
        for layer in m.layers:
            c = layer.attention.kv_cache
            ks.append(c.k_cache)
            vs.append(c.v_cache)
        rope = m.rope(m.max_seq_len, "cpu")
        self.steps += 1
        return self.net.step(tokens.reshape(-1).long().contiguous(), pos, slots, _NO_ROWS, keys, ks, vs, rope, hidden)


    def _verify(self, tokens, input_pos):
        """(1, T) tokens at positions start..start+T-1 of cache row 0 -> logits (1, T, vocab)."""
        m = self.model
        T = tokens.size(1)
        pos = input_pos.reshape(-1).long().contiguous()
        causal = torch.arange(int(pos[-1]) + 1)[None, :] <= pos[:, None]  # (T, start + T): token i sees slots <= start + i
        ks = [layer.attention.kv_cache.k_cache for layer in m.layers]
        vs = [layer.attention.kv_cache.v_cache for layer in m.layers]
        self.steps += 1
        out = self.net.step(tokens.reshape(-1).long().contiguous(), pos, pos, torch.zeros(T, dtype=torch.long), causal,
                            ks, vs, m.rope(m.max_seq_len, "cpu"), False)
        return out.view(1, T, -1)


VERIFY_TOKENS = 16  # at most this many tokens of one sequence go through the step together
_EMPTY = torch.empty(0, 0, dtype=torch.bool)
_NO_ROWS = torch.empty(0, dtype=torch.long)


def _parents(model):
    """(parent module, attribute) of every weight the step reads."""
    out = [(model, "tok_embeddings"), (model, "output")]
    for layer in model.layers:
        for part, attr in PROJECTIONS:
            out.append((getattr(layer, part), attr))
    return out


def install(model: nn.Module) -> NativeDecode | None:
    """Put the fused step in front of `model.forward` if the kernels are built and can read every weight
    (GGUF Q4_0 / Q4_1 / Q8_0 blocks or fp32, on the CPU, at least one projection quantized); else None.
    Installing twice returns the installed step."""
    current = model.__dict__.get("forward")
    if isinstance(current, NativeDecode):
        return current
    k = kernels()
    if k is None:
        return None
    from ..quantize import BlockLinear
    weights = [_weight(p._modules[a]) for p, a in _parents(model)]
    if any(w is None for w in weights) or not any(isinstance(p._modules[a], BlockLinear) for p, a in _parents(model)):
        return None
    norms = [model.norm.weight] + [n.weight for layer in model.layers for n in (layer.attention_norm, layer.ffn_norm)]
    if any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
        return None
    c = model.config
    emb, out = weights[0], weights[1]
    tensors, types = [emb[0], model.norm.weight.detach(), out[0]], [emb[1], 0, out[1]]
    for i, layer in enumerate(model.layers):
        lw = weights[2 + 7 * i: 9 + 7 * i]  # wq, wk, wv, wo, w1, w2, w3
        order = [(layer.attention_norm.weight.detach(), 0), lw[0], lw[1], lw[2], lw[3],
                 (layer.ffn_norm.weight.detach(), 0), lw[4], lw[5], lw[6]]
        tensors += [t for t, _ in order]
        types += [ty for _, ty in order]
    net = k.Model(tensors, types, [c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size],
                  float(c.norm_eps))
    step = NativeDecode(model, net, model.forward)
    model.forward = step  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    return step


def installed(model: nn.Module) -> NativeDecode | None:
    step = model.__dict__.get("forward")
    return step if isinstance(step, NativeDecode) else None
