"""Checkpoint formats against their oracles: transformers for HF safetensors, Meta's own sharding for .pth.

Parity runs through the real loader (`llamaforge.load(dir)`), as litgpt `tests/test_model.py` does:
a random tiny `transformers.LlamaForCausalLM` is saved with `save_pretrained` and both sides score
the same token ids. Round trips (HF -> ours -> HF, ours -> HF -> ours) must be bit-exact.
"""
import json
import pickle

import pytest
import torch

import llamaforge
from llamaforge import LlamaforgeError, ModelConfig
from llamaforge.model import Transformer
from llamaforge.weights import (_FROM_HF, build_model, config_from_hf, config_to_hf, hf_to_interleaved,
                                interleaved_to_hf, load_hf, load_meta, rename, save_hf)

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TOL = 1e-4  # fp32 logits, max abs diff
IDS = [1, 17, 200, 3, 45, 99, 250, 7, 128, 64, 5, 33, 190, 2, 11, 77, 140, 230, 8, 9,
       60, 61, 62, 180, 181, 4, 12, 13, 100, 101, 102, 210, 211, 6, 90, 91, 92, 93, 14, 15]  # 40 > 32 (llama3 original ctx)


def hf_config(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    return transformers.LlamaConfig(**{**base, **kw})


def random_hf_model(cfg) -> "transformers.LlamaForCausalLM":
    """A tiny HF llama with every weight random (norm weights too, so a swapped norm cannot hide)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "theta500k": dict(rope_theta=500000.0),
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_parity_through_load(tmp_path, variant):
    model = random_hf_model(hf_config(**VARIANTS[variant]))
    model.save_pretrained(tmp_path)
    llm = llamaforge.load(tmp_path, device="cpu")
    assert llm.tokenizer is None
    cfg = llm.config
    assert (cfg.n_kv_heads, cfg.tie_embeddings) == (model.config.num_key_value_heads, model.config.tie_word_embeddings)
    diff = (llm.logits(IDS) - hf_logits(model)).abs().max().item()
    assert diff <= TOL, f"{variant}: max abs logit diff {diff}"


def test_hf_llama3_rope_parameters_are_read(tmp_path):
    # transformers 5 writes `rope_parameters` (with rope_theta inside) instead of rope_scaling/rope_theta
    model = random_hf_model(hf_config(**VARIANTS["llama3-rope"]))
    model.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    cfg = config_from_hf(d)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 32}
    # the transformers 4 spelling gives the same config
    old = {k: v for k, v in d.items() if k != "rope_parameters"}
    old["rope_theta"] = 500000.0
    old["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}
    assert config_from_hf(old) == cfg
    # scaling must matter here: without it the logits differ (positions beyond 32 tokens)
    cfg_plain, sd = load_hf(tmp_path)
    cfg_plain.rope_scaling = None
    unscaled = build_model(cfg_plain, sd)(torch.tensor([IDS]))[0]
    assert (unscaled - hf_logits(model)).abs().max().item() > 1e-3


def test_hf_sharded_parity(tmp_path):
    model = random_hf_model(hf_config())
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").exists() and len(shards) > 1, shards
    llm = llamaforge.load(tmp_path, device="cpu")
    assert (llm.logits(IDS) - hf_logits(model)).abs().max().item() <= TOL


def test_permutation_is_an_exact_inverse():
    w = torch.randn(4 * 16, 64)
    assert torch.equal(interleaved_to_hf(hf_to_interleaved(w, 4), 4), w)
    assert torch.equal(hf_to_interleaved(interleaved_to_hf(w, 4), 4), w)
    assert not torch.equal(hf_to_interleaved(w, 4), w)


@pytest.mark.parametrize("variant", ["gqa", "tied", "llama3-rope"])
def test_hf_to_ours_to_hf_is_bitwise(tmp_path, variant):
    model = random_hf_model(hf_config(**VARIANTS[variant]))
    model.save_pretrained(tmp_path / "hf")
    cfg, sd = load_hf(tmp_path / "hf")
    save_hf(tmp_path / "back", cfg, sd)
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    a = {k: v for k, v in a.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and the config survives: transformers builds the same model from what we wrote
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.equal(hf_logits(back), hf_logits(model))


@pytest.mark.parametrize("variant", ["gqa", "tied", "llama3-rope"])
def test_ours_to_hf_matches_ours(tmp_path, variant):
    cfg = ModelConfig.from_name("tiny")
    cfg.tie_embeddings = variant == "tied"
    if variant == "llama3-rope":
        cfg.rope_theta = 500000.0
        cfg.rope_scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 32}
    ours = Transformer(cfg)
    ours.init_weights(std=0.1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    save_hf(tmp_path, cfg, ours.state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = [i % cfg.vocab_size for i in IDS]
    with torch.no_grad():
        diff = (ours(torch.tensor([ids]))[0] - hf_logits(hf, ids)).abs().max().item()
    assert diff <= TOL
    # ours -> HF -> ours is exact too
    cfg2, sd2 = load_hf(tmp_path)
    assert cfg2.rope_scaling == cfg.rope_scaling and cfg2.tie_embeddings == cfg.tie_embeddings
    for k, v in ours.state_dict().items():
        if not (cfg.tie_embeddings and k == "output.weight"):
            assert torch.equal(sd2[k], v), k


def test_save_hf_is_atomic_and_replaces(tmp_path):
    cfg = ModelConfig.from_name("tiny")
    sd = Transformer(cfg).state_dict()
    save_hf(tmp_path / "m", cfg, sd)
    save_hf(tmp_path / "m", cfg, sd)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(LlamaforgeError, match="no HF name"):
        save_hf(tmp_path / "m", cfg, {**sd, "layers.0.attention.bogus": torch.zeros(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (tmp_path / "m" / "model.safetensors").exists()


# ---- Meta consolidated.*.pth ----

META_COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")  # ColumnParallelLinear: split the output rows (dim 0)
META_ROW = ("wo", "w2")  # RowParallelLinear: split the input columns (dim 1)


def meta_shards(sd: dict, n: int, emb_dim: int) -> list[dict]:
    """Split a full state dict as Meta's model-parallel checkpoints are (fairscale layers)."""
    shards = [{} for _ in range(n)]
    for k, v in sd.items():
        kind = k.split(".")[-2]
        if v.dim() == 1:
            parts = [v] * n  # norms are replicated
        elif kind == "tok_embeddings":
            parts = v.chunk(n, dim=emb_dim)
        elif kind in META_COLUMN:
            parts = v.chunk(n, dim=0)
        else:
            assert kind in META_ROW, k
            parts = v.chunk(n, dim=1)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    return shards


def write_meta(path, cfg: ModelConfig, sd: dict, n: int = 1, emb_dim: int = 1, vocab_size: int = -1):
    path.mkdir()
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": 32,
              "norm_eps": cfg.norm_eps, "vocab_size": vocab_size}
    if cfg.n_kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    (path / "params.json").write_text(json.dumps(params))
    full = {k: v for k, v in sd.items()}
    full["rope.freqs"] = torch.zeros(cfg.head_dim // 2)  # LLaMA 1 checkpoints carry this buffer
    for i, shard in enumerate(meta_shards(full, n, emb_dim)):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")


def tiny_meta_model(**kw):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=192, multiple_of=32, **kw)
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    return cfg, model


