"""LoRA and QLoRA layers: invariants without an oracle (B = 0 is the base model, merged == unmerged,
save -> load is exact, base names unchanged) and PEFT as the oracle for the exported layout: a
transformers model converted from ours, with our adapter loaded by `peft`, gives our logits.
"""
import json

import pytest
import torch

import llamaforge
from llamaforge import LlamaforgeError, ModelConfig
from llamaforge.lora import (LoRAConfig, LoRAInt4Linear, LoRALinear, apply_lora, load_adapter, lora_disabled,
                             lora_layers, lora_state_dict, merge_lora, parse_targets, read_adapter, save_adapter,
                             trainable_params)
from llamaforge.model import Transformer
from llamaforge.quantize import Int4Linear, quantize_model
from llamaforge.weights import save_hf

TOKENS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))


def tiny(tie: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny")
    cfg.tie_embeddings = tie
    m = Transformer(cfg)
    m.init_weights()
    return m.eval()


def randomize_b(model, seed: int = 2, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, layer in lora_layers(model):
            layer.lora_b.copy_(scale * torch.randn(layer.lora_b.shape, generator=g))


def logits(model, x=TOKENS):
    with torch.no_grad():
        return model(x)


def test_b_zero_is_the_base_model_and_names_are_kept():
    base = tiny()
    ref, base_sd = logits(base), {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    assert torch.equal(logits(model), ref)
    sd = model.state_dict()
    lora_keys = {k for k in sd if k.endswith((".lora_a", ".lora_b"))}
    assert set(sd) - lora_keys == set(base_sd)  # base names unchanged: a base checkpoint loads as it is
    assert len(lora_keys) == 2 * 7 * 2  # A and B on 7 projections in 2 blocks
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert set(missing) == lora_keys and not unexpected
    # only the adapters train
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    assert trainable_params(model) == sum(4 * (lay.in_features + lay.out_features) for *_, lay in lora_layers(model))
    assert isinstance(model.layers[0].attention.wq, LoRALinear)


def test_merged_equals_unmerged_and_disabled_is_the_base():
    model = tiny(tie=True)
    ref = logits(model)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.1, targets="attention,w2"))
    randomize_b(model)
    model.eval()  # dropout off
    out = logits(model)
    assert (out - ref).abs().max() > 1e-3  # the adapter does something
    with lora_disabled(model):
        assert torch.equal(logits(model), ref)
    merge_lora(model)
    assert not lora_layers(model) and type(model.layers[1].attention.wq) is torch.nn.Linear
    torch.testing.assert_close(logits(model), out, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == set(tiny(tie=True).state_dict())  # a plain model again: HF/GGUF export works


def test_qlora_int4_base_trains_only_the_adapter_and_merges():
    model = quantize_model(tiny(), "int4")
    ref = logits(model)  # 40 rows per matmul: the dequantizing path
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets="all"))
    assert isinstance(model.layers[0].feed_forward.w1, LoRAInt4Linear)
    assert torch.equal(logits(model), ref)
    packed = model.layers[0].attention.wq.weight.clone()
    model.train()
    model(TOKENS).logsumexp(-1).mean().backward()
    # few rows would take the packed decode kernels, which have no backward: training never does
    x = torch.randn(3, 64, requires_grad=True)
    model.layers[1].attention.wq(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_a", "lora_b")) for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_b"))
    assert torch.equal(model.layers[0].attention.wq.weight, packed)  # the int4 base is untouched
    randomize_b(model)
    model.eval()
    out = logits(model)
    merge_lora(model)  # dequantized + delta: a float model
    assert isinstance(model.layers[0].attention.wq, torch.nn.Linear) and not isinstance(model.layers[0].attention.wq, Int4Linear)
    torch.testing.assert_close(logits(model), out, rtol=0, atol=1e-4)


