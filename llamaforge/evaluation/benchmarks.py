"""The LLaMA paper's benchmarks (Touvron et al. 2023, section 3) on any model we load.

Protocol. Multiple choice: each choice is a continuation of the context; the prediction is the
choice with the highest log-likelihood normalized by its length in characters (`acc_char`, Gao et
al. 2021), and for OpenBookQA, BoolQ (the paper) and ARC (reported too) also the likelihood
normalized by the likelihood of the choice after "Answer:" alone (`acc_uncond`, Brown et al.
2020); `acc` is the raw log-likelihood. MMLU is 5-shot and scores the answer letter. TriviaQA
and NaturalQuestions generate greedily and count an exact match after SQuAD normalization.
Accuracy is reported with its standard error, sqrt(p (1 - p) / (n - 1)).

Speed comes from `scoring.py`: each item's shared context is run once for all its choices
(prefix-tree rows), many items per forward pass, and MMLU's 5-shot header once per subject.

Output: results.json (per task: metrics, stderr, n, skipped, time, tokens/s), results.md (the
table, with the LLaMA-7B row of Table 3 and the model's published figures when known) and
results.png; per-item log-likelihoods in samples_<task>.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlamaforgeError
from .tasks import (LLAMA_TASKS, TASKS, UNCOND_CONTEXT, Doc, Task, build_context, check_data, cut_answer, exact_match,
                    fewshot_pool, gen_prompt, load_docs, parse_tasks)

# LLaMA-7B, Table 3 (zero-shot common sense), Table 9 (MMLU 5-shot), Tables 4-5 (NQ, TriviaQA by shots).
LLAMA_7B = {"boolq": 76.5, "piqa": 79.8, "siqa": 48.9, "hellaswag": 76.1, "winogrande": 70.1, "arc_easy": 72.8,
            "arc_challenge": 47.6, "openbookqa": 57.2, "mmlu": 35.1,
            "triviaqa": {"0": 50.0, "1": 53.4, "5": 56.3, "64": 57.6}, "nq_open": {"0": 16.8, "1": 18.7, "5": 22.0, "64": 26.1}}
# Published figures of known models (their model cards; lighteval prompts, which differ from ours).
# "arc_avg" is the mean of ARC-e and ARC-c; "mmlu_cloze" scores the answer text, not the letter.
PUBLISHED = {
    "smollm2-135m-instruct": {"hellaswag": 40.9, "piqa": 66.3, "arc_avg": 37.3, "mmlu_cloze": 29.3},
    "smollm2-135m": {"hellaswag": 42.1, "piqa": 68.4, "winogrande": 51.3, "openbookqa": 34.6, "triviaqa": 4.1,
                     "arc_avg": 43.9, "mmlu_cloze": 31.5},
}


@dataclass
class EvalConfig:
    tasks: str = ",".join(LLAMA_TASKS)
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int | None = None
    batch_tokens: int = 4096
    max_new_tokens: int = 32
    output: str = "eval-results"
    seed: int = 1234
    progress: bool = True

    def validate(self) -> list[Task]:
        checks = [
            (self.limit is None or self.limit > 0, f"--limit must be a positive number of items, got {self.limit}"),
            (self.num_fewshot is None or self.num_fewshot >= 0, f"--num-fewshot must be >= 0, got {self.num_fewshot}"),
            (self.batch_size is None or self.batch_size > 0, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.batch_tokens >= 64, f"--batch-tokens must be >= 64, got {self.batch_tokens}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LlamaforgeError(msg)
        tasks = parse_tasks(self.tasks)
        for t in tasks:
            check_data(t)
        return tasks


HELP = {
    "tasks": f"comma-separated tasks (default: the paper's eight); known: {', '.join(TASKS)}",
    "limit": "first N items of each task (MMLU: N in all, spread over its subjects; default: all)",
    "num_fewshot": "examples before each item (default: the paper's, 5 for MMLU and 0 otherwise)",
    "batch_size": "most items per forward pass (default: as many as --batch-tokens allows)",
    "batch_tokens": "most padded tokens per forward pass",
    "max_new_tokens": "longest generated answer (TriviaQA, NaturalQuestions)",
    "output": "folder for results.json, results.md, results.png and per-item samples",
    "seed": "seed for drawing few-shot examples",
    "progress": "show a progress bar",
}


# ---- requests ----

def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], int]:
    """lm-evaluation-harness's split: encode context + continuation whole, take the context's token count
    from encoding it alone; trailing spaces of the context move to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    if not ctx:  # an empty context still needs a token to predict from
        ctx = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
        whole = ctx + whole
    return ctx + whole[len(ctx):], len(ctx)


