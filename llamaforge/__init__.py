"""llamaforge: run, quantize, train, adapt, serve and evaluate LLaMA-family models."""
from .config import CONFIGS, ModelConfig
from .errors import LlamaforgeError
from .generate import SamplingConfig
from .llm import DEFAULT_MODEL, LLM, load

__version__ = "0.1.0"
__all__ = ["CONFIGS", "DEFAULT_MODEL", "LLM", "LlamaforgeError", "ModelConfig", "SamplingConfig", "load"]
