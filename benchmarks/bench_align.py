"""The Llama 2-Chat recipe demo on SmolLM2-135M-Instruct (CPU, LoRA): Ghost Attention, reward model, rejection sampling.

1. GAtt: held-out 5-turn dialogs, the instruction in the first user turn only, each turn answered
   greedily by the model from its own earlier answers; the share of answers that keep the
   instruction at each turn, before and after LoRA fine-tuning on `llamaforge gatt` data.
2. Reward model: `reward train` (LoRA + head) on synthetic preference pairs, pair accuracy on
   held-out questions before and after, per kind of rejected answer.
3. Rejection sampling: K samples per held-out prompt from the base policy, scored by that reward
   model: mean reward of one sample against the best of K (`rejection-sample --sample-only`).
Data: benchmarks/align_data.py (synthetic, offline). Writes results.json and results.md.

    python benchmarks/bench_align.py --out benchmarks/results/align [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from align_data import follows, write_dataset  # noqa: E402


def converse(llm, instruction: str, questions: list[str], max_new_tokens: int = 40) -> list[str]:
    msgs, replies = [], []
    for i, q in enumerate(questions):
        msgs.append({"role": "user", "content": f"{instruction}\n\n{q}" if i == 0 else q})
        r = llm.chat(msgs, max_new_tokens=max_new_tokens).strip()
        msgs.append({"role": "assistant", "content": r})
        replies.append(r)
    return replies


def gatt_eval(llm, heldout: list[dict], label: str) -> dict:
    t0, rows = time.perf_counter(), []
    for n, d in enumerate(heldout, 1):
        replies = converse(llm, d["instruction"], d["questions"])
        rows.append({"kind": d["kind"], "replies": replies, "follows": [follows(d["kind"], r) for r in replies]})
        print(f"\r[{label}: {n}/{len(heldout)} dialogs, {time.perf_counter() - t0:.0f}s]", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    turns = len(rows[0]["follows"])
    per_turn = [sum(r["follows"][t] for r in rows) / len(rows) for t in range(turns)]
    kinds = sorted({r["kind"] for r in rows})
    by_kind = {k: [sum(r["follows"][t] for r in rows if r["kind"] == k) / sum(r["kind"] == k for r in rows)
                   for t in range(turns)] for k in kinds}
    return {"per_turn": per_turn, "by_kind": by_kind, "dialogs": rows, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/align")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--gatt-max-steps", type=int, default=0, help="stop GAtt fine-tuning after N steps (0: --epochs)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: gatt, reward, rs")
    args = ap.parse_args()
    import torch

    import llamaforge
    from llamaforge.commands import main as cli
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    res = {"data": write_dataset(data), "threads": args.threads, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    skip = set(args.skip.split(","))
    th = ["--threads", str(args.threads)]
    if "gatt" not in skip:
        heldout = [json.loads(line) for line in (data / "gatt" / "heldout.jsonl").read_text().splitlines()]
        res["gatt_before"] = gatt_eval(llamaforge.load(), heldout, "base model")
        assert cli(["gatt", "--data", str(data / "gatt" / "train.jsonl"), "--out", str(data / "gatt" / "sft.jsonl")] + th) == 0
        ft = out / "ft_gatt"
        t0 = time.perf_counter()
        assert cli(["finetune", "--data", str(data / "gatt" / "sft.jsonl"), "--out", str(ft), "--method", "lora", "--lr", "1e-3",
                    "--epochs", str(args.epochs), "--max-steps", str(args.gatt_max_steps), "--batch-size", "8", "--micro-batch-size", "8", "--eval-every", "0",
                    "--ckpt-every", "100000"] + th) == 0
        res["gatt_finetune"] = {**json.loads((ft / "report.json").read_text()), "call_s": time.perf_counter() - t0}
        res["gatt_after"] = gatt_eval(llamaforge.load(adapter=ft), heldout, "after GAtt")
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    if "reward" not in skip:
        rm = out / "rm"
        t0 = time.perf_counter()
        assert cli(["reward", "train", "--data", str(data / "prefs" / "train.jsonl"), "--val", str(data / "prefs" / "val.jsonl"),
                    "--out", str(rm), "--method", "lora", "--lr", "5e-4", "--epochs", "2", "--batch-size", "8",
                    "--micro-batch-size", "8", "--eval-every", "0", "--ckpt-every", "100000"] + th) == 0
        rep = json.loads((rm / "report.json").read_text())
        from llamaforge.training.reward import load_reward_model, score
        model, llm = load_reward_model(rm)
        val = [json.loads(line) for line in (data / "prefs" / "val.jsonl").read_text().splitlines()]
        by_kind = {}
        for p in val:
            c, r = score(model, llm, p["prompt"], [p["chosen"], p["rejected"]])
            by_kind.setdefault(p["kind"], []).append(c > r)
        res["reward"] = {**rep, "call_s": time.perf_counter() - t0,
                         "val_accuracy_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()}}
        del model, llm
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        if "rs" not in skip:
            t0 = time.perf_counter()
            assert cli(["rejection-sample", "--reward", str(rm), "--data", str(data / "prompts.jsonl"), "--out", str(out / "rs"),
                        "--k", "4", "--max-new-tokens", "32", "--sample-only"] + th) == 0
            res["rejection"] = {**json.loads((out / "rs" / "rejection_report.json").read_text()),
                                "call_s": time.perf_counter() - t0}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k in ("rejection",)}, indent=1))
    for k in ("gatt_before", "gatt_after"):
        if k in res:
            print(k, [f"{100 * x:.0f}%" for x in res[k]["per_turn"]], {kk: v for kk, v in res[k]["by_kind"].items()})
    if "reward" in res:
        print("reward", res["reward"]["val_before"], res["reward"]["val_after"], res["reward"]["val_accuracy_by_kind"])


if __name__ == "__main__":
    main()
