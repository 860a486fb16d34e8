"""Ghost Attention (GAtt, Llama 2 section 3.3): training data that keeps a first-turn instruction alive.

    llamaforge gatt --data dialogs.jsonl --instruction "Always answer as a pirate." --out gatt.jsonl [--model M]
    llamaforge finetune --data gatt.jsonl --out ft/

A dialog line is a multi-turn chat, `{"messages": [user, assistant, user, assistant, ...]}` (an optional
leading system message), with an optional `"instruction"` of its own (else `--instruction`). As the
paper describes:
1. sampling: the instruction is attached to *every* user turn (`sampling_messages`) and the model
   answers turn by turn from that context (`--model`: Llama 2 samples its latest RLHF model). Without
   `--model` the dialog's own assistant turns are kept: they must already follow the instruction
   (written for it, or sampled and filtered elsewhere).
2. training: the instruction stays in the first user turn only; every earlier assistant turn is
   context with no loss (`"weight": 0`, OpenAI's fine-tuning field, which sft_data honours), so the
   model learns the last turn's answer from a context in which the instruction is far behind.
   `--turns all` (default) writes one example per assistant turn k, the dialog cut after turn k, so
   every depth is trained; `--turns last` one per dialog, as the paper's wording.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import LlamaforgeError
from .sft_data import read_jsonl

SEPARATOR = "\n\n"  # between the instruction and the user's own text


def attach(instruction: str, content: str) -> str:
    return f"{instruction}{SEPARATOR}{content}"


def split_dialog(messages) -> tuple[list[dict], list[tuple[str, str | None]]]:
    """-> (leading system messages, [(user, assistant or None)]) of a well-formed dialog, or ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"bad message {m!r:.60}: each needs role system/user/assistant and a string content")
    system = [m for m in messages if m["role"] == "system"]
    rest = messages[len(system):]
    if any(m["role"] == "system" for m in rest):
        raise ValueError("system messages must come first")
    roles = [m["role"] for m in rest]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise ValueError(f"turns must alternate user, assistant, user, ...; got {roles}")
    turns = [(rest[i]["content"], rest[i + 1]["content"] if i + 1 < len(rest) else None) for i in range(0, len(rest), 2)]
    return [dict(m) for m in system], turns


def sampling_messages(system: list[dict], turns: list[tuple[str, str | None]], instruction: str, upto: int) -> list[dict]:
    """The context in which turn `upto` (0-based) is sampled: the instruction attached to every user
    turn 0..upto, the earlier answers as given."""
    msgs = list(system)
    for i, (user, answer) in enumerate(turns[:upto + 1]):
        msgs.append({"role": "user", "content": attach(instruction, user)})
        if i < upto:
            msgs.append({"role": "assistant", "content": answer})
    return msgs


def training_example(system: list[dict], turns: list[tuple[str, str]], instruction: str, upto: int) -> dict:
    """The dialog cut after turn `upto`: the instruction in the first user turn only, earlier answers with
    weight 0 (no loss), the last answer trained."""
    msgs = list(system)
    for i, (user, answer) in enumerate(turns[:upto + 1]):
        msgs.append({"role": "user", "content": attach(instruction, user) if i == 0 else user})
        msgs.append({"role": "assistant", "content": answer, **({"weight": 0} if i < upto else {})})
    return {"messages": msgs}


def gatt_examples(system, turns, instruction: str, which: str = "all") -> list[dict]:
    if which not in ("all", "last"):
        raise LlamaforgeError(f"--turns must be all or last, got {which!r}")
    depths = range(len(turns)) if which == "all" else [len(turns) - 1]
    return [training_example(system, turns, instruction, k) for k in depths]


def resample(llm, system, turns, instruction: str, **sampling) -> list[tuple[str, str]]:
    """The dialog's answers sampled from `llm`, turn by turn, with the instruction on every user turn."""
    out = []
    for k, (user, _) in enumerate(turns):
        reply = llm.chat(sampling_messages(system, out + [(user, None)], instruction, k), **sampling)
        out.append((user, reply.strip()))
    return out


def build(data: str | Path, out: str | Path, instruction: str = "", which: str = "all", llm=None, **sampling) -> dict:
    """Read dialog lines, (optionally) sample their answers with the instruction on every turn, write GAtt
    SFT lines to `out`. -> counts. A bad line is reported as file:line."""
    rows, t0 = read_jsonl(data), time.perf_counter()
    examples, n = [], 0
    for where, rec in rows:
        try:
            if isinstance(rec, ValueError):
                raise rec
            if not isinstance(rec, dict) or "messages" not in rec:
                raise ValueError("a dialog line needs 'messages'")
            ins = rec.get("instruction", instruction)
            if not isinstance(ins, str) or not ins.strip():
                raise ValueError("no instruction: give the line an 'instruction' or pass --instruction")
            system, turns = split_dialog(rec["messages"])
            if llm is not None:
                turns = resample(llm, system, turns, ins, **sampling)
            elif any(a is None for _, a in turns):
                raise ValueError("the last user turn has no answer: pass --model to sample the answers")
        except ValueError as e:
            raise LlamaforgeError(f"{where}: {e} (nothing was written)") from None
        examples += gatt_examples(system, turns, ins, which)
        n += 1
        if llm is not None:
            print(f"\r[gatt: sampled {n}/{len(rows)} dialogs, {time.perf_counter() - t0:.0f}s]", end="", file=sys.stderr, flush=True)
    if llm is not None:
        print(file=sys.stderr)
    if not examples:
        raise LlamaforgeError(f"{data}: no dialogs")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in examples))
    tmp.replace(out)
    return {"dialogs": n, "examples": len(examples), "sampled": llm is not None}
