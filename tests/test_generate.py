"""Sampling functions and the token generator, on the tiny config (no tokenizer involved)."""
import pytest
import torch

from llamaforge.errors import LlamaforgeError
from llamaforge.generate import SamplingConfig, apply_repetition_penalty, generate, logits_to_probs, sample
from llamaforge.model import Transformer


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = logits_to_probs(logits, temperature=1.0, top_k=2)
    assert (p[0, 2:] == 0).all() and torch.allclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)[0]
    p = logits_to_probs(logits, temperature=1.0, top_p=float(full[0] + 1e-4))
    assert (p[0, 2:] == 0).all() and p[0, 1] > 0  # smallest prefix whose mass reaches top_p: two tokens
    p = logits_to_probs(logits, temperature=1.0, top_p=float(full[0] - 1e-4))
    assert p[0, 0] == 1.0
    cold = logits_to_probs(logits, temperature=0.1)
    assert cold[0, 0] > 0.99


def test_greedy_and_repetition_penalty():
    logits = torch.tensor([[1.0, 3.0, -2.0]])
    assert sample(logits, SamplingConfig(temperature=0)).item() == 1
    pen = apply_repetition_penalty(logits, torch.tensor([[1, 2]]), 2.0)
    assert torch.allclose(pen, torch.tensor([[1.0, 1.5, -4.0]]))


@pytest.mark.parametrize("kw,msg", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                    ({"top_k": -2}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
                                    ({"repetition_penalty": 0}, "repetition_penalty")])
def test_invalid_sampling_values(kw, msg):
    with pytest.raises(LlamaforgeError, match=msg):
        SamplingConfig(**kw)


def test_generate_greedy_matches_full_forward(tiny_config):
    model = Transformer(tiny_config).eval()
    model.init_weights(std=0.2)
    prompt = [5, 17, 42, 8]
    out = list(generate(model, prompt, SamplingConfig(temperature=0, max_new_tokens=10)))
    assert len(out) == 10
    ids = prompt + out
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out


def test_generate_stops_at_stop_id_and_context(tiny_config):
    model = Transformer(tiny_config).eval()
    model.init_weights(std=0.2)
    first = next(generate(model, [1, 2, 3], SamplingConfig(temperature=0, max_new_tokens=5)))
    assert list(generate(model, [1, 2, 3], SamplingConfig(temperature=0, max_new_tokens=5), stop_ids={first})) == [first]
    ctx = tiny_config.max_seq_len
    assert len(list(generate(model, list(range(ctx - 3)), SamplingConfig(temperature=0, max_new_tokens=50)))) == 3
    with pytest.raises(LlamaforgeError, match="context window"):
        next(generate(model, [1] * ctx, SamplingConfig()))


def test_seeded_sampling_is_reproducible(tiny_config):
    model = Transformer(tiny_config).eval()
    model.init_weights(std=0.2)
    cfg = SamplingConfig(temperature=1.0, top_k=50, seed=7, max_new_tokens=8)
    assert list(generate(model, [1, 2], cfg)) == list(generate(model, [1, 2], cfg))


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_decode_over_the_filled_span_equals_whole_cache_attention(tiny_config, quantize):
    import dataclasses

    from llamaforge.quantize import quantize_model
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_config, max_seq_len=1024)).eval()
    model.init_weights(std=0.2)
    if quantize:
        quantize_model(model, quantize, group_size=32)
    cfg = SamplingConfig(temperature=0, max_new_tokens=12)
    for prompt in ([5, 17, 42, 8], [9, 4] * 125):  # the second crosses a span boundary (256) while decoding
        want = list(generate(model, prompt, cfg))
        full = list(generate(model, prompt, cfg, decode=lambda m, t, p: m(t, p)[:, -1]))  # whole-cache attention
        assert want == full


def test_min_p_and_logit_bias():
    from llamaforge.generate import apply_logit_bias, parse_logit_bias, pick
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    p = logits_to_probs(logits, temperature=1.0, min_p=0.2)  # p1/p0 = e^-1 = 0.37 stays, p2/p0 = e^-3 = 0.05 goes
    assert p[0, 0] > 0 and p[0, 1] > 0 and (p[0, 2:] == 0).all() and torch.allclose(p.sum(), torch.tensor(1.0))
    assert torch.equal(apply_logit_bias(logits, {3: 100.0, 0: -5.0}), torch.tensor([[-2.0, 2.0, 0.0, 99.0]]))
    assert pick(logits, SamplingConfig(logit_bias={3: 100})) == 3  # greedy follows the bias too
    assert pick(logits, SamplingConfig(logit_bias={0: -100}, temperature=1.0, seed=0), torch.Generator().manual_seed(0)) != 0
    assert parse_logit_bias('{"5": -100, "7": 2.5}') == parse_logit_bias("5:-100, 7:2.5") == {5: -100.0, 7: 2.5}
    assert SamplingConfig(logit_bias={"5": "1"}).logit_bias == {5: 1.0}
    for bad in ({"min_p": 1.0}, {"min_p": -0.1}, {"logit_bias": {1: 101}}, {"logit_bias": "x:y"}, {"logit_bias": [1, 2]}):
        with pytest.raises(LlamaforgeError, match="min_p|logit_bias"):
            SamplingConfig(**bad)
    with pytest.raises(LlamaforgeError, match="outside"):
        apply_logit_bias(logits, {9: 1.0})
