"""Answer each turn fast: the conversation cache, the server's prefix cache, speculative decoding, `rag ask`.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_answer.py [--parts chat,clients,spec,rag] [--runs 3] [--threads 2]
        [--peer-python /work/peer/venv/bin/python] [--out benchmarks/results/answer]

On the default model (SmolLM2-135M-Instruct Q4_1, as `llamaforge.load()` gives it), medians of --runs:
- chat: a scripted 10-turn chat whose history grows to ~2,000 tokens (the same user messages and the
  same assistant replies every run, so every engine sees the same prompts): time to first token of
  each turn, for llamaforge with its conversation cache, llamaforge without it, and llama.cpp
  (llama-cpp-python `Llama`, which keeps the longest common prefix of its previous tokens);
- clients: 8 requests sharing a ~1,000-token system prompt through the serving engine, all at once
  and one after another: prompt tokens run through the model and mean time to first token, prefix
  cache on vs off;
- spec: tokens/s of greedy answers with prompt-lookup speculation vs without, on (a) "repeat this
  passage", (b) a RAG answer over numbered sources, (c) free writing; outputs must be identical;
- rag: `llamaforge rag ask` end to end (a fresh process: imports, model and embedder start-up,
  retrieval, prompt, answer) over ~30 Markdown files of this repository.
Writes bench_answer.json and bench_answer.md. Timings on a shared machine are indicative only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

USER_TURNS = [
    "I am planning a vegetable garden in a small backyard that gets about six hours of sun. Which vegetables "
    "should a beginner start with, and how should I arrange the beds so that taller plants do not shade the rest?",
    "The soil is heavy clay that stays wet for days after rain. What can I add to it, how much, and when, so that "
    "the roots do not rot and the beds drain well before planting in spring?",
    "How often should I water tomatoes and peppers in midsummer when the temperature is above thirty degrees, and "
    "is it better to water in the morning or the evening? I can only water by hand with a can.",
    "Some leaves on my zucchini have white powdery spots that spread quickly. What is it, is it dangerous for the "
    "other plants, and what can I do about it without chemical fungicides?",
    "I would like to attract more bees and other pollinators. Which flowers could I plant along the edges of the "
    "vegetable beds, and do any of them also keep pests away from the vegetables?",
    "Slugs ate most of my lettuce seedlings last week. What are the most effective ways to protect young plants "
    "from slugs and snails, and which of them are safe for pets and wild birds?",
    "At the end of the season I want to save seeds from my best tomatoes and beans. How do I collect, clean, dry "
    "and store them so that they germinate well next year?",
    "Can I grow anything during the winter in a cold frame? Which crops tolerate frost, how do I manage "
    "ventilation on sunny days, and when should I sow them to have a harvest in early spring?",
    "My compost pile smells bad and is very wet and slimy. What am I doing wrong, and how do I fix the balance "
    "of materials so that it breaks down properly without attracting rats?",
    "Please summarise the three most important things I should do next spring, based on everything we discussed "
    "about the soil, watering, pests and pollinators, as a short checklist.",
]
REPLY = ("Here is a practical answer. Start small and keep notes: which varieties you planted, when you sowed them, "
         "how much you watered and what went wrong. Improve the soil with compost every year, water deeply but not "
         "too often, check the plants every morning for pests, and adjust your plan each season based on what worked.")
PASSAGE = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
           "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
           "quickly and cheaply. Within fifty years, presses had spread to more than two hundred cities across "
           "Europe, and millions of volumes had been printed. Scholars could compare identical copies of a text, "
           "errors could be corrected in later editions, and ideas travelled faster than ever before.")


def median(xs):
    return statistics.median(xs) if xs else None


def chat_prompts(llm) -> list[list[int]]:
    """The token ids of each turn's prompt, with the scripted replies in the history."""
    msgs, out = [], []
    for u in USER_TURNS:
        msgs.append({"role": "user", "content": u})
        out.append(llm.chat_ids(msgs))
        msgs.append({"role": "assistant", "content": REPLY})
    return out


def ttft_ours(llm, prompts: list[list[int]], cached: bool) -> list[float]:
    from llamaforge.generate import SamplingConfig
    llm.reset()
    llm.prompt_cache = cached
    cfg = SamplingConfig(temperature=0, max_new_tokens=8)
    times = []
    for ids in prompts:
        t = time.perf_counter()
        it = llm.generate_ids(ids, cfg, llm.tokenizer.stop_ids)
        next(it)
        times.append(time.perf_counter() - t)
        for _ in it:  # the rest of a short answer: its tokens land in the cache as a real turn's would
            pass
    llm.prompt_cache = True
    return times


PEER = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, n_batch=512, verbose=False)
runs = []
for r in range(int(sys.argv[3])):
    llm.reset()
    times = []
    for ids in prompts:
        t = time.perf_counter()
        it = llm.generate(ids, temp=0.0, reset=True)
        first = next(it)
        times.append(time.perf_counter() - t)
        for i, tok in zip(range(7), it):  # 8 tokens in all, as ours
            pass
    runs.append(times)
