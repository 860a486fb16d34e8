"""`llamaforge rag index | search | ask` and `chat --rag`: answers from your documents, citing sources."""
from __future__ import annotations

import sys

from ..retrieval import (SYSTEM, AskConfig, Chunk, IndexConfig, KnowledgeBase, Prompt, format_sources, index, prepare,
                         source_label)
from ..retrieval.answer import ASK_HELP
from ..retrieval.indexing import INDEX_HELP, MODES
from .common import (add_config_flags, add_model_flags, add_sampling_flags, config_from_args, load_llm, sampling_kwargs,
                     write)


def add_commands(sub) -> None:
    r = sub.add_parser("rag", help="answer questions from your documents: index them, search, ask with cited sources")
    rs = r.add_subparsers(dest="rag_command", required=True)
    i = rs.add_parser("index", help="index (or update) .txt .md .html .pdf files into an SQLite file or a postgresql:// URL")
    i.add_argument("docs", help="folder (searched recursively) or file")
    i.add_argument("--db", required=True, help="index file (kb.db) or postgresql://user@host/dbname")
    add_config_flags(i, IndexConfig, INDEX_HELP)
    i.set_defaults(func=cmd_index)
    s = rs.add_parser("search", help="show the chunks retrieved for a query (no model needed)")
    s.add_argument("question")
    s.add_argument("--db", required=True, help="index file or postgresql:// URL")
    add_config_flags(s, AskConfig, ASK_HELP, choices={"mode": MODES})
    s.set_defaults(func=cmd_search)
    a = rs.add_parser("ask", help="answer a question from the index, citing sources [1]")
    a.add_argument("question")
    a.add_argument("--db", required=True, help="index file or postgresql:// URL")
    add_config_flags(a, AskConfig, ASK_HELP, choices={"mode": MODES})
    add_model_flags(a, speculative=True)
    add_sampling_flags(a)
    a.set_defaults(func=cmd_ask)


def cmd_index(args) -> None:
    report = index(args.docs, args.db, config_from_args(args, IndexConfig))
    print(f"{args.db}: {report.summary()}", file=sys.stderr)


def cmd_search(args) -> None:
    cfg = config_from_args(args, AskConfig)
    cfg.validate()
    with KnowledgeBase(args.db, cfg.embedding_model) as kb:
        for i, c in enumerate(kb.search(args.question, cfg.sources, cfg.mode, cfg.candidates, cfg.rrf_k), 1):
            body = " ".join(c.text.split())
            print(f"[{i}] {source_label(c)}  (score {c.score:.4f}, {c.n_tokens} tokens)\n    {body[:300]}{'...' if len(body) > 300 else ''}")


def _show(llm, prompt: Prompt) -> None:
    print(f"--- sent to the model: {len(prompt.ids)} prompt tokens + {prompt.reserve} for the answer <= {prompt.window} "
          f"({len(prompt.sources)} sources) ---\n{llm.tokenizer.decode(prompt.ids)}\n--- end of prompt ---", file=sys.stderr)


def cmd_ask(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from ..llm import sampling_config
    kw = sampling_kwargs(args)
    scfg = sampling_config(**kw)  # bad flags fail before the slow loads
    cfg = config_from_args(args, AskConfig)
    cfg.validate()
    with KnowledgeBase(args.db, cfg.embedding_model) as kb, ThreadPoolExecutor(1) as pool:
        # the embedding model starts (most of a search's time) while the language model loads; the
        # search itself stays on this thread, which owns the index's SQLite connection
        started = pool.submit(kb.embedder.embed, [args.question]) if cfg.mode != "keyword" else None
        llm = load_llm(args, speculative="off")  # --speculative lookup: opt-in, see docs/inference.md
        if started is not None:
            started.result()
        prompt = prepare(llm, kb, args.question, cfg, scfg.max_new_tokens)
    if cfg.show_context:
        _show(llm, prompt)
    for piece in llm.stream_ids(prompt.ids, progress=prompt_progress(), **{**kw, "max_new_tokens": prompt.reserve}):
        write(piece)
    write("\n\n" + format_sources(prompt.sources) + "\n")


def prompt_progress(min_tokens: int = 512):
    """A progress(done, total) callback that shows a long prompt's processing on a terminal's stderr."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        if total >= min_tokens:
            sys.stderr.write(f"\r[reading the prompt: {done}/{total} tokens]" if done < total else "\r\033[K")
            sys.stderr.flush()
    return show


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
