"""The native CPU kernels and the fused decode step (llamaforge/native): block dot products against
gguf-py's dequantization on every instruction-set path, the fused step against the eager forward and
the fp32-dequantized reference, batched rows, the fallbacks (kernels off, unmerged LoRA) and memory
that stays flat over many chats."""
import os
import resource
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llamaforge
from llamaforge import native
from llamaforge.generate import SamplingConfig, generate
from llamaforge.gguf_writer import write_gguf
from llamaforge.model import Transformer
from llamaforge.native.decode import NativeDecode, installed
from llamaforge.quantize import BlockLinear

from conftest import needs_default_model

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built (python -m llamaforge.native build)")
QTYPES = ["Q4_0", "Q4_1", "Q8_0"]


def blocks(qtype: str, n: int, k: int, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    raw = torch.from_numpy(gguf.quants.quantize(w, qt).view(np.uint8).copy()).view(n, -1)
    return raw, torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qt)).reshape(n, k)


def kl(logits, ref):
    return F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()


@needs_native
@pytest.mark.parametrize("qtype", QTYPES)
def test_block_dequantize_and_linear_match_gguf(qtype):
    k = native.kernels()
    raw, ref = blocks(qtype, 96, 320)
    assert torch.equal(k.dequantize(raw, native.QTYPES[qtype], 320, torch.float32), ref)  # exact
    assert torch.equal(k.dequantize(raw, native.QTYPES[qtype], 320, torch.bfloat16), ref.bfloat16())
    x = torch.randn(5, 320)
    y, y_ref = k.linear(x, raw, native.QTYPES[qtype], 320), x @ ref.t()
    assert (y - y_ref).norm() / y_ref.norm() < 0.02  # the activation's 8-bit rounding, as llama.cpp's q8 dot
    lin = BlockLinear(raw, qtype, 320)
    assert torch.allclose(lin(x[:1]), y[:1]) and torch.allclose(lin(x.repeat(8, 1)), x.repeat(8, 1) @ ref.t(), rtol=1e-2, atol=0.3)


@needs_native
def test_every_instruction_set_path_gives_the_same_products():
    """AVX-512 VNNI, AVX2 and plain C (forced by LLAMAFORGE_NATIVE_ISA, read once per process) agree."""
    script = ("import torch, sys; from llamaforge import native; sys.path.insert(0, 'tests'); from test_native import blocks;"
              "x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)); k = native.kernels();"
              "print(k.isa()); [print(repr(k.linear(x, blocks(q, 64, 256)[0], native.QTYPES[q], 256).sum(1).tolist())) for q in "
              f"{QTYPES!r}]")
    outs = {}
    for isa in ("vnni", "avx2", "c"):
        env = dict(os.environ, LLAMAFORGE_NATIVE_ISA=isa, PYTHONPATH=os.pathsep.join(sys.path))
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-800:]
        name, *vals = r.stdout.split("\n")[:4]
        outs[name] = [np.array(eval(v)) for v in vals]  # noqa: S307 -- our own subprocess's repr of floats
    base = next(iter(outs.values()))
    for vals in outs.values():
        for a, b in zip(vals, base):
            assert np.allclose(a, b, rtol=1e-4, atol=1e-3)  # the same integers, summed in another order


