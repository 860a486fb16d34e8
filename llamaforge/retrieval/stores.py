"""Where `llamaforge.rag` keeps its index: one SQLite file, or PostgreSQL with pgvector.

Both backends hold the same three tables (meta, files, chunks) and answer the same five calls:
`initialize(meta)`, `replace_file(...)` and `remove_file(path)` (each one transaction, so an
interrupted run leaves every file either in its old or in its new state, never half-written),
`vector_search(q, k)` and `keyword_search(text, k)`.

- SQLite: chunk text and float32 vectors in `rag_chunks`; keyword search is FTS5's BM25 over an
  external-content table kept in step by triggers (sqlite.org/fts5.html, section 4.4.3); vector
  search is exact, a matrix product over all vectors held in memory (8 ms for 100k x 384 floats).
- PostgreSQL (a `postgresql://` URL): vectors in a pgvector `vector(dim)` column under an HNSW
  index (inner product: the vectors are normalized); keyword search is PostgreSQL's full-text
  search (`tsvector` with a GIN index, ranked by `ts_rank_cd`: not BM25, but only the order
  enters the fusion).
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LlamaforgeError, require

SCHEMA_VERSION = "1"
# Words that match almost every chunk: dropped from keyword queries (BM25 gives them ~0 weight anyway).
STOPWORDS = frozenset("""a an and are as at be by did do does for from had has have how i in is it its of on or that the
this to was were what when where which who whom whose why will with you your""".split())


@dataclass
class Chunk:
    """One piece of a document: its text, where it came from, and (once retrieved) its score."""
    ord: int  # position among the file's chunks, from 0
    text: str
    start: int  # character offsets in the document's extracted text
    end: int
    line: int  # line of `start` in that text, from 1
    page: int | None = None  # PDF page of `start`, from 1
    n_tokens: int = 0  # counted with the embedding model's tokenizer
    path: str = ""
    id: int | None = None
    score: float = 0.0


def keyword_terms(text: str, limit: int = 64) -> list[str]:
    words = list(dict.fromkeys(w for w in re.findall(r"\w+", text.lower())))
    kept = [w for w in words if w not in STOPWORDS] or words
    return kept[:limit]


def open_store(location: str | Path, create: bool = False):
    """A `postgresql://` URL opens PostgreSQL; anything else is an SQLite file path.
    `create=False` refuses a missing index instead of making an empty one."""
    loc = str(location)
    if loc.startswith(("postgresql://", "postgres://")):
        return PostgresStore(loc, create)
    return SQLiteStore(Path(loc), create)


class SQLiteStore:
    kind = "sqlite"

    def __init__(self, path: Path, create: bool):
        self.name = str(path)
        if path.is_dir():
            raise LlamaforgeError(f"{path} is a directory: --db takes an index file (kb.db) or a postgresql:// URL")
        if not path.exists():
            if not create:
                raise LlamaforgeError(f"no index at {path}: build one with `llamaforge rag index DOCS --db {path}`")
            if not path.parent.is_dir():
                raise LlamaforgeError(f"cannot create {path}: the folder {path.parent} does not exist")
        try:
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT in _write)
            self.conn = sqlite3.connect(str(path) if create else f"{path.resolve().as_uri()}?mode=rw", uri=not create,
                                        isolation_level=None, timeout=30)
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise LlamaforgeError(f"{path} is not a llamaforge index ({e}): choose another --db") from None
        if tables and "rag_meta" not in tables:
            self.conn.close()
            raise LlamaforgeError(f"{path} is an SQLite database but not a llamaforge index: choose another --db")
        self.conn.execute("PRAGMA foreign_keys=ON")
        if create:
            self.conn.execute("PRAGMA journal_mode=WAL")  # readers keep reading while a file is re-indexed
            # WAL + NORMAL: a commit is atomic and consistent; a power cut may lose the last few (re-run to redo them)
            self.conn.execute("PRAGMA synchronous=NORMAL")
        self._matrix = None  # (ids, vectors) cached for vector search
        self._version = None

    def close(self) -> None:
        self.conn.close()

    def _write(self):
        return _SQLiteTxn(self)

    def meta(self) -> dict[str, str]:
        try:
            return dict(self.conn.execute("SELECT key, value FROM rag_meta"))
        except sqlite3.OperationalError:
            return {}

    def initialize(self, meta: dict[str, str]) -> None:
        """(Re)create the tables, empty, and record `meta`: one transaction."""
        with self._write() as c:
            c.executescript_parts([
                "DROP TRIGGER IF EXISTS rag_chunks_ai", "DROP TRIGGER IF EXISTS rag_chunks_ad",
                "DROP TABLE IF EXISTS rag_fts", "DROP TABLE IF EXISTS rag_chunks", "DROP TABLE IF EXISTS rag_files",
                "DROP TABLE IF EXISTS rag_meta",
                "CREATE TABLE rag_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                "CREATE TABLE rag_files(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, hash TEXT NOT NULL, "
                "n_chunks INTEGER NOT NULL, indexed_at REAL NOT NULL)",
                "CREATE TABLE rag_chunks(id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES rag_files(id) "
                "ON DELETE CASCADE, ord INTEGER NOT NULL, start_char INTEGER NOT NULL, end_char INTEGER NOT NULL, "
                "line INTEGER NOT NULL, page INTEGER, n_tokens INTEGER NOT NULL, text TEXT NOT NULL, embedding BLOB NOT NULL)",
                "CREATE INDEX rag_chunks_file ON rag_chunks(file_id)",
                "CREATE VIRTUAL TABLE rag_fts USING fts5(text, content='rag_chunks', content_rowid='id', "
                "tokenize='porter unicode61 remove_diacritics 2')",
                "CREATE TRIGGER rag_chunks_ai AFTER INSERT ON rag_chunks BEGIN "
                "INSERT INTO rag_fts(rowid, text) VALUES (new.id, new.text); END",
                "CREATE TRIGGER rag_chunks_ad AFTER DELETE ON rag_chunks BEGIN "
                "INSERT INTO rag_fts(rag_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
            ])
            c.executemany("INSERT INTO rag_meta VALUES (?, ?)", [(k, str(v)) for k, v in {**meta, "schema": SCHEMA_VERSION}.items()])

    def files(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT path, hash FROM rag_files"))

    def replace_file(self, path: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Drop the file's old chunks and insert the new ones, in one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._write() as c:
            _delete_file(c, path)
            fid = c.execute("INSERT INTO rag_files(path, hash, n_chunks, indexed_at) VALUES (?, ?, ?, ?)",
                            (path, digest, len(chunks), time.time())).lastrowid
            c.executemany("INSERT INTO rag_chunks(file_id, ord, start_char, end_char, line, page, n_tokens, text, embedding) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          ((fid, ch.ord, ch.start, ch.end, ch.line, ch.page, ch.n_tokens, ch.text, v.tobytes())
                           for ch, v in zip(chunks, vectors)))

    def remove_file(self, path: str) -> None:
        with self._write() as c:
            _delete_file(c, path)

    def counts(self) -> tuple[int, int]:
        """(files, chunks)."""
        return (self.conn.execute("SELECT count(*) FROM rag_files").fetchone()[0],
                self.conn.execute("SELECT count(*) FROM rag_chunks").fetchone()[0])

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]  # changes when another connection commits
        if self._matrix is None or version != self._version:
            rows = self.conn.execute("SELECT id, embedding FROM rag_chunks ORDER BY id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1) if rows else np.zeros((0, 1), np.float32)
            self._matrix, self._version = (ids, mat), version
        return self._matrix

    def vector_search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        ids, mat = self._vectors()
        if not len(ids):
            return []
        scores = mat @ query.astype(np.float32)  # (n_chunks,) cosine: both sides are normalized
        k = min(k, len(ids))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[i]), float(scores[i])) for i in top]

    def keyword_search(self, text: str, k: int) -> list[tuple[int, float]]:
        terms = keyword_terms(text)
        if not terms:
            return []
        query = " OR ".join(f'"{t}"' for t in terms)  # quoted: FTS5 syntax in the question is plain text
        rows = self.conn.execute("SELECT rowid, bm25(rag_fts) FROM rag_fts WHERE rag_fts MATCH ? ORDER BY bm25(rag_fts) "
                                 "LIMIT ?", (query, k)).fetchall()
        return [(int(i), -float(s)) for i, s in rows]  # bm25() is lower-is-better

    def chunks(self, ids: list[int]) -> dict[int, Chunk]:
        if not ids:
            return {}
        rows = self.conn.execute(
            "SELECT c.id, f.path, c.ord, c.text, c.start_char, c.end_char, c.line, c.page, c.n_tokens FROM rag_chunks c "
            f"JOIN rag_files f ON f.id = c.file_id WHERE c.id IN ({','.join('?' * len(ids))})", list(ids)).fetchall()
        return {r[0]: Chunk(id=r[0], path=r[1], ord=r[2], text=r[3], start=r[4], end=r[5], line=r[6], page=r[7], n_tokens=r[8])
                for r in rows}

    def check(self) -> None:
        """Raise unless the full-text index agrees with the chunks (FTS5's own integrity check)."""
        self.conn.execute("INSERT INTO rag_fts(rag_fts, rank) VALUES ('integrity-check', 1)")


class _SQLiteTxn:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception (KeyboardInterrupt included)."""

    def __init__(self, store: SQLiteStore):
        self.store, self.conn = store, store.conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, typ, exc, tb):
        if typ is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        self.store._matrix = None
        return False

    def execute(self, sql, params=()):
        return self.conn.execute(sql, params)

    def executemany(self, sql, rows):
        return self.conn.executemany(sql, rows)

    def executescript_parts(self, statements):
        for s in statements:
            self.conn.execute(s)


def _delete_file(c, path: str) -> None:
    # Chunks first and explicitly, so their delete trigger keeps the FTS table in step.
    c.execute("DELETE FROM rag_chunks WHERE file_id IN (SELECT id FROM rag_files WHERE path = ?)", (path,))
    c.execute("DELETE FROM rag_files WHERE path = ?", (path,))


# ---- PostgreSQL + pgvector ----

def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class PostgresStore:
    kind = "postgresql"

    def __init__(self, url: str, create: bool):
        psycopg = require("psycopg", "a postgresql:// index")
        self.name = _redact(url)
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            msg = " ".join(str(e).split())
            raise LlamaforgeError(f"cannot connect to {self.name}: {msg}") from None
        self.psycopg = psycopg
        if not create and not self.meta():
            self.conn.close()
            raise LlamaforgeError(f"no llamaforge index in {self.name}: build one with `llamaforge rag index DOCS --db URL`")

    def close(self) -> None:
        self.conn.close()

    def _q(self, sql, params=()):
        try:
            return self.conn.execute(sql, params)
        except self.psycopg.Error as e:
            raise LlamaforgeError(f"{self.name}: {' '.join(str(e).split())}") from None

    def meta(self) -> dict[str, str]:
        if self._q("SELECT to_regclass('rag_meta')").fetchone()[0] is None:
            return {}
        return dict(self._q("SELECT key, value FROM rag_meta").fetchall())

    def initialize(self, meta: dict[str, str]) -> None:
        dim = int(meta["dim"])
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except self.psycopg.Error as e:
            raise LlamaforgeError(f"{self.name}: the pgvector extension is not available ({' '.join(str(e).split())}): "
                                  "install it on the server (Debian: postgresql-NN-pgvector)") from None
        with self.conn.transaction():  # DDL is transactional in PostgreSQL
            for sql in [
                "DROP TABLE IF EXISTS rag_chunks, rag_files, rag_meta",
                "CREATE TABLE rag_meta(key text PRIMARY KEY, value text NOT NULL)",
                "CREATE TABLE rag_files(id bigserial PRIMARY KEY, path text UNIQUE NOT NULL, hash text NOT NULL, "
                "n_chunks integer NOT NULL, indexed_at double precision NOT NULL)",
                f"CREATE TABLE rag_chunks(id bigserial PRIMARY KEY, file_id bigint NOT NULL REFERENCES rag_files(id) "
                f"ON DELETE CASCADE, ord integer NOT NULL, start_char integer NOT NULL, end_char integer NOT NULL, "
                f"line integer NOT NULL, page integer, n_tokens integer NOT NULL, text text NOT NULL, "
                f"embedding vector({dim}) NOT NULL, tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)",
                "CREATE INDEX rag_chunks_file ON rag_chunks(file_id)",
                "CREATE INDEX rag_chunks_tsv ON rag_chunks USING gin(tsv)",
                "CREATE INDEX rag_chunks_hnsw ON rag_chunks USING hnsw (embedding vector_ip_ops)",
            ]:
                self._q(sql)
            with self.conn.cursor() as cur:
                cur.executemany("INSERT INTO rag_meta VALUES (%s, %s)", [(k, str(v)) for k, v in {**meta, "schema": SCHEMA_VERSION}.items()])

    def files(self) -> dict[str, str]:
        return dict(self._q("SELECT path, hash FROM rag_files").fetchall())

    def replace_file(self, path: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        with self.conn.transaction():
            self._q("DELETE FROM rag_files WHERE path = %s", (path,))  # chunks go by ON DELETE CASCADE
            fid = self._q("INSERT INTO rag_files(path, hash, n_chunks, indexed_at) VALUES (%s, %s, %s, %s) RETURNING id",
                          (path, digest, len(chunks), time.time())).fetchone()[0]
            with self.conn.cursor() as cur:
                cur.executemany("INSERT INTO rag_chunks(file_id, ord, start_char, end_char, line, page, n_tokens, text, embedding) "
                                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::vector)",
                                [(fid, ch.ord, ch.start, ch.end, ch.line, ch.page, ch.n_tokens, ch.text.replace("\x00", ""),
                                  _vec(v)) for ch, v in zip(chunks, vectors)])

    def remove_file(self, path: str) -> None:
        with self.conn.transaction():
            self._q("DELETE FROM rag_files WHERE path = %s", (path,))

    def counts(self) -> tuple[int, int]:
        return (self._q("SELECT count(*) FROM rag_files").fetchone()[0], self._q("SELECT count(*) FROM rag_chunks").fetchone()[0])

    def vector_search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        with self.conn.transaction():
            self._q(f"SET LOCAL hnsw.ef_search = {max(40, int(k))}")  # the HNSW scan returns at most ef_search rows
            rows = self._q("SELECT id, -(embedding <#> %s::vector) FROM rag_chunks ORDER BY embedding <#> %s::vector LIMIT %s",
                           (_vec(query), _vec(query), k)).fetchall()
        return [(int(i), float(s)) for i, s in rows]

    def keyword_search(self, text: str, k: int) -> list[tuple[int, float]]:
        terms = keyword_terms(text)
        if not terms:
            return []
        query = " | ".join(f"'{t}'" for t in terms)  # terms are \w+: nothing to escape
        rows = self._q("SELECT id, ts_rank_cd(tsv, q) AS r FROM rag_chunks, to_tsquery('english', %s) q WHERE tsv @@ q "
                       "ORDER BY r DESC, id LIMIT %s", (query, k)).fetchall()
        return [(int(i), float(s)) for i, s in rows]

    def chunks(self, ids: list[int]) -> dict[int, Chunk]:
        if not ids:
            return {}
        rows = self._q("SELECT c.id, f.path, c.ord, c.text, c.start_char, c.end_char, c.line, c.page, c.n_tokens "
                       "FROM rag_chunks c JOIN rag_files f ON f.id = c.file_id WHERE c.id = ANY(%s)", (list(ids),)).fetchall()
        return {r[0]: Chunk(id=r[0], path=r[1], ord=r[2], text=r[3], start=r[4], end=r[5], line=r[6], page=r[7], n_tokens=r[8])
                for r in rows}

    def check(self) -> None:
        n = self._q("SELECT count(*) FROM rag_chunks c LEFT JOIN rag_files f ON f.id = c.file_id WHERE f.id IS NULL").fetchone()[0]
        if n:
            raise LlamaforgeError(f"{self.name}: {n} chunks belong to no file")


def _vec(v: np.ndarray) -> str:
    """pgvector's text form, '[0.1,0.2,...]' (no client-side adapter needed)."""
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, dtype=np.float32).tolist()) + "]"
