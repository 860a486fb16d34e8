"""`llamaforge efficiency`: accuracy per unit of cost for the fp32, int8 and int4 variants of one model.

The LLaMA paper's argument (section 1) is that the cheapest model at *inference* reaching a given
quality is the one to prefer. This command measures the trade for one model: each variant runs the
same benchmark items (`eval.py`) in its own process, so its peak memory is its own, and reports

- accuracy (the tasks' primary metrics, averaged) with its standard error,
- weight bytes (parameters and buffers held, `quantize.weight_bytes`), peak RSS of the process,
- tokens/s while scoring (batched, many rows per forward) and decoding (one sequence, greedy),
- FLOPs per token (below) and energy per token = device power / tokens per second, from a
  configurable power (`--watts`; default 10 W per thread, the guess accounting.py uses for a busy
  server core: a guess, not a measurement),

then marks the Pareto front (no other variant is both at least as accurate and at most as costly)
and draws accuracy against energy per token and against weight bytes.

FLOPs per token of a forward pass: every weight matrix entry is one multiply-add per token, 2 N
FLOPs for N matmul parameters (the tied embedding counts once, as the output projection; an untied
input embedding is a lookup); attention adds q.k over T earlier positions and the weighted sum of
values, 4 T dim per layer (Kaplan et al. 2020 table 1; PaLM appendix B). T is the mean context a
scored token attends to, half the mean row length. Weight-only quantization changes bytes moved,
not multiply-adds: the variants share one FLOPs figure.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import accounting
from ..errors import LlamaforgeError

COSTS = {"J/token eval": "energy_per_token_j", "J/token decode": "decode_energy_per_token_j", "bytes": "weight_bytes"}
VARIANTS = {"fp32": "none", "bf16": "none", "int8": "int8", "int4": "int4"}  # name -> llamaforge.load(quantize=...)
WATTS_PER_THREAD = 10.0


@dataclass
class EfficiencyConfig:
    tasks: str = "arc_easy,piqa"
    limit: int | None = 300
    variants: str = "fp32,int8,int4"
    watts: float | None = None
    batch_tokens: int = 4096
    decode_tokens: int = 64
    output: str = "efficiency-results"
    progress: bool = True


HELP = {
    "tasks": "comma-separated eval tasks (see `llamaforge eval --help`)",
    "limit": "first N items of each task",
    "variants": f"weight formats to compare, from: {', '.join(VARIANTS)}",
    "watts": f"device power in W for energy per token (default: {WATTS_PER_THREAD:g} W per thread, a guess)",
    "batch_tokens": "most padded tokens per forward pass",
    "decode_tokens": "tokens generated to time decoding (0: skip)",
    "output": "folder for efficiency.json, efficiency.md and efficiency.png",
    "progress": "show progress bars",
}


def parse_variants(spec: str) -> list[str]:
    names = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise LlamaforgeError(f"unknown variant(s) {', '.join(bad) if bad else repr(spec)}; known: {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def _rss_peak_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_variant(spec: dict) -> dict:
    """In a fresh process: load one variant, evaluate, time decoding; the row of the report."""
    import torch

    from .. import load
    from .benchmarks import EvalConfig, evaluate
    name = spec["variant"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if name == "bf16" else None
    llm = load(spec["model"], tokenizer=spec.get("tokenizer"), device=spec.get("device"), dtype=dtype, quantize=VARIANTS[name])
    load_s = time.perf_counter() - t0
    from ..quantize import weight_bytes
    wbytes = weight_bytes(llm.model)
    cfg = EvalConfig(tasks=spec["tasks"], limit=spec["limit"], batch_tokens=spec["batch_tokens"], output="",
                     progress=spec["progress"])
    report = evaluate(llm, cfg, spec["model"])
    res = report["results"]
    accs = [r[r["primary"]] for r in res.values()]
    ns = [r["n"] for r in res.values()]
    tokens, secs = sum(r["tokens"] for r in res.values()), sum(r["time_s"] for r in res.values())
    decode = None
    if spec["decode_tokens"]:
        ids = llm.tokenizer.encode("The history of the printing press begins")
        from ..generate import SamplingConfig, generate
        t1, n = time.perf_counter(), 0
        for _ in generate(llm.model, ids, SamplingConfig(max_new_tokens=spec["decode_tokens"], temperature=0)):
            n += 1
        decode = n / (time.perf_counter() - t1)
    rows = sum(r["tokens"] for r in res.values()) / max(1, sum(ns))
    return {"variant": name, "status": "ok", "accuracy": sum(accs) / len(accs),
            "accuracy_stderr": math.sqrt(sum(r[r["primary"] + "_stderr"] ** 2 for r in res.values())) / len(accs),
            "per_task": {k: r[r["primary"]] for k, r in res.items()}, "items": sum(ns),
            "weight_bytes": wbytes, "peak_rss_bytes": _rss_peak_bytes(), "load_s": load_s,
            "eval_tokens_per_s": tokens / secs if secs else None, "decode_tokens_per_s": decode,
            "flops_per_token": accounting.forward_flops_per_token(llm.config, rows / 2), "threads": torch.get_num_threads()}


def pareto(rows: list[dict], cost: str) -> list[str]:
    """Variants no other variant beats on accuracy without costing more (and vice versa)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get(cost) is not None]
    front = []
    for r in ok:
        dominated = any(o is not r and o["accuracy"] >= r["accuracy"] and o[cost] <= r[cost]
                        and (o["accuracy"] > r["accuracy"] or o[cost] < r[cost]) for o in ok)
        if not dominated:
            front.append(r["variant"])
    return front


