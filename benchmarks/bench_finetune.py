"""Fine-tuning demo and benchmark: teach SmolLM2-135M-Instruct a private handbook on this CPU.

The data is `handbook.py`'s 60 facts about a company that does not exist: 180 training questions
in chat format, and 60 held-out paraphrases never seen in training. Held-out answer accuracy (the
fact's key in the greedy reply) is measured before fine-tuning and after each of full fine-tuning,
LoRA and QLoRA, all run through `llamaforge.training.finetune` with the same data, epochs and batch; each
run is its own process, so its peak RSS is its own. Reported per method: trainable parameters,
peak RSS (of the training process, model load included), tokens/s, wall time, final validation
loss (on the held-out paraphrases), accuracy. Writes results.json, results.md and results.png to --out.

    python benchmarks/bench_finetune.py                      # full, LoRA and QLoRA
    python benchmarks/bench_finetune.py --methods lora --epochs 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import handbook  # noqa: E402

LR = {"full": 1e-4, "lora": 1e-3, "qlora": 1e-3}


def answer_heldout(llm, path: Path, max_new_tokens: int) -> dict:
    """Greedy replies to the held-out questions; accuracy = replies that contain the fact's key."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out, t0 = [], time.perf_counter()
    for i, r in enumerate(rows):
        reply = llm.chat([{"role": "user", "content": r["question"]}], temperature=0.0, max_new_tokens=max_new_tokens)
        out.append({"question": r["question"], "reply": reply.strip(), "keys": r["keys"], "correct": handbook.is_correct(reply, tuple(r["keys"]))})
        print(f"\r  answering held-out questions: {i + 1}/{len(rows)}, {sum(o['correct'] for o in out)} correct", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {"accuracy": sum(o["correct"] for o in out) / len(out), "n": len(out), "eval_s": time.perf_counter() - t0,
            "answers": out}


def child_eval(args) -> dict:
    import llamaforge
    llm = llamaforge.load(args.model)  # as `llamaforge chat` loads it: GGUF blocks kept quantized
    return {"method": "base", **answer_heldout(llm, Path(args.work) / "data" / "heldout.jsonl", args.max_new_tokens)}


def child_train(args) -> dict:
    import llamaforge
    from llamaforge.training.finetune import FinetuneConfig, finetune
    data, run = Path(args.work) / "data", Path(args.work) / "runs" / args.method
    fc = FinetuneConfig(model=args.model, data=str(data / "train.jsonl"), val=str(data / "val.jsonl"), out=str(run),
                        method=args.method, rank=args.rank, alpha=2.0 * args.rank, lora_dropout=0.0, targets="all",
                        batch_size=args.batch_size, micro_batch_size=args.batch_size, epochs=args.epochs,
                        lr=LR[args.method], warmup_steps=10, eval_every=args.eval_every, log_every=5,
                        ckpt_every=10_000, keep_checkpoints=1, packing=args.packing, seed=0)
    if run.exists():
        import shutil
        shutil.rmtree(run)
    report = finetune(fc)
    # answer with what a user gets: `llamaforge chat --adapter run/` (LoRA, QLoRA) or `--model run/` (full)
    llm = llamaforge.load(run) if args.method == "full" else llamaforge.load(args.model, adapter=run)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {"method": args.method, "report": report, "log": log,
            **answer_heldout(llm, data / "heldout.jsonl", args.max_new_tokens)}


def run_child(args, kind: str, method: str = "") -> dict:
    out = Path(args.work) / f"{kind}_{method or 'base'}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--method", method or "lora", "--result", str(out)]
    for k in ("model", "work", "epochs", "batch_size", "rank", "threads", "max_new_tokens", "eval_every"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--packing"] if args.packing else []
    print(f"== {kind} {method}".rstrip(), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def table(results: dict) -> str:
    base = results["base"]
    lines = ["| method | trainable params | peak RSS | tokens/s | wall time | final val loss | held-out accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| base model (no fine-tuning) | - | - | - | - | - | {base['accuracy']:.0%} ({sum(a['correct'] for a in base['answers'])}/{base['n']}) |"]
    for m in ("full", "lora", "qlora"):
        if m not in results:
            continue
        r, rep = results[m], results[m]["report"]
        name = {"full": "full fine-tuning", "lora": "LoRA (fp32 base)", "qlora": "QLoRA (int4 base)"}[m]
        lines.append(f"| {name} | {rep['trainable_params'] / 1e6:.2f}M | {rep['peak_rss_mb'] / 1024:.2f} GB | "
                     f"{rep['tokens_per_s']:,.0f} | {rep['wall_s'] / 60:.1f} min | {rep['final_val_loss']:.3f} | "
                     f"{r['accuracy']:.0%} ({sum(a['correct'] for a in r['answers'])}/{r['n']}) |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"full": "C0", "lora": "C1", "qlora": "C2"}
    for m in ("full", "lora", "qlora"):
        if m not in results:
            continue
        log = results[m]["log"]
        tr = [(r["step"], r["loss"]) for r in log if "loss" in r]
        va = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
        ax.plot(*zip(*tr), lw=0.8, color=colors[m], alpha=0.6, label=f"{m} train")
        if va:
            ax.plot(*zip(*va), "o--", color=colors[m], label=f"{m} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on answer tokens (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = ["base"] + [m for m in ("full", "lora", "qlora") if m in results]
    accs = [100 * results[m]["accuracy"] for m in names]
    bars = bx.bar(names, accs, color=["gray"] + [colors[m] for m in names[1:]])
    bx.bar_label(bars, fmt="%.0f%%")
    bx.set_ylim(0, 100)
    bx.set_ylabel("held-out accuracy (%)")
    bx.set_title("60 paraphrased questions about a fictional handbook")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="lora,qlora,full")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--epochs", type=float, default=6.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--max-new-tokens", type=int, default=40)
    # 1 thread: on a 2-core machine shared with other work, 2 OpenMP threads measured 15x slower (11 vs 164 tok/s)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/llamaforge-finetune-bench", help="data, runs (adapters, checkpoints)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune"))
    p.add_argument("--child", choices=["eval", "train"], help=argparse.SUPPRESS)
    p.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch
        torch.set_num_threads(args.threads)
        res = child_eval(args) if args.child == "eval" else child_train(args)
        Path(args.result).write_text(json.dumps(res, indent=1) + "\n")
        return
    handbook.write_dataset(Path(args.work) / "data")
    load0 = os.getloadavg()[0]
    results = {"base": run_child(args, "eval")}
    for m in args.methods.split(","):
        results[m] = run_child(args, "train", m)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "rank": args.rank,
            "alpha": 2.0 * args.rank, "lr": {m: LR[m] for m in args.methods.split(",")}, "packing": args.packing,
            "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_avg_before": load0, "load_avg_after": os.getloadavg()[0],
            "facts": len(handbook.FACTS), "train_examples": 3 * len(handbook.FACTS), "heldout_questions": len(handbook.FACTS)}
    (out / "results.json").write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")
    md = table(results)
    (out / "results.md").write_text(f"SmolLM2-135M-Instruct on {meta['machine']} ({args.threads} thread{'s' if args.threads > 1 else ''}), "
                                    f"{args.epochs:g} epochs of 180 chat examples, batch {args.batch_size}; "
                                    f"load average {load0:.1f} before, {meta['load_avg_after']:.1f} after.\n\n{md}\n")
    plot(results, out / "results.png")
    print(md)


if __name__ == "__main__":
    main()