class Progress:
    """tqdm when installed, else a plain counter on stderr; also counts the tokens run."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.bar = None
        self.total, self.n, self.tokens, self.desc, self.enabled = total, 0, 0, desc, enabled
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int, tokens: int = 0) -> None:
        self.n += n
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def stderr_of(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def _fewshot(task: Task, cfg: EvalConfig) -> int:
    return task.fewshot if cfg.num_fewshot is None else cfg.num_fewshot


def encode_items(task: Task, docs: list[Doc], cfg: EvalConfig, encode, fits) -> tuple[list[tuple], int]:
    """[(doc index, doc, encode(doc, few-shot context))] for the docs whose encoding `fits`, and how many
    did not; few-shot examples are drawn with the config's seed."""
    k = _fewshot(task, cfg)
    pool, rng = (fewshot_pool(task) if k else {}), random.Random(cfg.seed)
    items, skipped = [], 0
    for i, doc in enumerate(docs):
        enc = encode(doc, build_context(task, doc, k, pool, rng))
        if fits(enc):
            items.append((i, doc, enc))
        else:
            skipped += 1
    return items, skipped


# ---- multiple choice ----

def run_mc(llm, task: Task, docs: list[Doc], cfg: EvalConfig) -> tuple[dict, list[dict]]:
    from .scoring import Request, score_groups
    tok, ctx_len = llm.tokenizer, llm.config.max_seq_len
    items, skipped = encode_items(task, docs, cfg, lambda doc, pre: [Request(*encode_pair(tok, pre + c, x)) for c, x in doc.pairs],
                                  lambda reqs: max(len(r.tokens) for r in reqs) <= ctx_len)
    uncond: dict[tuple[str, ...], list] = {}
    if "acc_uncond" in task.metrics:
        for _, doc, _ in items:
            key = tuple(x for _, x in doc.pairs)
            uncond.setdefault(key, [Request(*encode_pair(tok, UNCOND_CONTEXT, x)) for x in key])
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(it[1].group, []).append(it)
    bar = Progress(len(items), task.name, cfg.progress)  # items, each with all of its choices
    scores = {}
    for group in groups.values():  # MMLU: one call per subject, so its 5-shot prefix is shared
        out = score_groups(llm.model, [r for _, _, r in group], cfg.batch_tokens, cfg.batch_size, bar.update)
        scores.update({i: s for (i, _, _), s in zip(group, out)})
    bar.close()
    keys = list(uncond)
    base = {}
    if keys:  # the answers alone, once per distinct set (acc_uncond's denominators)
        ubar = Progress(len(keys), f"{task.name} answers alone", cfg.progress)
        base = dict(zip(keys, score_groups(llm.model, [uncond[k] for k in keys], cfg.batch_tokens, cfg.batch_size, ubar.update)))
        ubar.close()
        bar.tokens += ubar.tokens
    samples, hits = [], {m: 0 for m in task.metrics}
    for i, doc, _ in items:
        s = scores[i]
        ll = [x.logprob for x in s]
        pred = {"acc": _argmax(ll)}
        if "acc_char" in task.metrics:
            pred["acc_char"] = _argmax([l / max(c, 1) for l, c in zip(ll, doc.norm_chars)])
        if "acc_uncond" in task.metrics:
            b = base[tuple(x for _, x in doc.pairs)]
            pred["acc_uncond"] = _argmax([l - u.logprob for l, u in zip(ll, b)])
        for m in task.metrics:
            hits[m] += pred[m] == doc.gold
        samples.append({"doc": i, "gold": doc.gold, "loglikelihoods": ll, "n_tokens": [x.n_tokens for x in s],
                        "greedy": [x.greedy for x in s], **{f"pred_{m}": pred[m] for m in task.metrics}})
    n = len(items)
    res = {m: hits[m] / n if n else float("nan") for m in task.metrics}
    res.update({f"{m}_stderr": stderr_of(res[m], n) for m in task.metrics})
    res.update(n=n, skipped=skipped, tokens=bar.tokens, scored_tokens=sum(sum(s["n_tokens"]) for s in samples))
    return res, samples


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