def markdown(report: dict) -> str:
    head = ["variant", "accuracy", "weights (MB)", "peak RSS (MB)", "eval tok/s", "decode tok/s", "GFLOP/token",
            "J/token (eval)", "J/token (decode)", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["variants"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | {r.get('status')} |" + " |" * (len(head) - 2))
            continue
        f = lambda x, d=1: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
        fronts = ", ".join(name for name, cost in COSTS.items() if r["variant"] in report["pareto"][cost])
        lines.append("| " + " | ".join([
            r["variant"], f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_stderr']:.1f}", f(r["weight_bytes"] / 1e6),
            f(r["peak_rss_bytes"] / 1e6, 0), f(r["eval_tokens_per_s"], 0), f(r["decode_tokens_per_s"]),
            f"{r['flops_per_token'] / 1e9:.3g}", f(r.get("energy_per_token_j"), 3), f(r.get("decode_energy_per_token_j"), 3),
            fronts]) + " |")
    return ("\n".join(lines) + f"\n\n- tasks: {report['tasks']} (first {report['limit']} items each); accuracy is the mean "
            f"of the tasks' primary metrics\n- energy from an assumed {report['watts']:g} W (a guess, not a measurement)\n"
            "- Pareto: the costs on which no other variant is both at least as accurate and cheaper\n")


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[matplotlib is not installed: no chart (pip install matplotlib)]", file=sys.stderr)
        return False
    ok = [r for r in report["variants"] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (cost, label, scale) in zip(axes, [("energy_per_token_j", "energy per token, scoring (J)", 1),
                                               ("decode_energy_per_token_j", "energy per token, decoding (J)", 1),
                                               ("weight_bytes", "weight bytes (MB)", 1e-6)]):
        pts = [r for r in ok if r.get(cost) is not None]
        for r in pts:
            ax.errorbar(r[cost] * scale, 100 * r["accuracy"], yerr=100 * r["accuracy_stderr"], fmt="o", capsize=3)
            ax.annotate(r["variant"], (r[cost] * scale, 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4))
        front = sorted((r[cost] * scale, 100 * r["accuracy"]) for r in pts if r["variant"] in report["pareto"][cost])
        if front:
            ax.plot(*zip(*front), "--o", color="gray", mfc="none", ms=14, label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
    missing = [r["variant"] for r in report["variants"] if r.get("status") != "ok"]
    fig.suptitle(f"{report['model']}: accuracy vs cost" + (f" ({', '.join(missing)} unavailable)" if missing else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def efficiency(model: str, cfg: EfficiencyConfig, tokenizer=None, device=None, threads=None) -> dict:
    """Run every variant in its own process; the report with derived costs and Pareto fronts."""
    from .benchmarks import EvalConfig
    variants = parse_variants(cfg.variants)
    EvalConfig(tasks=cfg.tasks, limit=cfg.limit, batch_tokens=cfg.batch_tokens).validate()
    if cfg.watts is not None and cfg.watts <= 0:
        raise LlamaforgeError(f"--watts must be > 0, got {cfg.watts}")
    import torch
    n_threads = threads or torch.get_num_threads()
    watts = cfg.watts or WATTS_PER_THREAD * n_threads
    rows = []
    for name in variants:
        spec = {"variant": name, "model": str(model), "tokenizer": tokenizer, "device": device, "threads": threads,
                "tasks": cfg.tasks, "limit": cfg.limit, "batch_tokens": cfg.batch_tokens,
                "decode_tokens": cfg.decode_tokens, "progress": cfg.progress}
        print(f"[efficiency: {name}]", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "llamaforge.evaluation.efficiency", json.dumps(spec)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            row = {"variant": name, "status": f"failed: the worker exited with code {proc.returncode} (see stderr above)"}
        if row.get("status") == "ok":
            row["energy_per_token_j"] = watts / row["eval_tokens_per_s"] if row["eval_tokens_per_s"] else None
            row["decode_energy_per_token_j"] = watts / row["decode_tokens_per_s"] if row["decode_tokens_per_s"] else None
        rows.append(row)
    return {"model": str(model), "tasks": cfg.tasks, "limit": cfg.limit, "watts": watts, "threads": n_threads,
            "variants": rows, "pareto": {cost: pareto(rows, cost) for cost in COSTS.values()},
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


if __name__ == "__main__":  # worker: one variant, JSON on the last stdout line
    try:
        row = run_variant(json.loads(sys.argv[1]))
    except LlamaforgeError as e:
        row = {"variant": json.loads(sys.argv[1])["variant"], "status": f"error: {e}"}
    print(json.dumps(row))