@pytest.fixture(scope="module", params=["q4_0", "q4_1", "q8_0"])
def tiny_gguf(request, tmp_path_factory):
    from llamaforge.config import ModelConfig
    cfg = ModelConfig.from_name("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.1)
    path = tmp_path_factory.mktemp("native") / f"tiny-{request.param}.gguf"
    write_gguf(path, cfg, model.state_dict(), qtype=request.param)  # ffn_down (176 inputs) falls back to F16
    return path


def teacher_forced(llm, ids: list[int], steps: list[int]) -> torch.Tensor:
    """Logits of a prefill and then one decode step per token of `steps` (the decode path under test)."""
    m = llm.model
    m.setup_caches(1, 128)
    out = []
    with torch.no_grad():
        m(torch.tensor([ids]), torch.arange(len(ids)), last_only=True)
        for i, t in enumerate(steps):
            out.append(llm.decode(m, torch.tensor([[t]]), torch.tensor([len(ids) + i]))[0])
    return torch.stack(out)


@needs_native
def test_fused_step_matches_eager_and_the_fp32_reference(tiny_gguf):
    llm = llamaforge.load(tiny_gguf)
    step = installed(llm.model)
    assert isinstance(step, NativeDecode) and llm.decode_mode == "auto"
    ids, steps = torch.randint(0, 512, (20,)).tolist(), torch.randint(0, 512, (24,)).tolist()
    fused = teacher_forced(llm, ids, steps)
    assert step.steps == len(steps)  # every step ran natively
    eager = teacher_forced(llm.set_decode("eager"), ids, steps)
    assert step.steps == len(steps)  # ... and none in eager mode
    assert torch.allclose(fused, eager, atol=1e-4, rtol=1e-4)  # the same block products, the same cache
    ref_llm = llamaforge.load(tiny_gguf, quantize="none")  # the fp32-dequantized weights, eager
    assert installed(ref_llm.model) is None
    ref = ref_llm.logits(ids + steps)[len(ids):]  # the full forward's logits at the steps' positions
    assert kl(fused, ref) < 1e-3 and (fused.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@needs_native
def test_greedy_identical_across_decode_modes(tiny_gguf):
    llm = llamaforge.load(tiny_gguf)
    ids = torch.randint(0, 512, (12,)).tolist()
    cfg = SamplingConfig(max_new_tokens=40)
    outs = {mode: list(generate(llm.model, ids, cfg, decode=llm.set_decode(mode).decode)) for mode in ("auto", "eager")}
    assert outs["auto"] == outs["eager"]  # the same block products: the fused step and the op-by-op forward
    with pytest.raises(llamaforge.LlamaforgeError, match="cannot compile the native"):
        llm.set_decode("compile")


@needs_native
def test_verify_pass_equals_one_token_steps_bit_for_bit(tiny_gguf):
    """A speculative verify (several tokens of one sequence in one call) gives each token exactly the
    logits a one-token step gives it, so greedy output with drafts cannot differ from greedy without."""
    llm = llamaforge.load(tiny_gguf)
    m, step = llm.model, installed(llm.model)
    ids, more = torch.randint(0, 512, (20,)).tolist(), torch.randint(0, 512, (7,)).tolist()
    singles = teacher_forced(llm, ids, more)  # (7, vocab)
    m.setup_caches(1, 128)
    with torch.no_grad():
        m(torch.tensor([ids]), torch.arange(len(ids)), last_only=True)
        before = step.steps
        rows = m(torch.tensor([more]), torch.arange(len(ids), len(ids) + len(more)))[0]
    assert step.steps == before + 1  # one native call for all seven
    assert torch.equal(rows, singles)
    # the cache holds what seven single steps wrote: the next step agrees too
    with torch.no_grad():
        nxt = m(torch.tensor([[5]]), torch.tensor([len(ids) + len(more)]))[0, -1]
    assert torch.equal(nxt, teacher_forced(llm, ids, more + [5])[-1])


@needs_native
def test_greedy_speculation_identical_with_the_fused_step(tiny_gguf):
    from llamaforge.speculative import PromptLookup
    llm = llamaforge.load(tiny_gguf)
    ids = torch.randint(0, 512, (16,)).tolist() * 3  # repeats: prompt lookup drafts plenty
    cfg = SamplingConfig(max_new_tokens=48)
    plain = list(generate(llm.model, ids, cfg, decode=llm.decode))
    step = installed(llm.model)
    before = step.steps
    spec = list(generate(llm.model, ids, cfg, decode=llm.decode, draft=PromptLookup()))
    assert spec == plain
    assert step.steps - before < len(plain)  # drafts were verified several tokens a call


@needs_native
def test_batched_rows_at_their_own_positions_equal_single_steps(tiny_gguf):
    """The serving engine's step: (B, 1) tokens at per-row positions (B, 1), each row its own cache row."""
    llm = llamaforge.load(tiny_gguf)
    m = llm.model
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 9, 3)]
    nxt = [7, 100, 300]

    eager_forward = installed(m).eager

    def prefill_rows():
        m.setup_caches(3, 64, exact=True)
        with torch.no_grad():
            for row in (2, 1, 0):  # each prompt through row 0, then moved to its row (row 0 last)
                eager_forward(torch.tensor([prompts[row]]), torch.arange(len(prompts[row])))
                if row:
                    m.write_cache(m.read_cache(0, len(prompts[row])), row)
    toks, pos = torch.tensor([[t] for t in nxt]), torch.tensor([[len(p)] for p in prompts])  # (B, 1) each
    prefill_rows()
    with torch.no_grad():
        batched = m(toks, pos)[:, -1]
    assert installed(m).steps == 1
    prefill_rows()
    with torch.no_grad():
        eager = eager_forward(toks, pos)[:, -1]
    assert torch.allclose(batched, eager, atol=1e-4, rtol=1e-4)


