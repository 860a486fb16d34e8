"""The real default model end to end: answers, NLL parity with transformers, streaming, stop strings."""

import pytest
import torch
import torch.nn.functional as F

import llamaforge
from llamaforge.errors import LlamaforgeError
from llamaforge.llm import resolve

from conftest import needs_default_model

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "quickly and cheaply. Within fifty years, presses had spread to more than two hundred cities across "
    "Europe, and millions of volumes had been printed. Scholars could compare identical copies of a text, "
    "errors could be corrected in later editions, and ideas travelled faster than ever before."
)


def mean_nll(logits: torch.Tensor, ids: list[int]) -> float:
    return F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item()


@needs_default_model
@pytest.mark.parametrize("which", ["default_llm", "default_llm_q"])
def test_capital_of_france_greedy(which, request):
    llm = request.getfixturevalue(which)
    # The int4 model rounds its activations to 8 bits as llama.cpp does; on hosts whose prompts run in fp32 that
    # tips "What is the capital of France?" from "The capital of France is Paris." to "L'Étoile, la Marseillaise,
    # ..." -- llama.cpp 0.3.36 answers exactly that too (measured, AMD EPYC AVX2 host). A 135M model's near-tie,
    # not a bug; the quantized model is asked the question in words it answers on every host.
    question = "What is the capital of France?" if which == "default_llm" else "Name the capital of France."
    answer = llm.chat([{"role": "user", "content": question}], temperature=0, max_new_tokens=32)
    assert "Paris" in answer


@needs_default_model
def test_nll_matches_transformers_on_same_gguf(default_llm):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    fmt, path = resolve(llamaforge.DEFAULT_MODEL)
    ids = default_llm.tokenizer.encode(PARAGRAPH)
    ours = mean_nll(default_llm.logits(ids), ids)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        ref = mean_nll(ref_model(torch.tensor([ids])).logits[0], ids)
    assert 1.0 < ours < 6.0  # a real language model on real English
    assert abs(ours - ref) < 1e-3, (ours, ref)


@needs_default_model
def test_stream_equals_generate_and_cache_matches_full_forward(default_llm):
    prompt = "Once upon a time"
    pieces = list(default_llm.stream(prompt, temperature=0, max_new_tokens=12))
    assert "".join(pieces) == default_llm.generate(prompt, temperature=0, max_new_tokens=12)
    # greedy decoding through the KV cache picks the argmax of the full (cache-free) forward at every step
    ids = default_llm.tokenizer.encode(prompt)
    text_ids = default_llm.tokenizer.encode(prompt + "".join(pieces))
    assert text_ids[: len(ids)] == ids
    logits = default_llm.logits(text_ids)
    for t in range(len(ids), len(text_ids)):
        assert logits[t - 1].argmax().item() == text_ids[t] or torch.topk(logits[t - 1], 2).values.diff().abs() < 1e-3


@needs_default_model
def test_stop_string_and_seeded_sampling(default_llm):
    out = default_llm.generate("Count: 1, 2, 3, 4,", temperature=0, max_new_tokens=20, stop=["7"])
    assert "7" not in out and out.strip()
    a = default_llm.generate("The weather today", temperature=0.9, top_k=50, seed=3, max_new_tokens=10)
    b = default_llm.generate("The weather today", temperature=0.9, top_k=50, seed=3, max_new_tokens=10)
    assert a == b


@needs_default_model
def test_logits_shape_and_bad_input(default_llm):
    ids = default_llm.tokenizer.encode("Hello world")
    assert default_llm.logits(ids).shape == (len(ids), default_llm.config.vocab_size)
    with pytest.raises(LlamaforgeError, match="context window"):
        list(default_llm.stream(list(range(10, 10 + default_llm.config.max_seq_len))))
    with pytest.raises(LlamaforgeError, match="top_p"):
        default_llm.generate("hi", top_p=0)
    with pytest.raises(LlamaforgeError, match="unknown sampling option"):
        default_llm.generate("hi", temprature=0.5)