# ---- generation ----

def run_gen(llm, task: Task, docs: list[Doc], cfg: EvalConfig) -> tuple[dict, list[dict]]:
    from .scoring import generate_greedy
    tok, ctx_len = llm.tokenizer, llm.config.max_seq_len
    items, skipped = encode_items(task, docs, cfg, lambda doc, pre: tok.encode(gen_prompt(doc, pre)),
                                  lambda ids: len(ids) + cfg.max_new_tokens <= ctx_len)
    stop_ids = set(tok.stop_ids)

    def is_done(new: list[int]) -> bool:
        if new[-1] in stop_ids:
            return True
        text = tok.decode(new)
        return any(s in text for s in ("\n", ".", ","))

    bar = Progress(len(items), task.name, cfg.progress)
    outs = generate_greedy(llm.model, [ids for _, _, ids in items], cfg.max_new_tokens, is_done, cfg.batch_tokens,
                           cfg.batch_size or 64, bar.update)
    bar.close()
    samples, hits = [], 0
    for (i, doc, _), new in zip(items, outs):
        text = tok.decode([t for t in new if t not in stop_ids])
        answer = cut_answer(text)
        ok = exact_match(answer, doc.answers)
        hits += ok
        samples.append({"doc": i, "question": doc.question, "generated": text, "answer": answer, "gold": doc.answers, "em": ok})
    n = len(items)
    res = {"em": hits / n if n else float("nan")}
    res.update(em_stderr=stderr_of(res["em"], n), n=n, skipped=skipped, tokens=bar.tokens,
               scored_tokens=sum(len(o) for o in outs))
    return res, samples


# ---- the whole run ----

def evaluate(llm, cfg: EvalConfig, model_id: str = "") -> dict:
    """Run every task of `cfg` on a loaded `LLM`; returns the results dict written to results.json."""
    tasks = cfg.validate()
    if llm.tokenizer is None:
        raise LlamaforgeError("evaluation needs the model's tokenizer: pass --tokenizer tokenizer.json|tokenizer.model")
    results = {}
    for task in tasks:
        t0 = time.perf_counter()
        docs, total = load_docs(task, cfg.limit)
        res, samples = (run_mc if task.kind == "mc" else run_gen)(llm, task, docs, cfg)
        dt = time.perf_counter() - t0
        res.update(task=task.name, title=task.title, primary=task.primary, fewshot=_fewshot(task, cfg),
                   total_docs=total, limited=len(docs) < total, time_s=round(dt, 2),
                   tokens_per_s=res["tokens"] / dt, scored_tokens_per_s=res["scored_tokens"] / dt, note=task.note)
        results[task.name] = res
        if res["skipped"]:
            print(f"[{task.name}: {res['skipped']} of {len(docs)} items are longer than the model's context "
                  f"({llm.config.max_seq_len} tokens) and were skipped]", file=sys.stderr)
        if cfg.output:
            out = Path(cfg.output)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"samples_{task.name}.jsonl", "w") as fh:
                for s in samples:
                    fh.write(json.dumps(s) + "\n")
    key = reference_key(model_id)
    return {"model": model_id, "config": dataclasses.asdict(cfg), "n_params": llm.config.n_params,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results,
            "references": {"LLaMA-7B (paper)": LLAMA_7B, **({f"{key} (published)": PUBLISHED[key]} if key else {})}}


