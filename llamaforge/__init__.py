"""llamaforge: run, quantize, train, adapt, serve and evaluate LLaMA-family models."""
import os as _os

# oneDNN (bf16 prompt GEMMs) keeps a compiled primitive per matrix shape, in two caches of 1,024 entries
# (its own and ideep's LRU): every new prompt length added ~3 MB that stayed, 2-4 MB per chat and +400 MB
# over 150 lengths (measured). 16 entries keep memory flat and still hold a chunked prefill's shapes.
# Read when oneDNN first runs, so this works even if torch was imported first; a user's setting wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
_os.environ.setdefault("LRU_CACHE_CAPACITY", "16")
from .config import CONFIGS, ModelConfig
from .errors import LlamaforgeError
from .generate import SamplingConfig
from .llm import DEFAULT_MODEL, LLM, load

__version__ = "0.1.0"
__all__ = ["CONFIGS", "DEFAULT_MODEL", "LLM", "LlamaforgeError", "ModelConfig", "SamplingConfig", "load"]
