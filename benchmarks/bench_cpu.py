"""CPU inference benchmark: llamaforge vs llama.cpp (llama-cpp-python) vs transformers, one run.

Every engine runs in its own process on the same GGUF file, the same token ids and the same thread
count, so peak RSS and launch -> first token are each engine's own. Figures (medians of --runs):
prompt processing tokens/s on a 512-token prompt, decode tokens/s for 128 new tokens (greedy,
never stopping early), seconds from process launch to the first generated token, peak RSS, and with
--chats N the RSS growth over N chats of 100-2,000 tokens (after the first, which sizes the caches).
llamaforge runs its default path (`--decode auto`: the fused native step over the GGUF blocks);
`llamaforge:eager` runs the op-by-op PyTorch step for comparison.

    python benchmarks/bench_cpu.py --cases 135m            # the default model (SmolLM2-135M Q4_1)
    python benchmarks/bench_cpu.py --cases 7b              # a LLaMA-7B-shaped random Q4_0 file (~3.8 GB)
    python benchmarks/bench_cpu.py --llama-cpp-python /path/to/venv/bin/python   # where llama_cpp is installed
    python benchmarks/bench_cpu.py --engines llamaforge,llamaforge:eager --chats 50      # memory over many chats

Writes JSON, a markdown table and a PNG bar chart to --out. llama.cpp is skipped when its
interpreter cannot import llama_cpp; transformers is skipped for models that do not fit in RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_LEN, SHORT_PROMPT = 512, 8


def token_ids(n: int, vocab: int, seed: int) -> list[int]:
    import random
    rng = random.Random(seed)
    return [rng.randrange(300, vocab - 300) for _ in range(n)]  # clear of special tokens at both ends


# ---- children: one engine each, print one JSON line ----

def child_llamaforge(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    import llamaforge
    from llamaforge.generate import SamplingConfig, generate, prefill
    llm = llamaforge.load(a.model, threads=a.threads)  # the default would look at the machine's load
    if a.decode:
        llm.set_decode(a.decode)
    model, cfg = llm.model, SamplingConfig(temperature=0, max_new_tokens=a.new)
    short, long_ids = token_ids(SHORT_PROMPT, llm.config.vocab_size, 1), token_ids(PROMPT_LEN, llm.config.vocab_size, 2)
    next(generate(model, short, SamplingConfig(temperature=0, max_new_tokens=1), decode=llm.decode))
    first = time.time() - a.t0
    pp, tg = [], []
    with torch.no_grad():
        for _ in range(a.runs):
            model.setup_caches(1, 1024)
            t = time.perf_counter()
            prefill(model, torch.tensor([long_ids]), torch.arange(PROMPT_LEN))
            pp.append(PROMPT_LEN / (time.perf_counter() - t))
        list(generate(model, short, cfg, decode=llm.decode))  # warm the decode path at this cache size
        for _ in range(a.runs):
            t = time.perf_counter()
            n = sum(1 for _ in generate(model, short, cfg, decode=llm.decode))
            tg.append(n / (time.perf_counter() - t))
    return {"first_token_s": first, "pp": pp, "tg": tg, "decode_path": type(model.forward).__name__,
            "rss_growth_mb": chats_rss_growth(llm, a.chats) if a.chats else None}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def chats_rss_growth(llm, n: int) -> float:
    """RSS after n chats of 100-2,000 tokens (sampled, seeded) minus RSS after the first."""
    import random

    from llamaforge.generate import SamplingConfig, generate
    rng = random.Random(0)
    first = None
    for i in range(n):
        cfg = SamplingConfig(temperature=0.8, seed=i, max_new_tokens=rng.randrange(100, 2001))
        prompt = token_ids(rng.randrange(8, 200), llm.config.vocab_size, 100 + i)
        for _ in generate(llm.model, prompt, cfg, decode=llm.decode):
            pass
        if first is None:
            first = rss_mb()
        print(f"    chat {i + 1}/{n}: RSS {rss_mb():.0f} MB", file=sys.stderr, flush=True)
    return rss_mb() - first


def child_llamacpp(a) -> dict:
    import llama_cpp
    m = llama_cpp.Llama(model_path=a.model, n_ctx=1024, n_batch=512, n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    vocab = m.n_vocab()
    short, long_ids = token_ids(SHORT_PROMPT, vocab, 1), token_ids(PROMPT_LEN, vocab, 2)
    next(m.generate(short, top_k=1, temp=0.0, reset=True))
    first = time.time() - a.t0
    pp, tg = [], []
    for _ in range(a.runs):
        m.reset()
        t = time.perf_counter()
        m.eval(long_ids)
        pp.append(PROMPT_LEN / (time.perf_counter() - t))
    for _ in range(a.runs):
        t = time.perf_counter()
        for i, _tok in enumerate(m.generate(short, top_k=1, temp=0.0, reset=True)):
            if i + 1 == a.new:
                break
        tg.append(a.new / (time.perf_counter() - t))
    return {"first_token_s": first, "pp": pp, "tg": tg}


def child_transformers(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM
    p = Path(a.model)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    short, long_ids = torch.tensor([token_ids(SHORT_PROMPT, vocab, 1)]), torch.tensor([token_ids(PROMPT_LEN, vocab, 2)])
    with torch.no_grad():
        model.generate(short, max_new_tokens=1, do_sample=False)
        first = time.time() - a.t0
        pp, tg = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            model(long_ids)
            pp.append(PROMPT_LEN / (time.perf_counter() - t))
        for _ in range(a.runs):
            t = time.perf_counter()
            out = model.generate(short, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False)
            tg.append((out.shape[1] - SHORT_PROMPT) / (time.perf_counter() - t))
    return {"first_token_s": first, "pp": pp, "tg": tg}


CHILDREN = {"llamaforge": child_llamaforge, "llama.cpp": child_llamacpp, "transformers": child_transformers}


# ---- the 7B case: a LLaMA-7B-shaped file with random Q4_0 blocks, written by llamaforge's GGUF writer ----

def write_random_7b(path: Path) -> None:
    """dim 4096, 32 layers, 32 heads, 32k vocab; random Q4_0 blocks (d ~ 0.002, random nibbles), F32 norms."""
    import gguf
    import numpy as np

    from llamaforge.config import ModelConfig
    from llamaforge.gguf_writer import _write_hparams, _write_tokenizer
    from llamaforge.tokenizer import HFTokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    cfg = ModelConfig.from_name("llama-7b")
    cfg.name = "llama-7b-random"
    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = ["<unk>", "<s>", "</s>"] + sorted(byte_tokens)
    vocab += ["to"] + [f"tok{i}" for i in range(cfg.vocab_size - len(vocab) - 1)]
    # one merge: llama.cpp refuses a BPE vocabulary without merges
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[("t", "o")]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = HFTokenizer(tk, {"<unk>": 0, "<s>": 1, "</s>": 2}, bos="<s>", eos="</s>", add_bos=True)
    w = gguf.GGUFWriter(None, "llama")
    _write_hparams(w, cfg, cfg.name, gguf.LlamaFileType.MOSTLY_Q4_0)
    _write_tokenizer(w, tok, cfg.vocab_size)
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.dim), "output_norm.weight": (cfg.dim,),
              "output.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        for n, s in (("attn_norm", (cfg.dim,)), ("ffn_norm", (cfg.dim,)), ("attn_q", (cfg.dim, cfg.dim)), ("attn_k", (cfg.dim, cfg.dim)),
                     ("attn_v", (cfg.dim, cfg.dim)), ("attn_output", (cfg.dim, cfg.dim)), ("ffn_gate", (cfg.hidden_dim, cfg.dim)),
                     ("ffn_up", (cfg.hidden_dim, cfg.dim)), ("ffn_down", (cfg.dim, cfg.hidden_dim))):
            shapes[f"blk.{i}.{n}.weight"] = s
    Q = gguf.GGMLQuantizationType
    for name, s in shapes.items():
        if len(s) == 1:
            w.add_tensor_info(name, s, np.dtype(np.float32), s[0] * 4, raw_dtype=Q.F32)
        else:
            w.add_tensor_info(name, s, np.dtype(np.float32), s[0] * s[1] // 32 * 18, raw_dtype=Q.Q4_0)
    tmp = path.with_suffix(".tmp")
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, s in shapes.items():
        if len(s) == 1:
            w.write_tensor_data(np.ones(s, dtype=np.float32))
            continue
        blocks = rng.integers(0, 256, size=(s[0] * s[1] // 32, 18), dtype=np.uint8)
        blocks[:, :2] = np.full((blocks.shape[0], 1), 0.002, dtype=np.float16).view(np.uint8)
        w.write_tensor_data(blocks.reshape(s[0], -1))
    w.close()
    os.replace(tmp, path)


# ---- parent ----

def run_child(engine: str, model: Path, a, python: str, chats: int) -> dict | None:
    """One process launch of one engine: its raw figures (lists of runs), or None if it failed."""
    engine, _, mode = engine.partition(":")  # llamaforge:auto / :eager / :compile pick the decode mode
    cmd = [python, os.path.abspath(__file__), "--child", engine, "--model", str(model), "--threads", str(a.threads),
           "--runs", str(a.runs), "--new", str(a.new), "--chats", str(chats if engine == "llamaforge" else 0)] + \
        (["--decode", mode] if mode else [])
    t0 = time.time()
    r = subprocess.run(cmd + ["--t0", repr(t0)], stdout=subprocess.PIPE, stderr=None if chats else subprocess.PIPE,
                       text=True, timeout=a.timeout)
    if r.returncode != 0:
        print(f"  {engine}: failed\n{(r.stderr or '')[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(engine: str, launches: list[dict], chats: int) -> dict:
    """Medians over every run of every launch (engines alternate launch by launch)."""
    pp = [x for r in launches for x in r["pp"]]
    tg = [x for r in launches for x in r["tg"]]
    growth = next((r["rss_growth_mb"] for r in launches if r.get("rss_growth_mb") is not None), None)
    engine, _, mode = engine.partition(":")
    out = {"engine": engine + (f" ({mode})" if mode else ""),
           "first_token_s": round(statistics.median(r["first_token_s"] for r in launches), 2),
           "peak_rss_mb": round(max(r["peak_rss_mb"] for r in launches), 1),
           "pp_tok_s": round(statistics.median(pp), 1), "tg_tok_s": round(statistics.median(tg), 1),
           "pp_runs": [round(x, 1) for x in pp], "tg_runs": [round(x, 1) for x in tg],
           "first_token_runs": [round(r["first_token_s"], 2) for r in launches],
           "decode_path": launches[0].get("decode_path"), "rss_growth_mb": growth}
    print(f"  {out['engine']:<22} prompt {out['pp_tok_s']:>7.1f} tok/s  decode {out['tg_tok_s']:>6.1f} tok/s  "
          f"first token {out['first_token_s']:>6.2f} s  peak RSS {out['peak_rss_mb']:>7.1f} MB" +
          (f"  RSS growth over {chats} chats {growth:.1f} MB" if growth is not None else ""), file=sys.stderr)
    return out


def has_llama_cpp(python: str) -> bool:
    return python and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def markdown(results: dict, machine: str) -> str:
    lines = [f"Machine: {machine}", ""]
    for case, rows in results.items():
        ref = next((r for r in rows if r["engine"] == "llama.cpp"), None)
        growth = any(r.get("rss_growth_mb") is not None for r in rows)
        lines += [f"### {case}", "", "| engine | prompt tok/s (512) | decode tok/s (128) | launch -> first token (s) | peak RSS (MB) |"
                  + (" RSS growth over the chats (MB) |" if growth else ""), "|---|---|---|---|---|" + ("---|" if growth else "")]
        for r in rows:
            rel = lambda k: f" ({r[k] / ref[k]:.2f}x)" if ref and ref is not r else ""  # noqa: E731
            g = r.get("rss_growth_mb")
            lines.append(f"| {r['engine']} | {r['pp_tok_s']}{rel('pp_tok_s')} | {r['tg_tok_s']}{rel('tg_tok_s')} | "
                         f"{r['first_token_s']} | {r['peak_rss_mb']} |" + ((f" {g:.1f} |" if g is not None else " |") if growth else ""))
        lines.append("")
    return "\n".join(lines)


COLORS = {"llamaforge": "#c44", "llama.cpp": "#48c", "transformers": "#999"}


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return
    metrics = [("pp_tok_s", "prompt tok/s"), ("tg_tok_s", "decode tok/s"), ("first_token_s", "launch -> first token (s)"),
               ("peak_rss_mb", "peak RSS (MB)")]
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(4 * len(metrics), 3.2 * len(results)), squeeze=False)
    for row, (case, rows) in enumerate(results.items()):
        for col, (key, title) in enumerate(metrics):
            ax = axes[row][col]
            ax.bar([r["engine"] for r in rows], [r[key] for r in rows], color=[COLORS.get(r["engine"].split(" ")[0], "#999") for r in rows])
            ax.set_title(f"{case}: {title}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7, labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="135m", help="comma list: 135m, 7b")
    p.add_argument("--runs", type=int, default=3, help="timed runs per process launch")
    p.add_argument("--launches", type=int, default=2, help="process launches per engine, engines alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=128, help="tokens to decode")
    p.add_argument("--engines", default="llamaforge,llama.cpp,transformers",
                   help="comma list; llamaforge runs its default (auto: the fused native step); llamaforge:eager and "
                        "llamaforge:compile pick another decode mode")
    p.add_argument("--chats", type=int, default=0, help="also measure llamaforge's RSS growth over this many chats (0: skip)")
    p.add_argument("--decode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--llama-cpp-python", default=os.environ.get("LLAMA_CPP_PYTHON", sys.executable),
                   help="interpreter with llama_cpp installed (default: this one)")
    p.add_argument("--out", default="benchmarks/results/cpu")
    p.add_argument("--model-dir", default="benchmarks/models", help="where the 7B file is written")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        res = CHILDREN[a.child](a)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    from llamaforge.llm import resolve
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for case in a.cases.split(","):
        if case == "135m":
            model, title = resolve("smollm2-135m-instruct")[1], "SmolLM2-135M-Instruct Q4_1"
        elif case == "7b":
            model, title = Path(a.model_dir) / "llama-7b-random-q4_0.gguf", "LLaMA-7B shape, random Q4_0"
            if not model.exists():
                model.parent.mkdir(parents=True, exist_ok=True)
                print(f"writing {model} ...", file=sys.stderr)
                write_random_7b(model)
        else:
            raise SystemExit(f"unknown case {case!r}: use 135m or 7b")
        print(f"{title} ({model.stat().st_size / 1e6:.0f} MB), {a.threads} threads, median of {a.launches} launches x {a.runs} runs",
              file=sys.stderr)
        engines = []
        for engine in a.engines.split(","):
            python = sys.executable
            if engine == "llama.cpp":
                python = a.llama_cpp_python
                if not has_llama_cpp(python):
                    print("  llama.cpp: llama_cpp not importable; skipped (pass --llama-cpp-python)", file=sys.stderr)
                    continue
            if engine == "transformers" and model.stat().st_size * 8 > 0.8 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
                print("  transformers: the fp32 dequantized model would not fit in RAM; skipped", file=sys.stderr)
                continue
            engines.append((engine, python))
        launches: dict[str, list] = {e: [] for e, _ in engines}
        for i in range(a.launches):  # engines alternate, so a busy spell hits them alike
            for engine, python in engines:
                r = run_child(engine, model, a, python, a.chats if i == 0 else 0)
                if r:
                    launches[engine].append(r)
        rows = [summarize(e, runs, a.chats) for e, runs in launches.items() if runs]
        results[title] = rows
    machine = f"{os.cpu_count()} CPUs ({_cpu_name()}), {a.threads} threads"
    (out / "bench_cpu.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    (out / "bench_cpu.md").write_text(markdown(results, machine) + "\n")
    plot(results, out / "bench_cpu.png")
    print(markdown(results, machine))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
