"""The transformer itself: invariants that need no oracle, RoPE against transformers, named configs.

Full forward == prefill + token-by-token decode through the static KV cache (gpt-fast's contract),
for MHA and GQA, batch 1 and batch > 1. Named configs are checked against published parameter
counts and against transformers' LlamaForCausalLM built on the meta device (nothing allocated).
"""
import math

import pytest
import torch

from llamaforge import CONFIGS, LlamaforgeError, ModelConfig
from llamaforge.model import KVCache, RMSNorm, Transformer, apply_rope, precompute_rope, scale_rope_frequencies

TOL = 1e-5


def tiny(**kw) -> Transformer:
    cfg = ModelConfig(**{**dict(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=256,
                                max_seq_len=256), **kw})
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def decode_logits(model, tokens: torch.Tensor, prefill: int, max_seq_len: int = 64, max_batch: int | None = None):
    """Prefill `prefill` tokens in one call, then feed the rest one at a time: (B, T, vocab)."""
    B, T = tokens.shape
    model.setup_caches(max_batch or B, max_seq_len)
    out = [model(tokens[:, :prefill], torch.arange(prefill))]
    for t in range(prefill, T):
        out.append(model(tokens[:, t:t + 1], torch.tensor([t])))
    model.clear_caches()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("B", [1, 3])
@torch.no_grad()
def test_kv_cache_matches_full_forward(n_kv_heads, B):
    model = tiny(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 256, (B, 20))
    full = model(tokens)
    for prefill in (1, 7):
        diff = (decode_logits(model, tokens, prefill) - full).abs().max().item()
        assert diff <= TOL, (prefill, diff)


@torch.no_grad()
def test_kv_cache_llama3_rope_and_chunked_prefill():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 16}
    model = tiny(rope_theta=500000.0, rope_scaling=scaling)
    tokens = torch.randint(0, 256, (2, 40))
    full = model(tokens)
    model.setup_caches(2, 48)
    chunks = [model(tokens[:, a:b], torch.arange(a, b)) for a, b in ((0, 10), (10, 25), (25, 26), (26, 40))]
    assert (torch.cat(chunks, 1) - full).abs().max().item() <= TOL


@torch.no_grad()
def test_kv_cache_smaller_batch_and_last_only():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 12))
    full = model(tokens)
    got = decode_logits(model, tokens, prefill=5, max_seq_len=32, max_batch=4)  # batch 2 in a cache for 4
    assert (got - full).abs().max().item() <= TOL
    model.setup_caches(2, 32)
    last = model(tokens, torch.arange(12), last_only=True)
    assert last.shape == (2, 1, 256) and (last[:, 0] - full[:, -1]).abs().max().item() <= TOL
    assert torch.allclose(model(tokens[:, :4], last_only=True)[:, 0], full[:, 3], atol=TOL)


@torch.no_grad()
def test_forward_without_input_pos_ignores_the_cache():
    # scoring (no input_pos) between decode steps must neither read nor write the static cache
    model = tiny()
    tokens = torch.randint(0, 256, (1, 12))
    full = model(tokens)
    model.setup_caches(1, 32)
    model(tokens[:, :6], torch.arange(6))
    assert torch.allclose(model(tokens[:, :3]), full[:, :3], atol=TOL)
    steps = [model(tokens[:, t:t + 1], torch.tensor([t])) for t in range(6, 12)]
    assert (torch.cat(steps, 1) - full[:, 6:]).abs().max().item() <= TOL


@torch.no_grad()
def test_setup_caches_reuse_and_regrow():
    model = tiny()
    tokens = torch.randint(0, 256, (1, 30))
    full = model(tokens)
    model.setup_caches(1, 16)
    model(tokens[:, :10], torch.arange(10))
    model.setup_caches(1, 8)  # smaller: the existing caches are kept
    assert model.max_seq_len == 16
    model.setup_caches(2, 32)  # bigger: fresh caches, so prefill again
    assert model.layers[0].attention.kv_cache.k_cache.shape == (2, 2, 32, 16)
    got = torch.cat([model(tokens[:, :20], torch.arange(20))] + [model(tokens[:, t:t + 1], torch.tensor([t])) for t in range(20, 30)], 1)
    assert (got - full).abs().max().item() <= TOL
    model.setup_caches(1, 32, dtype=torch.bfloat16)
    assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16
    model.clear_caches()
    assert all(layer.attention.kv_cache is None for layer in model.layers)