@pytest.mark.parametrize("n, emb_dim, vocab", [(1, 1, -1), (2, 1, -1), (2, 0, 256), (2, 0, -1)],
                         ids=["single", "2-shard-llama2", "2-shard-llama3", "2-shard-rows-no-vocab"])
def test_meta_parity(tmp_path, n, emb_dim, vocab):
    cfg, model = tiny_meta_model()
    write_meta(tmp_path / "m", cfg, model.state_dict(), n, emb_dim, vocab)
    cfg2, sd = load_meta(tmp_path / "m")
    assert (cfg2.vocab_size, cfg2.hidden_dim, cfg2.n_kv_heads) == (256, 192, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k
    llm = llamaforge.load(tmp_path / "m", device="cpu")
    with torch.no_grad():
        want = model(torch.tensor([IDS]))[0]
    assert (llm.logits(IDS) - want).abs().max().item() <= 1e-5


def test_meta_legacy_serialization(tmp_path):
    # pre-zipfile torch.save files cannot be mmap'd; they still load (weights_only, without mmap)
    cfg, model = tiny_meta_model()
    write_meta(tmp_path / "m", cfg, model.state_dict())
    f = tmp_path / "m" / "consolidated.00.pth"
    torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    _, sd = load_meta(tmp_path / "m")
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_meta_refuses_pickled_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "pwned"),))

    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256}))
    with open(tmp_path / "consolidated.00.pth", "wb") as fh:
        pickle.dump({"tok_embeddings.weight": Boom()}, fh)
    with pytest.raises(LlamaforgeError, match="consolidated.00.pth holds pickled objects.*refused"):
        llamaforge.load(tmp_path, device="cpu")
    assert not (tmp_path / "pwned").exists()
    # the same inside a torch.save zip archive
    torch.save({"x": Boom()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(LlamaforgeError, match="consolidated.00.pth holds pickled objects.*refused"):
        llamaforge.load(tmp_path, device="cpu")
    assert not (tmp_path / "pwned").exists()


# ---- bad input: one-line LlamaforgeError, never a raw safetensors/torch traceback ----

def one_line_error(path) -> str:
    with pytest.raises(LlamaforgeError) as e:
        llamaforge.load(path, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture
def hf_dir(tmp_path):
    random_hf_model(hf_config()).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("keep", [0, 4, 7, 100, -1000], ids=["empty", "4-bytes", "short-header", "header-cut", "data-cut"])
def test_truncated_safetensors(hf_dir, keep):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    assert "model.safetensors" in one_line_error(hf_dir)


def test_corrupt_safetensors_header(hf_dir):
    f = hf_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    assert "model.safetensors" in one_line_error(hf_dir)


def test_other_model_type(hf_dir):
    d = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**d, "model_type": "gpt2"}))
    assert "gpt2" in one_line_error(hf_dir)