def reference_key(model_id: str) -> str | None:
    """The PUBLISHED entry for a model given by name or by the path of its packaged file."""
    if model_id in PUBLISHED:
        return model_id
    try:
        from ..llm import PACKAGED, resolve
        path = resolve(model_id)[1].resolve() if model_id else None
        return next((n for n in PACKAGED if n in PUBLISHED and resolve(n)[1].resolve() == path), None)
    except LlamaforgeError:
        return None


# ---- reports ----

def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def reference(ref: dict, task: str, shots: int) -> float | None:
    """A published figure for `task`, or for that number of shots when the source gives several."""
    v = ref.get(task)
    return v.get(str(shots)) if isinstance(v, dict) else v


def _ref(ref: dict, task: str, shots: int) -> str:
    v = reference(ref, task, shots)
    return "" if v is None else f"{v:.1f}"


def markdown_table(report: dict) -> str:
    refs = report["references"]
    metrics = [m for m in ("acc", "acc_char", "acc_uncond", "em") if any(m in r for r in report["results"].values())]
    head = ["Task", "n", "shots", "primary", *metrics, *refs, "time (s)", "tok/s", "skipped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["results"].items():
        p = r["primary"]
        cells = [r["title"], f"{r['n']}" + (f" of {r['total_docs']} (--limit)" if r["limited"] else ""), str(r["fewshot"]),
                 f"**{_pct(r[p])} ± {_pct(r[p + '_stderr'])}** ({p})"]
        cells += [f"{_pct(r[m])} ± {_pct(r[m + '_stderr'])}" if m in r else "" for m in metrics]
        cells += [_ref(v, name, r["fewshot"]) for v in refs.values()]
        cells += [f"{r['time_s']:.0f}", f"{r['tokens_per_s']:.0f}", str(r["skipped"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['title']}: {r['note']}" for r in report["results"].values() if r["note"]]
    res = report["results"]
    for label, ref in refs.items():
        if "arc_avg" in ref and {"arc_easy", "arc_challenge"} <= set(res):
            ours = (res["arc_easy"]["acc_char"] + res["arc_challenge"]["acc_char"]) / 2
            notes.append(f"- ARC, mean of ARC-e and ARC-c acc_char: {_pct(ours)}; {label}: {ref['arc_avg']:.1f}")
        if "mmlu_cloze" in ref and "mmlu" in res:
            notes.append(f"- MMLU: {label} is {ref['mmlu_cloze']:.1f} for the cloze variant (answer text scored), "
                         "not comparable with the letter format used here")
    if any(k.endswith("(published)") for k in refs):
        notes.append("- published figures: the model card's (lighteval prompts and normalization, which differ from ours)")
    notes.append("- tok/s: tokens run through the model per second (shared contexts counted once)")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot(report: dict, path: str | Path) -> bool:
    """Bar chart of each task's primary metric with its standard error, reference rows as markers."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[matplotlib is not installed: no chart (pip install matplotlib)]", file=sys.stderr)
        return False
    res = report["results"]
    names = list(res)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4.2))
    x = range(len(names))
    ax.bar(x, [100 * res[n][res[n]["primary"]] for n in names], yerr=[100 * res[n][res[n]["primary"] + "_stderr"] for n in names],
           color="#4C72B0", capsize=3, label=report["model"] or "model")
    for (label, ref), marker in zip(report["references"].items(), ("D", "o", "s")):
        pts = [(i, reference(ref, n, res[n]["fewshot"])) for i, n in enumerate(names)]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, zorder=3, label=label)
    ax.set_xticks(list(x), [res[n]["title"] for n in names], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("llamaforge eval (LLaMA-paper protocol)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict, folder: str | Path) -> list[Path]:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(report))
    files = [out / "results.json", out / "results.md"]
    if plot(report, out / "results.png"):
        files.append(out / "results.png")
    return files
