"""Model configurations: one `ModelConfig` dataclass and a registry of exact named configs.

Every entry names its source (the upstream params.json / config.json it was copied from).
Runtime sizes (batch, cache length) stay out of the config; derived fields live in
`__post_init__` (gpt-fast `ModelArgs`). A miss in `from_name` lists the known names
(litgpt `Config.from_name`): no fuzzy matching.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LlamaforgeError


@dataclass
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    hidden_dim: int | None = None  # None: Meta's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1: factor, low_freq_factor, high_freq_factor, original_max_seq_len
    max_seq_len: int = 2048  # the model's trained context window
    tie_embeddings: bool = False
    name: str = ""
    hf_id: str = ""  # the upstream repository id, also accepted by from_name
    source: str = ""
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise LlamaforgeError(f"config {self.name or '?'}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise LlamaforgeError(f"config {self.name or '?'}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:  # meta-llama/llama model.py FeedForward
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("head_dim")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        entry = CONFIGS.get(name) or _BY_HF_ID.get(name)
        if entry is None:
            raise LlamaforgeError(f"unknown model config {name!r}; known configs: {', '.join(CONFIGS)}")
        return cls(**entry)

    @property
    def n_params(self) -> int:
        """Parameter count (embedding and output counted once each; tied output counted once)."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim
        return self.n_layers * per_layer + self.dim + emb * (1 if self.tie_embeddings else 2)


_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
_LLAMA32_ROPE = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}


def _entries() -> list[dict]:
    l1 = dict(vocab_size=32000, norm_eps=1e-6, max_seq_len=2048, source="LLaMA (Touvron et al. 2023) Table 2; meta-llama/llama params.json")
    l2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096, source="Llama 2 (Touvron et al. 2023); meta-llama/Llama-2-*-hf config.json")
    l3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192, source="meta-llama/Meta-Llama-3-*/config.json")
    l31 = dict(l3, max_seq_len=131072, rope_scaling=_LLAMA31_ROPE, source="meta-llama/Llama-3.1-*/config.json")
    l32 = dict(l3, max_seq_len=131072, rope_scaling=_LLAMA32_ROPE, tie_embeddings=True, source="meta-llama/Llama-3.2-*/config.json")
    smol = dict(vocab_size=49152, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
                source="HuggingFaceTB/SmolLM2-*/config.json")
    return [
        dict(l1, name="llama-7b", hf_id="huggyllama/llama-7b", dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
        dict(l1, name="llama-13b", hf_id="huggyllama/llama-13b", dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
        dict(l1, name="llama-33b", hf_id="huggyllama/llama-30b", dim=6656, n_layers=60, n_heads=52, hidden_dim=17920),
        dict(l1, name="llama-65b", hf_id="huggyllama/llama-65b", dim=8192, n_layers=80, n_heads=64, hidden_dim=22016, norm_eps=1e-5),
        dict(l2, name="llama-2-7b", hf_id="meta-llama/Llama-2-7b-hf", dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
        dict(l2, name="llama-2-7b-chat", hf_id="meta-llama/Llama-2-7b-chat-hf", dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
        dict(l2, name="llama-2-13b", hf_id="meta-llama/Llama-2-13b-hf", dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
        dict(l2, name="llama-2-70b", hf_id="meta-llama/Llama-2-70b-hf", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
        dict(l3, name="llama-3-8b", hf_id="meta-llama/Meta-Llama-3-8B", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
        dict(l3, name="llama-3-8b-instruct", hf_id="meta-llama/Meta-Llama-3-8B-Instruct", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
        dict(l3, name="llama-3-70b", hf_id="meta-llama/Meta-Llama-3-70B", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
        dict(l31, name="llama-3.1-8b", hf_id="meta-llama/Llama-3.1-8B", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
        dict(l31, name="llama-3.1-8b-instruct", hf_id="meta-llama/Llama-3.1-8B-Instruct", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
        dict(l31, name="llama-3.1-70b", hf_id="meta-llama/Llama-3.1-70B", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
        dict(l31, name="llama-3.1-405b", hf_id="meta-llama/Llama-3.1-405B", dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, hidden_dim=53248),
        dict(l32, name="llama-3.2-1b", hf_id="meta-llama/Llama-3.2-1B", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192),
        dict(l32, name="llama-3.2-1b-instruct", hf_id="meta-llama/Llama-3.2-1B-Instruct", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192),
        dict(l32, name="llama-3.2-3b", hf_id="meta-llama/Llama-3.2-3B", dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192),
        dict(l32, name="llama-3.2-3b-instruct", hf_id="meta-llama/Llama-3.2-3B-Instruct", dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192),
        dict(smol, name="smollm2-135m", hf_id="HuggingFaceTB/SmolLM2-135M", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536),
        dict(smol, name="smollm2-135m-instruct", hf_id="HuggingFaceTB/SmolLM2-135M-Instruct", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536),
        dict(smol, name="smollm2-360m", hf_id="HuggingFaceTB/SmolLM2-360M", dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560),
        dict(smol, name="smollm2-360m-instruct", hf_id="HuggingFaceTB/SmolLM2-360M-Instruct", dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560),
        dict(smol, name="smollm2-1.7b", hf_id="HuggingFaceTB/SmolLM2-1.7B", dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, rope_theta=130000.0),
        dict(smol, name="smollm2-1.7b-instruct", hf_id="HuggingFaceTB/SmolLM2-1.7B-Instruct", dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, rope_theta=130000.0),
        # CPU pretraining demos (docs/pretraining.md); vocab_size is replaced by the tokenizer's at `pretrain`.
        # 10.0M parameters with a 4096-piece vocabulary (8.7M in matmuls, 58 MFLOP/token at context 256);
        # Meta's FFN rule with multiple_of 32; head_dim 64.
        dict(name="shakespeare-10m", dim=320, n_layers=6, n_heads=5, n_kv_heads=5, hidden_dim=864, vocab_size=4096,
             max_seq_len=256, source="llamaforge CPU pretraining demo (docs/pretraining.md)"),
        dict(name="micro", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=4096, max_seq_len=128,
             source="llamaforge pretraining test config (~0.6M parameters with a 4096-piece vocabulary)"),
        dict(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=512, max_seq_len=256,
             source="llamaforge test config (torchtitan debugmodel-sized)"),
    ]


CONFIGS: dict[str, dict] = {e["name"]: e for e in _entries()}
_BY_HF_ID: dict[str, dict] = {e["hf_id"]: e for e in CONFIGS.values() if e.get("hf_id")}


def matching_configs(cfg: ModelConfig) -> list[str]:
    """Names of registry entries with the same architecture shape as `cfg`."""
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")
    out = []
    for name in CONFIGS:
        ref = ModelConfig.from_name(name)
        if all(getattr(ref, k) == getattr(cfg, k) for k in keys):
            out.append(name)
    return out