def test_resolve_errors(tmp_path):
    with pytest.raises(LlamaforgeError, match="unknown model"):
        resolve("no-such-model")
    with pytest.raises(LlamaforgeError, match="not on this machine"):
        resolve("llama-2-7b")
    with pytest.raises(LlamaforgeError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(LlamaforgeError, match="not a GGUF file"):
        resolve(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LlamaforgeError, match="not a model directory"):
        resolve(empty)


# ---- the conversation cache (tiny config: no tokenizer needed for token ids) ----

def tiny_llm(tiny_config):
    from llamaforge.llm import LLM
    from llamaforge.model import Transformer
    m = Transformer(tiny_config).eval()
    m.init_weights(std=0.2)
    return LLM(m, None, None)


def test_conversation_cache_reuses_the_prefix_and_equals_uncached(tiny_config):
    from llamaforge.generate import SamplingConfig, generate, prefill
    llm = tiny_llm(tiny_config)
    cfg = SamplingConfig(temperature=0, max_new_tokens=12)
    turn1 = [3, 14, 15, 92, 65, 35]
    out1 = list(llm.generate_ids(turn1, cfg))
    assert llm.cache.ids == turn1 + out1[:-1]  # the last token was never fed
    turn2 = turn1 + out1 + [7, 8, 9]
    assert llm.cache.reusable(llm.model, turn2) == len(turn1) + len(out1) - 1
    out2 = list(llm.generate_ids(turn2, cfg))
    fresh = list(generate(llm.model, turn2, cfg))  # plain, from position 0
    assert out2 == fresh
    # the logits of a prefill from the cache equal a full forward's
    list(llm.generate_ids(turn2, cfg))
    n = llm.cache.reusable(llm.model, turn2 + [1, 2])
    with torch.no_grad():
        part = prefill(llm.model, torch.tensor([(turn2 + [1, 2])[n:]]), torch.arange(n, len(turn2) + 2))
        full = llm.model(torch.tensor([turn2 + [1, 2]]))[:, -1]
    assert torch.allclose(part, full, atol=1e-5, rtol=1e-4)


def test_conversation_cache_divergent_edit_reset_and_other_users(tiny_config):
    from llamaforge.generate import SamplingConfig, generate
    llm = tiny_llm(tiny_config)
    cfg = SamplingConfig(temperature=0, max_new_tokens=10)
    base = list(range(10, 40))
    list(llm.generate_ids(base, cfg))
    edited = base[:12] + [99, 98] + base[14:]  # an earlier message changed: reuse stops at the edit
    assert llm.cache.reusable(llm.model, edited) == 12
    assert list(llm.generate_ids(edited, cfg)) == list(generate(llm.model, edited, cfg))
    assert llm.cache.reusable(llm.model, edited + [5]) > 12
    llm.reset()
    assert llm.cache.reusable(llm.model, edited) == 0
    list(llm.generate_ids(edited, cfg))
    list(generate(llm.model, [7] * 20, cfg))  # someone else writes the model's cache: nothing is reused
    assert llm.cache.reusable(llm.model, edited) == 0
    llm.prompt_cache = False
    list(llm.generate_ids(edited, cfg))
    assert len(llm.cache.ids) == len(edited) + 9 and llm.cache.reusable(llm.model, edited) == len(edited)  # recorded all the same


def test_conversation_cache_survives_a_larger_cache(tiny_config):
    """A conversation that outgrows the allocated cache keeps its prefix (generate.keep_cache)."""
    from llamaforge.generate import SamplingConfig, generate
    tiny_config.max_seq_len = 1024
    llm = tiny_llm(tiny_config)
    cfg = SamplingConfig(temperature=0, max_new_tokens=8)
    first = [1 + i % 300 for i in range(100)]
    out = list(llm.generate_ids(first, cfg))
    assert llm.model.max_seq_len == 256
    longer = first + out + [4 + i % 200 for i in range(300)]
    assert llm.cache.reusable(llm.model, longer) == 107
    assert list(llm.generate_ids(longer, cfg)) == list(generate(llm.model, longer, cfg))
    assert llm.model.max_seq_len == 512


def test_chunked_prefill_reports_progress_and_changes_nothing(tiny_config):
    from llamaforge.generate import SamplingConfig, generate
    tiny_config.max_seq_len = 1024
    llm = tiny_llm(tiny_config)
    cfg = SamplingConfig(temperature=0, max_new_tokens=6)
    ids = [1 + (7 * i) % 500 for i in range(200)]
    seen = []
    assert llm.prefill(ids, chunk=64, progress=lambda done, total: seen.append((done, total))) == 0
    assert seen == [(64, 199), (128, 199), (192, 199), (199, 199)]
    assert llm.cache.reusable(llm.model, ids) == 199
    out = list(llm.generate_ids(ids, cfg))
    seen.clear()
    longer = ids + out + [3] * 300
    again = list(llm.generate_ids(longer, cfg, progress=lambda done, total: seen.append((done, total))))
    assert seen == [(461, 505), (505, 505)]  # from the cached 205 tokens on, 256 per forward
    assert out == list(generate(llm.model, ids, cfg)) and again == list(generate(llm.model, longer, cfg))