@torch.no_grad()
def test_causal_masks_are_made_per_call_not_kept():
    from llamaforge.model import causal
    model = tiny()
    model.setup_caches(1, 16)
    assert not any(b.dim() == 2 and b.shape == (16, 16) for b in model.buffers())  # no (S, S) table to carry
    assert causal(torch.tensor([2]), 4).tolist() == [[True, True, True, False]]
    pos = torch.tensor([[0, 1], [3, 4]])
    assert torch.equal(causal(pos, 5), torch.tril(torch.ones(5, 5, dtype=torch.bool))[pos])


@torch.no_grad()
def test_long_forward_regrows_rope():
    model = tiny(max_seq_len=512)
    tokens = torch.randint(0, 256, (1, 300))  # beyond the 256-row rope table built first
    model(tokens[:, :8])
    out = model(tokens)
    assert out.shape == (1, 300, 256) and torch.isfinite(out).all()
    assert torch.allclose(out[:, :8], model(tokens[:, :8]), atol=TOL)


@torch.no_grad()
def test_batch_rows_are_independent():
    model = tiny()
    tokens = torch.randint(0, 256, (3, 10))
    full = model(tokens)
    for b in range(3):
        assert torch.allclose(full[b], model(tokens[b:b + 1])[0], atol=TOL)


def test_tied_embeddings_share_storage():
    model = tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == model.config.n_params


def test_kv_cache_update_writes_at_positions():
    cache = KVCache(2, 8, 2, 4)
    k, v = torch.ones(1, 2, 3, 4), 2 * torch.ones(1, 2, 3, 4)
    ck, cv = cache.update(torch.tensor([2, 3, 4]), k, v)
    assert ck.shape == (1, 2, 8, 4)
    assert ck[0, :, 2:5].eq(1).all() and ck[0, :, :2].eq(0).all() and cv[0, :, 2:5].eq(2).all()
    assert cache.k_cache[1].eq(0).all()


# ---- RMSNorm and RoPE against transformers ----

def test_rmsnorm_matches_reference():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.randn(8)
    x = torch.randn(2, 3, 8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), want, atol=1e-6)


def test_apply_rope_is_a_rotation_of_interleaved_pairs():
    head_dim, T = 8, 5
    rope = precompute_rope(head_dim, T, 10000.0)
    assert rope.shape == (T, head_dim // 2, 2) and rope.dtype == torch.float32
    x = torch.randn(1, T, 2, head_dim)
    y = apply_rope(x, rope)
    assert torch.allclose(y[:, 0], x[:, 0])  # position 0: identity
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    t, i = 3, 1  # pair (2i, 2i+1) at position t turns by t * theta^(-2i/head_dim)
    a = t * 10000.0 ** (-2 * i / head_dim)
    x0, x1 = x[0, t, 0, 2 * i], x[0, t, 0, 2 * i + 1]
    want = torch.stack([x0 * math.cos(a) - x1 * math.sin(a), x0 * math.sin(a) + x1 * math.cos(a)])
    assert torch.allclose(y[0, t, 0, 2 * i:2 * i + 2], want, atol=1e-5)


def test_llama3_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for head_dim, theta, orig in ((128, 500000.0, 8192), (64, 500000.0, 32), (16, 10000.0, 64)):
        scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": orig}
        hf_cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=4 * orig,
                                          rope_theta=theta, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": orig})
        want, attention_scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
        base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        got = scale_rope_frequencies(base, scaling)
        assert attention_scale == 1.0
        assert torch.allclose(got, want.float(), rtol=1e-6, atol=0), (head_dim, orig)
        assert not torch.allclose(got, base)  # the scaling changes something at these sizes


# ---- named configs ----

PUBLISHED = {  # parameter counts from the model cards / papers
    "llama-7b": 6.74e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9,
    "llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9, "llama-2-70b": 68.98e9,
    "llama-3-8b": 8.03e9, "llama-3-70b": 70.6e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "llama-3.1-405b": 405.9e9,
    "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9,
    "smollm2-135m": 134.5e6, "smollm2-360m": 361.8e6, "smollm2-1.7b": 1.71e9,
    # our CPU demo configs, as docs/pretraining.md and config.py state them
    "shakespeare-10m": 10.0e6, "micro": 0.61e6,
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_named_config_builds_with_published_size(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.name == name and cfg.source
    base = name.removesuffix("-instruct").removesuffix("-chat")
    if base in PUBLISHED:
        assert abs(cfg.n_params / PUBLISHED[base] - 1) < 0.02, (name, cfg.n_params)
    else:
        assert name == "tiny", f"no published count recorded for {name}"
    if cfg.hf_id:
        assert ModelConfig.from_name(cfg.hf_id) == cfg
    with torch.device("meta"):  # our module tree agrees with n_params, nothing allocated
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params


@pytest.mark.parametrize("name", ["llama-7b", "llama-2-70b", "llama-3.1-8b", "llama-3.2-1b", "smollm2-135m", "smollm2-1.7b", "tiny"])
def test_named_config_matches_transformers_param_count(name):
    transformers = pytest.importorskip("transformers")
    from llamaforge.weights import config_to_hf
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg)))
    assert sum(p.numel() for p in hf.parameters()) == cfg.n_params