@needs_native
def test_evaluation_padded_batches_run_the_fused_step(tiny_gguf):
    """evaluation.scoring.generate_greedy: right-padded rows, a key mask and one shared cache slot per step."""
    from llamaforge.evaluation.scoring import generate_greedy
    llm = llamaforge.load(tiny_gguf)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (4, 11, 7)]
    run = lambda: generate_greedy(llm.model, prompts, 12, lambda new: False)  # noqa: E731
    fused = run()
    assert installed(llm.model).steps == 11  # 12 tokens: the first from the prompt's hidden states
    llm.set_decode("eager")
    assert run() == fused and installed(llm.model).steps == 11


@needs_native
def test_unmerged_lora_falls_back_to_eager(tiny_gguf):
    from llamaforge.lora import LoRAConfig, apply_lora
    llm = llamaforge.load(tiny_gguf)
    step = installed(llm.model)
    apply_lora(llm.model, LoRAConfig(rank=4))
    llm.model.eval()
    ids = torch.randint(0, 512, (10,)).tolist()
    out = list(generate(llm.model, ids, SamplingConfig(max_new_tokens=8), decode=llm.decode))
    assert len(out) == 8 and step.steps == 0  # the swapped layers are not the ones the step was built from


def test_fallback_without_native_kernels(tiny_gguf):
    """LLAMAFORGE_NATIVE=0 (as on a machine without a compiler): int4 repacking and the eager step, same text."""
    script = ("import sys, torch, llamaforge; from llamaforge.generate import SamplingConfig, generate;"
              "from llamaforge.native.decode import installed; from llamaforge.quantize import BlockLinear;"
              f"llm = llamaforge.load({str(tiny_gguf)!r}); m = llm.model;"
              "assert installed(m) is None and not any(isinstance(x, BlockLinear) for x in m.modules());"
              "print(list(generate(m, list(range(3, 15)), SamplingConfig(max_new_tokens=16), decode=llm.decode)))")
    env = dict(os.environ, LLAMAFORGE_NATIVE="0", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-800:]
    assert len(eval(r.stdout.strip().splitlines()[-1])) == 16  # noqa: S307


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@needs_native
def test_many_chats_keep_memory_flat(tiny_gguf):
    llm = llamaforge.load(tiny_gguf)
    cfg = SamplingConfig(max_new_tokens=150, temperature=0.9, seed=0)
    chat = lambda n: list(generate(llm.model, [3 + n % 50] * (5 + n % 40), cfg, decode=llm.decode))  # noqa: E731
    for n in range(50):  # the allocator's pools settle over the first ~40 chats, in eager mode alike
        chat(n)
    first = rss_mb()
    for n in range(50, 110):
        chat(n)
    assert installed(llm.model).steps > 5000 and rss_mb() - first < 10


@needs_native
@pytest.mark.slow
@needs_default_model
def test_default_model_fused_step_close_to_fp32_and_memory_flat(default_llm, default_llm_q):
    llm = default_llm_q
    assert installed(llm.model) is not None and llm.decode_mode == "auto"
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
            "metal type, oil-based ink and a wooden press.")
    ids = llm.tokenizer.encode(text)
    fused = teacher_forced(llm, ids[:8], ids[8:])
    ref = default_llm.logits(ids)[8:]  # fp32-dequantized weights, full forward, at the steps' positions
    assert kl(fused, ref) < 0.01 and (fused.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    cfg = SamplingConfig(max_new_tokens=100, temperature=0.8, seed=0)
    chat = lambda n: list(generate(llm.model, llm.tokenizer.encode(f"Story number {n}:"), cfg, decode=llm.decode))  # noqa: E731
    for n in range(3):
        chat(n)
    first = rss_mb()
    for n in range(3, 15):
        chat(n)
    assert rss_mb() - first < 50  # no per-chat growth: the step keeps nothing between calls


PROMPT_LENGTHS = """
import resource, sys, torch, llamaforge
llm = llamaforge.load(llamaforge.DEFAULT_MODEL, threads=1)
m = llm.model
m.setup_caches(1, 256)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
with torch.no_grad():
    for i, T in enumerate(range(20, 100)):
        m(torch.randint(300, 40000, (1, T)), torch.arange(T), last_only=True)
        if i == 9:
            first = rss()
print(rss() - first)
"""


@needs_default_model
def test_prompts_of_many_lengths_keep_memory_flat_on_the_bf16_path():
    # oneDNN caches a primitive per GEMM shape (1,024 by default): every new prompt length kept ~3 MB
    env = dict(os.environ, LLAMAFORGE_BF16="1")
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    env.pop("LRU_CACHE_CAPACITY", None)
    out = subprocess.run([sys.executable, "-c", PROMPT_LENGTHS], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 40  # 70 new lengths: ~200 MB without the cache bound
