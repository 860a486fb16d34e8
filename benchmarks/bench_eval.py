"""Scoring speed of `llamaforge eval` on the full PIQA validation set (1,838 items), against peers.

    .venv/bin/python benchmarks/bench_eval.py [--limit N] [--peer-limit 100] [--threads 2] [--out benchmarks/results]

Measures, on the default model (SmolLM2-135M-Instruct Q4_1, dequantized to fp32: the exact weights
of the file), in one run:
- llamaforge: the eval engine (prefix-tree rows, batched), over the whole task;
- naive: the same model scored request by request, one forward per (context, choice), as
  lm-evaluation-harness does with batch size 1, on the first `--peer-limit` items;
- transformers: LlamaForCausalLM on the same GGUF, request by request, the same items
  (skipped cleanly when transformers or accelerate is missing).
Peers are timed on a subset (they are slow); their per-item rate is extrapolated to 1,838 items
and marked so. Per-item log-likelihoods of the three are compared (max abs difference).
Target: the full set in <= 300 s on the 2-core CI CPU. Writes bench_eval.json, .md and .png.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llamaforge  # noqa: E402
from llamaforge.evaluation.benchmarks import EvalConfig, encode_pair, run_mc  # noqa: E402
from llamaforge.llm import resolve  # noqa: E402
from llamaforge.evaluation.tasks import TASKS, load_docs  # noqa: E402

TARGET_S = 300.0


def request_by_request(forward, tok, docs) -> tuple[list[list[float]], int]:
    """One forward per (context, choice): the baseline the engine is measured against."""
    out, tokens = [], 0
    for doc in docs:
        lls = []
        for ctx, cont in doc.pairs:
            ids, start = encode_pair(tok, ctx, cont)
            with torch.no_grad():
                lp = forward(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
            tokens += len(ids) - 1
            lls.append(sum(lp[i - 1, ids[i]].item() for i in range(start, len(ids))))
        out.append(lls)
    return out, tokens


def picks(lls: list[list[float]], docs) -> list[int]:
    """acc_char's choice per item."""
    return [max(range(len(l)), key=lambda k: l[k] / max(d.norm_chars[k], 1)) for l, d in zip(lls, docs)]


def accuracy(lls: list[list[float]], docs) -> float:
    return sum(p == d.gold for p, d in zip(picks(lls, docs), docs)) / len(docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="items for llamaforge (default: all 1,838)")
    ap.add_argument("--peer-limit", type=int, default=100, help="items for the request-by-request peers (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = TASKS["piqa"]
    docs, _ = load_docs(task, args.limit)
    t0 = time.perf_counter()
    llm = llamaforge.load(quantize="none")
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    res, samples = run_mc(llm, task, docs, EvalConfig(batch_tokens=args.batch_tokens, progress=sys.stderr.isatty()))
    ours_s = time.perf_counter() - t0
    rows = [{"engine": "llamaforge eval", "items": len(docs), "seconds": ours_s, "seconds_per_1838": ours_s * 1838 / len(docs),
             "extrapolated": len(docs) != 1838, "acc_char": res["acc_char"], "acc": res["acc"],
             "forward_tokens_per_s": res["tokens"] / ours_s, "load_s": load_s}]
    print(f"llamaforge: {len(docs)} items in {ours_s:.1f} s ({res['tokens'] / ours_s:.0f} tokens/s), "
          f"acc_char {res['acc_char']:.4f}", file=sys.stderr)

    diffs = {}
    if args.peer_limit:
        sub = docs[:args.peer_limit]
        mine = [s["loglikelihoods"] for s in samples[:len(sub)]]
        t0 = time.perf_counter()
        naive, ntok = request_by_request(lambda x: llm.model(x), llm.tokenizer, sub)
        dt = time.perf_counter() - t0
        diffs["naive"] = max(abs(a - b) for x, y in zip(mine, naive) for a, b in zip(x, y))
        diffs["naive_picks_differ"] = sum(a != b for a, b in zip(picks(mine, sub), picks(naive, sub)))
        rows.append({"engine": "llamaforge, request by request", "items": len(sub), "seconds": dt,
                     "seconds_per_1838": dt * 1838 / len(sub), "extrapolated": True, "acc_char": accuracy(naive, sub),
                     "forward_tokens_per_s": ntok / dt})
        try:
            import transformers
            path = resolve(llamaforge.DEFAULT_MODEL)[1]
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            t0 = time.perf_counter()
            ref, ntok = request_by_request(lambda x: hf(x).logits, llm.tokenizer, sub)
            dt = time.perf_counter() - t0
            diffs["transformers"] = max(abs(a - b) for x, y in zip(mine, ref) for a, b in zip(x, y))
            diffs["transformers_picks_differ"] = sum(a != b for a, b in zip(picks(mine, sub), picks(ref, sub)))
            rows.append({"engine": f"transformers {transformers.__version__}, request by request", "items": len(sub),
                         "seconds": dt, "seconds_per_1838": dt * 1838 / len(sub), "extrapolated": True,
                         "acc_char": accuracy(ref, sub), "forward_tokens_per_s": ntok / dt})
        except ImportError as e:
            print(f"[transformers peer skipped: {e}]", file=sys.stderr)

    report = {"task": "piqa", "model": llamaforge.DEFAULT_MODEL, "weights": "fp32 (GGUF Q4_1 dequantized)",
              "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "target_s": TARGET_S, "rows": rows, "max_abs_loglik_diff_vs_ours": diffs,
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| engine | items timed | s (timed) | s per 1,838 items | tokens/s | acc_char |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['items']} | {r['seconds']:.1f} | {r['seconds_per_1838']:.0f}"
                     f"{' (extrapolated)' if r['extrapolated'] else ''} | {r['forward_tokens_per_s']:.0f} | {100 * r['acc_char']:.1f} |")
    md = "\n".join(lines) + f"\n\ntarget: full PIQA <= {TARGET_S:.0f} s; max |log-likelihood difference| vs llamaforge eval: " + \
        (", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in diffs.items()) or "not measured") + "\n"
    (out / "bench_eval.md").write_text(md)
    print(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh([r["engine"] for r in rows], [r["seconds_per_1838"] for r in rows], color="#4C72B0")
        ax.axvline(TARGET_S, color="red", ls="--", label=f"target {TARGET_S:.0f} s")
        ax.set_xlabel("seconds for PIQA validation (1,838 items)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bench_eval.png", dpi=120)
    except ImportError:
        print("[matplotlib missing: no chart]", file=sys.stderr)


if __name__ == "__main__":
    main()