@pytest.mark.parametrize("edit", [
    lambda d: {k: v for k, v in d.items() if k != "hidden_size"},
    lambda d: {**d, "hidden_act": "gelu"},
    lambda d: {**d, "intermediate_size": 128},  # the weights no longer match
], ids=["missing-key", "gelu", "shape-mismatch"])
def test_bad_config_json(hf_dir, edit):
    d = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(edit(d)))
    one_line_error(hf_dir)


def test_unparseable_config_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    assert "config.json" in one_line_error(hf_dir)


def test_missing_weight_file(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    assert "model.safetensors" in one_line_error(hf_dir)


def test_missing_shard(tmp_path):
    random_hf_model(hf_config()).save_pretrained(tmp_path, max_shard_size="50KB")
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    assert "missing" in one_line_error(tmp_path)


def test_bin_only_checkpoint(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    assert "safetensors" in one_line_error(hf_dir)


def test_unexpected_tensor(tmp_path):
    cfg = ModelConfig.from_name("tiny")
    save_hf(tmp_path, cfg, Transformer(cfg).state_dict())
    from safetensors.torch import save_file
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, tmp_path / "model.safetensors")
    assert "q_proj.bias" in one_line_error(tmp_path)


def test_meta_bad_input(tmp_path):
    cfg, model = tiny_meta_model()
    write_meta(tmp_path / "m", cfg, model.state_dict())
    f = tmp_path / "m" / "consolidated.00.pth"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert "consolidated.00.pth" in one_line_error(tmp_path / "m")
    f.unlink()
    assert "consolidated" in one_line_error(tmp_path / "m")
    (tmp_path / "m" / "params.json").write_text("{oops")
    assert "params.json" in one_line_error(tmp_path / "m")


def test_meta_mismatched_shards(tmp_path):
    cfg, model = tiny_meta_model()
    write_meta(tmp_path / "m", cfg, model.state_dict(), n=2)
    f = tmp_path / "m" / "consolidated.01.pth"
    shard = torch.load(f, weights_only=True)
    del shard["layers.1.attention.wq.weight"]
    torch.save(shard, f)
    assert "layers.1.attention.wq.weight" in one_line_error(tmp_path / "m")


def test_unsupported_rope_type(hf_dir):
    d = json.loads((hf_dir / "config.json").read_text())
    d["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (hf_dir / "config.json").write_text(json.dumps(d))
    assert "yarn" in one_line_error(hf_dir)


def test_rename_table_covers_hf_names():
    assert rename("model.layers.12.mlp.down_proj.weight", _FROM_HF) == "layers.12.feed_forward.w2.weight"
    assert rename("model.layers.0.self_attn.rotary_emb.inv_freq", _FROM_HF) is None


def test_config_to_hf_round_trip():
    for name in ("tiny", "llama-2-70b", "llama-3.1-8b", "llama-3.2-1b", "smollm2-135m"):
        cfg = ModelConfig.from_name(name)
        back = config_from_hf(config_to_hf(cfg))
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "norm_eps", "rope_theta",
                  "rope_scaling", "max_seq_len", "tie_embeddings"):
            assert getattr(back, f) == getattr(cfg, f), (name, f)