def test_adapter_round_trip_both_layouts(tmp_path):
    model = apply_lora(tiny(), LoRAConfig(rank=4, alpha=4, dropout=0.0, targets="wq,wk,wv,w3"))
    randomize_b(model)
    out = logits(model)
    save_adapter(tmp_path / "ad", lora_state_dict(model), LoRAConfig(rank=4, alpha=4, dropout=0.0, targets="wq,wk,wv,w3"),
                 model.config, base_model="tiny")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter.json", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors"]
    assert sum(p.stat().st_size for p in (tmp_path / "ad").iterdir()) < 100_000  # small: the adapter, not the model
    fresh = tiny()
    lc = load_adapter(fresh, tmp_path / "ad")
    assert (lc.rank, lc.alpha, lc.targets) == (4, 4.0, ("wq", "wk", "wv", "w3"))
    assert torch.equal(logits(fresh), out)
    # the PEFT files alone load back to the same tensors (names mapped, q/k rows permuted back)
    peft_only = tmp_path / "peft"
    peft_only.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (peft_only / f).write_bytes((tmp_path / "ad" / f).read_bytes())
    _, state, _ = read_adapter(peft_only, model.config)
    ref = lora_state_dict(model)
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    peft_model = tiny()
    load_adapter(peft_model, peft_only)
    assert torch.equal(logits(peft_model), out)


def test_load_with_adapter_merges_into_float_weights(tmp_path):
    model = tiny()
    save_hf(tmp_path / "base", model.config, model.state_dict())
    apply_lora(model, LoRAConfig(rank=2, alpha=2, dropout=0.0))
    randomize_b(model)
    out = logits(model)[0]
    save_adapter(tmp_path / "ad", lora_state_dict(model), LoRAConfig(rank=2, alpha=2, dropout=0.0), model.config)
    llm = llamaforge.load(tmp_path / "base", device="cpu", adapter=tmp_path / "ad")
    assert not lora_layers(llm.model)  # float base: folded in, no cost per token
    torch.testing.assert_close(llm.logits(TOKENS[0].tolist()), out, rtol=0, atol=1e-4)
    q = llamaforge.load(tmp_path / "base", device="cpu", quantize="int8", adapter=tmp_path / "ad")
    assert lora_layers(q.model)  # quantized base: the adapter stays beside it
    assert (q.logits(TOKENS[0].tolist()) - out).abs().max() < 0.05


def test_peft_loads_our_adapter_on_a_converted_model_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny()
    save_hf(tmp_path / "hf", model.config, model.state_dict())
    lc = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets="all")
    apply_lora(model, lc)
    randomize_b(model, scale=0.2)
    ours = logits(model)
    save_adapter(tmp_path / "ad", lora_state_dict(model), lc, model.config)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        base_theirs = hf(TOKENS).logits
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        theirs = pm(TOKENS).logits
    assert (theirs - base_theirs).abs().max() > 1e-2  # peft applied the adapter
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    # and PEFT's own save round-trips into ours
    pm.save_pretrained(tmp_path / "from_peft")
    back = tiny()
    load_adapter(back, tmp_path / "from_peft")
    torch.testing.assert_close(logits(back), ours, rtol=0, atol=1e-5)


def test_bad_targets_and_adapters_are_one_line_errors(tmp_path):
    assert parse_targets("attention, w1") == ("wq", "wk", "wv", "wo", "w1")
    assert parse_targets(["q_proj", "down_proj", "wq"]) == ("wq", "w2")
    for bad in ("wz", "attention,gate", ""):
        with pytest.raises(LlamaforgeError, match="target module") as e:
            LoRAConfig(targets=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(LlamaforgeError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(LlamaforgeError, match="not an adapter directory"):
        load_adapter(tiny(), tmp_path)
    model = apply_lora(tiny(), LoRAConfig(rank=2, dropout=0.0))
    save_adapter(tmp_path / "ad", lora_state_dict(model), LoRAConfig(rank=2, dropout=0.0), model.config)
    other = ModelConfig.from_name("tiny")
    other.dim, other.hidden_dim = 128, 256
    with pytest.raises(LlamaforgeError, match="trained on a different model"):
        load_adapter(Transformer(other), tmp_path / "ad")
    with pytest.raises(LlamaforgeError, match="already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(rank=2))
    cfg = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps({**cfg, "targets": ["wq", "nope"]}))
    with pytest.raises(LlamaforgeError, match="unknown LoRA target module 'nope'"):
        load_adapter(tiny(), tmp_path / "ad")
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(cfg))
    (tmp_path / "ad" / "adapter.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(LlamaforgeError, match="not a readable safetensors"):
        load_adapter(tiny(), tmp_path / "ad")