print(json.dumps(runs))
"""


def bench_chat(llm, args) -> dict:
    prompts = chat_prompts(llm)[:args.turns]
    res = {"turn_prompt_tokens": [len(p) for p in prompts]}
    ttft_ours(llm, prompts[:1], False)  # warm-up: first-call allocations are not a turn's cost
    for name, cached in (("llamaforge_cached", True), ("llamaforge_uncached", False)):
        runs = [ttft_ours(llm, prompts, cached) for _ in range(args.runs)]
        res[name] = [median(col) for col in zip(*runs)]
        print(f"chat {name}: " + " ".join(f"{t:.2f}" for t in res[name]), flush=True)
    if args.peer_python and Path(args.peer_python).exists():
        r = subprocess.run([args.peer_python, "-c", PEER, str(llm.source.path), str(args.threads), str(args.runs)],
                           input=json.dumps(prompts), capture_output=True, text=True, timeout=3600)
        if r.returncode == 0:
            runs = json.loads(r.stdout.strip().splitlines()[-1])
            res["llama_cpp_cached"] = [median(col) for col in zip(*runs)]
            print("chat llama.cpp: " + " ".join(f"{t:.2f}" for t in res["llama_cpp_cached"]), flush=True)
        else:
            res["llama_cpp_error"] = r.stderr[-500:]
    return res


def bench_clients(llm, args) -> dict:
    """8 requests with one ~1,000-token system prompt through the engine, prefix cache on and off."""
    from llamaforge.generate import SamplingConfig
    from llamaforge.serving.engine import Engine, Sequence
    system = " ".join([PASSAGE] * 10)
    prompts = [llm.chat_ids([{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: {u}"}])
               for i, u in enumerate(USER_TURNS[:8])]
    res = {"system_prompt_tokens": len(llm.chat_ids([{"role": "system", "content": system}])),
           "prompt_tokens": sum(map(len, prompts))}
    for arrival in ("together", "one_by_one"):
        for on in (True, False):
            ttfts, processed = [], []
            for _ in range(args.runs):
                engine = Engine(llm.model, max_batch=8, max_seq_len=2048, prefix_cache_bytes=(512 << 20) if on else 0).start()
                seqs = []
                try:
                    for p in prompts:  # a Sequence's clock starts when it is made: make it as it is sent
                        seqs.append(s := engine.submit(Sequence(p, SamplingConfig(temperature=0, max_new_tokens=4))))
                        if arrival == "one_by_one":
                            for _ in s:  # until it ends: the next client comes after
                                pass
                    for s in seqs if arrival == "together" else ():
                        for _ in s:
                            pass
                finally:
                    engine.stop()
                ttfts.append(statistics.mean(s.first_token_at - s.arrived for s in seqs))
                processed.append(engine.stats["prefilled_tokens"])
            key = f"{arrival}_{'prefix_cache' if on else 'no_cache'}"
            res[key] = {"prefilled_tokens": median(processed), "mean_ttft_s": median(ttfts)}
            print(f"clients {key}: {res[key]}", flush=True)
    llm.reset()
    return res


def spec_prompts(llm) -> dict[str, list[int]]:
    docs = sorted((ROOT / "docs").glob("*.md"))
    sources = []
    for i, p in enumerate(docs[:4], 1):
        text = " ".join(p.read_text().split())[:900]
        sources.append(f"[{i}] ({p.name})\n{text}")
    from llamaforge.retrieval import SYSTEM
    rag = [{"role": "system", "content": SYSTEM},
           {"role": "user", "content": "Sources:\n\n" + "\n\n".join(sources) + "\n\nQuestion: What does each of these documents "
                                       "describe? Quote the relevant sentences."}]
    return {"quote": llm.chat_ids([{"role": "user", "content": f"Repeat this passage word for word:\n\n{PASSAGE}"}]),
            "rag": llm.chat_ids(rag),
            "free": llm.chat_ids([{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a "
                                                             "message in a bottle."}])}


def bench_spec(llm, args) -> dict:
    from llamaforge.generate import SamplingConfig
    res = {}
    cfg = SamplingConfig(temperature=0, max_new_tokens=args.spec_tokens)
    for name, ids in spec_prompts(llm).items():
        row = {"prompt_tokens": len(ids)}
        outs, rates, forwards = {}, {"off": [], "lookup": []}, {}
        for _ in range(args.runs):
            for mode in ("off", "lookup"):  # alternating, so a noisy moment hits both
                llm.set_speculative(mode)
                llm.reset()
                llm.prefill(ids)  # the prompt is not what is measured
                calls = []
                hook = llm.model.register_forward_hook(lambda *a: calls.append(1))
                t = time.perf_counter()
                out = list(llm.generate_ids(ids, cfg, llm.tokenizer.stop_ids))
                rates[mode].append(len(out) / (time.perf_counter() - t))
                hook.remove()
                outs[mode], forwards[mode] = out, len(calls)
        for mode in ("off", "lookup"):
            row[f"{mode}_tok_s"] = median(rates[mode])
            row[f"{mode}_tokens_per_forward"] = len(outs[mode]) / forwards[mode]  # machine-independent: forwards saved
        row["tokens"] = len(outs["off"])
        row["identical"] = outs["off"] == outs["lookup"]
        row["speedup"] = row["lookup_tok_s"] / row["off_tok_s"]
        res[name] = row
        print(f"spec {name}: {row}", flush=True)
    llm.set_speculative("off")
    return res


def bench_rag(args) -> dict:
    files = sorted(p for p in ROOT.rglob("*.md") if ".venv" not in p.parts and "node_modules" not in p.parts)[:30]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for i, f in enumerate(files):
            (docs / f"{i:02d}_{f.name}").write_text(f.read_text())
        db = str(Path(tmp) / "kb.db")
        subprocess.run([sys.executable, "-m", "llamaforge", "rag", "index", str(docs), "--db", db], check=True, env=env,
                       capture_output=True)
        times = {}
        for spec in ("auto", "off"):
            ts = []
            for _ in range(args.runs):
                t = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "llamaforge", "rag", "ask", "How do I serve a model over HTTP?",
                                    "--db", db, "--threads", str(args.threads), "--speculative", spec],
                                   capture_output=True, text=True, env=env)
                ts.append(time.perf_counter() - t)
                if r.returncode:
                    raise SystemExit(r.stderr)
            times[spec] = median(ts)
            print(f"rag ask (--speculative {spec}): {times[spec]:.1f} s", flush=True)
    return {"documents": len(files), "end_to_end_s": times["auto"], "end_to_end_no_speculation_s": times["off"]}


def write_md(res: dict, out: Path) -> None:
    lines = ["# bench_answer", "", f"threads {res['threads']}, runs {res['runs']} (medians); {res['host']}", ""]
    if "chat" in res:
        c = res["chat"]
        lines += ["## 10-turn chat: time to first token (s)", "",
                  "| turn | prompt tokens | llamaforge cached | llamaforge uncached | llama.cpp cached |", "|---|---|---|---|---|"]
        peer = c.get("llama_cpp_cached") or [None] * len(c["turn_prompt_tokens"])
        for i, n in enumerate(c["turn_prompt_tokens"]):
            f = (lambda x: "-" if x is None else f"{x:.3f}")
            lines.append(f"| {i + 1} | {n} | {f(c['llamaforge_cached'][i])} | {f(c['llamaforge_uncached'][i])} | {f(peer[i])} |")
        lines.append("")
    if "clients" in res:
        c = res["clients"]
        lines += [f"## 8 clients, one {c['system_prompt_tokens']}-token system prompt ({c['prompt_tokens']} prompt tokens)", "",
                  "| arrival | prefix cache | tokens prefilled | mean TTFT (s) |", "|---|---|---|---|"]
        for k, v in c.items():
            if isinstance(v, dict):
                arrival, _, mode = k.partition("_prefix_cache") if "prefix_cache" in k else k.partition("_no_cache")
                lines.append(f"| {arrival} | {'on' if 'prefix_cache' in k else 'off'} | {v['prefilled_tokens']} | {v['mean_ttft_s']:.3f} |")
        lines.append("")
    if "spec" in res:
        lines += ["## speculative decoding (prompt lookup), greedy", "",
                  "| prompt | tokens | off tok/s | lookup tok/s | speed-up | tokens per forward (lookup) | identical |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in res["spec"].items():
            lines.append(f"| {k} | {v['tokens']} | {v['off_tok_s']:.1f} | {v['lookup_tok_s']:.1f} | {v['speedup']:.2f}x | "
                         f"{v['lookup_tokens_per_forward']:.2f} | {v['identical']} |")
        lines.append("")
    if "rag" in res:
        r = res["rag"]
        lines += [f"## rag ask end to end ({r['documents']} documents)", "",
                  f"{r['end_to_end_s']:.1f} s (speculation off: {r['end_to_end_no_speculation_s']:.1f} s)", ""]
    (out / "bench_answer.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="chat,clients,spec,rag")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec-tokens", type=int, default=128)
    ap.add_argument("--turns", type=int, default=10, help="chat turns measured (fewer: a quick check)")
    ap.add_argument("--peer-python", default="/work/peer/venv/bin/python")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/answer"))
    args = ap.parse_args()
    import platform

    import torch
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    res = {"threads": args.threads, "runs": args.runs, "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    if set(parts) & {"chat", "clients", "spec"}:
        import llamaforge
        llm = llamaforge.load(threads=args.threads)  # not the default, which looks at the machine's load
        for name, fn in (("chat", bench_chat), ("clients", bench_clients), ("spec", bench_spec)):
            if name in parts:
                res[name] = fn(llm, args)
    if "rag" in parts:
        res["rag"] = bench_rag(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_answer.json").write_text(json.dumps(res, indent=1))
    write_md(res, out)
    print(f"wrote {out / 'bench_answer.json'}")


if __name__ == "__main__":
    main()
