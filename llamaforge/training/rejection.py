"""Rejection-sampling fine-tuning (Llama 2, section 3.2.3): the iterations before PPO.

    llamaforge rejection-sample --model M --reward rm/ --data prompts.jsonl --k 4 --out rs/

For each prompt, sample K answers from the current policy (`--model`; merge an adapter into it first
with `llamaforge merge` to continue from the last round), score each with the reward model, and keep
the best: the argmax of the reward ("the sample with the highest reward score is considered the new
gold standard"). Written to rs/samples.jsonl (every sample with its reward) and rs/best.jsonl (one
chat line per prompt: the prompt and its best answer); then, unless `--sample-only`, the policy is
fine-tuned on rs/best.jsonl (`finetune.finetune`, LoRA by default) with its adapter in rs/.
Prompt lines: `{"prompt": "..."}` or `{"prompt": [messages]}` (the DPO/reward prompt shape).
The report compares the mean reward of one sample with the mean of the best of K (Llama 2 figure 7).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlamaforgeError
from .finetune import FinetuneConfig, finetune
from .loop import _f
from .sft_data import read_jsonl


@dataclass
class RejectionConfig(FinetuneConfig):
    reward: str = _f("", "reward model directory (`llamaforge reward train` output)")
    k: int = _f(4, "samples per prompt")
    temperature: float = _f(0.8, "sampling temperature (Llama 2 raises it with each round)")
    top_p: float = _f(0.95, "nucleus sampling mass")
    max_new_tokens: int = _f(128, "most tokens per sampled answer")
    sample_only: bool = _f(False, "stop after writing samples.jsonl and best.jsonl (no fine-tuning)")


def read_prompts(path: str | Path) -> list[tuple[str, object]]:
    """-> [(file:line, prompt)], a prompt being a string or a list of messages ending with a user turn."""
    out = []
    for where, rec in read_jsonl(path):
        p = rec.get("prompt") if isinstance(rec, dict) else None
        ok = isinstance(p, str) and p.strip() or (isinstance(p, list) and p and isinstance(p[-1], dict)
                                                  and p[-1].get("role") == "user")
        if not ok:
            raise LlamaforgeError(f"{where}: a prompt line needs 'prompt': a non-empty string or a list of messages "
                                  "ending with a user turn")
        out.append((where, p))
    if not out:
        raise LlamaforgeError(f"{path}: no prompts")
    return out


def messages_of(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def pick_best(rewards: list[float]) -> int:
    """The index of the highest reward (the first of equals)."""
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


def sample_answers(llm, prompt, k: int, seed: int, **sampling) -> list[str]:
    """K answers to one prompt, each with its own seed (seed, seed + 1, ...) so a run is reproducible."""
    return [llm.chat(messages_of(prompt), seed=seed + j, **sampling) for j in range(k)]


def rejection_sample(rc: RejectionConfig) -> dict:
    """Sample, score, keep the best; then fine-tune on it unless `rc.sample_only`. -> the report."""
    from ..llm import load
    from .reward import load_reward_model, score
    if not rc.reward or not rc.data or not rc.out:
        raise LlamaforgeError("pass --reward (a reward model directory), --data (prompts JSONL) and --out")
    if rc.k < 1 or rc.max_new_tokens < 1 or rc.temperature < 0:
        raise LlamaforgeError(f"need --k >= 1, --max-new-tokens >= 1 and --temperature >= 0; got {rc.k}, "
                              f"{rc.max_new_tokens}, {rc.temperature}")
    prompts = read_prompts(rc.data)
    out = Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)
    rm, rm_llm = load_reward_model(rc.reward)
    policy = load(rc.model, chat_format=rc.chat_format)
    sampling = dict(temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens)
    t0, rows = time.perf_counter(), []
    for n, (where, prompt) in enumerate(prompts, 1):
        answers = sample_answers(policy, prompt, rc.k, rc.seed * 1_000_003 + n * rc.k, **sampling)
        rewards = score(rm, rm_llm, prompt, answers)
        best = pick_best(rewards)
        rows.append({"where": where, "prompt": prompt, "samples": [{"text": a, "reward": r} for a, r in zip(answers, rewards)],
                     "best": best})
        el = time.perf_counter() - t0
        print(f"\r[rejection sampling: {n}/{len(prompts)} prompts, {rc.k} samples each, {el:.0f}s, "
              f"ETA {el / n * (len(prompts) - n):.0f}s]", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    del policy
    with open(out / "samples.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with open(out / "best.jsonl", "w") as fh:
        fh.writelines(json.dumps({"messages": messages_of(r["prompt"]) + [
            {"role": "assistant", "content": r["samples"][r["best"]]["text"]}]}) + "\n" for r in rows)
    first = [r["samples"][0]["reward"] for r in rows]
    top = [r["samples"][r["best"]]["reward"] for r in rows]
    report = {"command": "rejection-sample", "prompts": len(rows), "k": rc.k, "sampling": sampling,
              "mean_reward_one_sample": sum(first) / len(first), "mean_reward_best_of_k": sum(top) / len(top),
              "sampling_s": time.perf_counter() - t0}
    print(f"{len(rows)} prompts x {rc.k} samples: mean reward {report['mean_reward_one_sample']:.3f} for one sample, "
          f"{report['mean_reward_best_of_k']:.3f} for the best of {rc.k}; wrote {out / 'best.jsonl'}", file=sys.stderr)
    if not rc.sample_only:
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        fc = FinetuneConfig(**{k: v for k, v in dataclasses.asdict(rc).items() if k in names})
        report["finetune"] = finetune(dataclasses.replace(fc, data=str(out / "best.jsonl"), val=""))
    (out / "rejection_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
