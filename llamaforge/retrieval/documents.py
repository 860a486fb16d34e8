"""Documents for retrieval: text, Markdown, HTML (stdlib parser) and PDF (pypdf, page by page), split into
chunks of at most `chunk_tokens` tokens of the embedding model's own tokenizer, overlapping by `overlap`
tokens, cut at word starts and preferably after a sentence; PDF chunks cite their page.
"""
from __future__ import annotations

import bisect
import dataclasses
import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..errors import LlamaforgeError, require
from .stores import Chunk

SUFFIXES = {".txt": "text", ".md": "text", ".markdown": "text", ".html": "html", ".htm": "html", ".pdf": "pdf"}


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
    PdfReader = require("pypdf", "reading PDF files").PdfReader
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