def test_unknown_config_lists_known_names():
    with pytest.raises(LlamaforgeError) as e:
        ModelConfig.from_name("nope")
    msg = str(e.value)
    assert "'nope'" in msg and all(name in msg for name in CONFIGS)


def test_config_checks_head_divisibility():
    with pytest.raises(LlamaforgeError, match="n_kv_heads"):
        ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, vocab_size=8)
    with pytest.raises(LlamaforgeError, match="n_heads"):
        ModelConfig(dim=66, n_layers=1, n_heads=4, vocab_size=8)


def test_meta_hidden_dim_rule():
    # meta-llama FeedForward: 2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of
    assert ModelConfig(dim=4096, n_layers=1, n_heads=32, vocab_size=8).hidden_dim == 11008
    assert ModelConfig(dim=4096, n_layers=1, n_heads=32, vocab_size=8, ffn_dim_multiplier=1.3, multiple_of=1024).hidden_dim == 14336
    assert ModelConfig(dim=8192, n_layers=1, n_heads=64, vocab_size=8, ffn_dim_multiplier=1.3, multiple_of=4096).hidden_dim == 28672


# ---- per-row positions (B, T): rows at different lengths decode together ----

@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@torch.no_grad()
def test_per_row_positions_match_full_forward(n_kv_heads):
    # Row b starts `delay[b]` steps late: until then it re-feeds its first token at position 0
    # (an idempotent cache write), so the rows sit at different lengths in every later step.
    model = tiny(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 256, (3, 16))
    delay = [0, 5, 9]
    model.setup_caches(4, 64)  # a cache with a spare row
    pos = torch.tensor([0, 0, 0])
    got = [[] for _ in delay]
    for step in range(16 + max(delay)):
        active = [step >= d for d in delay]
        feed = torch.stack([tokens[b, min(int(pos[b]), 15)] for b in range(3)])[:, None]  # (B, 1)
        logits = model(feed, pos[:, None])[:, 0]  # (B, vocab)
        for b in range(3):
            if active[b] and pos[b] < 16:
                got[b].append(logits[b])
        pos = torch.tensor([min(int(p) + a, 16) for p, a in zip(pos, active)])
    for b in range(3):
        full = model(tokens[b:b + 1])[0]
        assert (torch.stack(got[b]) - full).abs().max().item() <= TOL, b


@torch.no_grad()
def test_per_row_prefill_equals_shared_positions():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 12))
    full = model(tokens)
    model.setup_caches(2, 32)
    pre = model(tokens[:, :7], torch.arange(7).expand(2, 7), last_only=True)  # (B, T) path
    assert (pre[:, 0] - full[:, 6]).abs().max().item() <= TOL
    steps = [model(tokens[:, t:t + 1], torch.tensor([t])) for t in range(7, 12)]  # then the (T,) path
    assert (torch.cat(steps, 1) - full[:, 7:]).abs().max().item() <= TOL


def test_kv_cache_update_per_row_positions():
    cache = KVCache(3, 8, 2, 4)
    k = torch.arange(2.0)[:, None, None, None].expand(2, 2, 2, 4) + 1  # row 0 writes 1s, row 1 writes 2s
    ck, cv = cache.update(torch.tensor([[0, 1], [5, 6]]), k, -k)
    assert ck.shape == (2, 2, 8, 4)
    assert ck[0, :, :2].eq(1).all() and ck[0, :, 2:].eq(0).all()
    assert ck[1, :, 5:7].eq(2).all() and ck[1, :, :5].eq(0).all() and cv[1, :, 5:7].eq(-2).all()
    assert cache.k_cache[2].eq(0).all()
