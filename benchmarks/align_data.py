"""Synthetic chat data for the Llama 2-Chat recipe demo (reward model, rejection sampling, Ghost Attention).

No preference or multi-turn chat data ships offline, so this writes small sets from templates,
deterministically (seeded), as benchmarks/handbook.py does for facts:
  qa: ~200 one-line questions with a one-sentence answer (arithmetic, capitals, animals, colours,
      opposites), split into training and held-out questions.
  gatt/train.jsonl    dialogs of 5 user turns, each with an instruction from INSTRUCTIONS and answers
                      that follow it on every turn: what sampling with the instruction attached to
                      every user turn yields from a model that obeys it (Llama 2 samples its RLHF
                      model; here a rule writes the answer), input to `llamaforge gatt`
  gatt/heldout.jsonl  held-out dialogs (questions only) with their instruction, for the turn-5 test
  prefs/train.jsonl, prefs/val.jsonl   prompt/chosen/rejected pairs: the chosen answer is the right
                      sentence, the rejected one a rude refusal, the answer to another question, or a
                      wrong number; val uses held-out questions only
  prompts.jsonl       held-out prompts for rejection sampling

    python benchmarks/align_data.py --out data/align
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo", "Kenya": "Nairobi",
            "Canada": "Ottawa", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "Germany": "Berlin",
            "Portugal": "Lisbon", "Russia": "Moscow", "China": "Beijing", "Ireland": "Dublin", "Austria": "Vienna",
            "Poland": "Warsaw", "Cuba": "Havana", "Chile": "Santiago", "Sweden": "Stockholm"}
LEGS = {"spider": 8, "dog": 4, "bird": 2, "ant": 6, "horse": 4, "chicken": 2, "beetle": 6, "cat": 4, "octopus": 8, "duck": 2}
COLOURS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow", "a tomato": "red",
           "an orange": "orange", "chocolate": "brown", "a lemon": "yellow", "a carrot": "orange"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late", "old": "new",
             "up": "down", "full": "empty", "hard": "soft", "loud": "quiet", "wet": "dry"}

# (instruction, rule that rewrites a plain answer to follow it, check that a reply follows it)
INSTRUCTIONS = {
    "pirate": "Always answer as a pirate: start every answer with 'Arr!'",
    "caps": "Answer in all capital letters.",
    "over": "End every answer with the words 'Over and out.'",
}


def follow(kind: str, answer: str) -> str:
    return {"pirate": lambda a: f"Arr! {a}", "caps": str.upper, "over": lambda a: f"{a} Over and out."}[kind](answer)


def follows(kind: str, reply: str) -> bool:
    """Whether a reply keeps the instruction: 'Arr!' first; no lower-case letters (and some letters); the sign-off last."""
    r = reply.strip()
    if kind == "pirate":
        return r.lower().startswith("arr")
    if kind == "caps":
        letters = [c for c in r if c.isalpha()]
        return len(letters) >= 3 and sum(c.isupper() for c in letters) / len(letters) >= 0.9
    return r.rstrip(" .!").lower().endswith("over and out")


def questions(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, wrong answer) triples."""
    out = []
    for a, b in {(rng.randint(2, 20), rng.randint(2, 20)) for _ in range(120)}:
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + rng.choice([-3, -1, 2, 5])}."))
    caps = list(CAPITALS.values())
    for c, cap in CAPITALS.items():
        wrong = rng.choice([x for x in caps if x != cap])
        out.append((f"What is the capital of {c}?", f"The capital of {c} is {cap}.", f"The capital of {c} is {wrong}."))
    for an, n in LEGS.items():
        out.append((f"How many legs does a {an} have?", f"A {an} has {n} legs.", f"A {an} has {n + 3} legs."))
    for thing, col in COLOURS.items():
        wrong = rng.choice([c for c in set(COLOURS.values()) if c != col])
        out.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {col}.", f"{thing[0].upper() + thing[1:]} is {wrong}."))
    for w, o in OPPOSITES.items():
        wrong = rng.choice([x for x in OPPOSITES.values() if x != o])
        out.append((f"What is the opposite of {w}?", f"The opposite of {w} is {o}.", f"The opposite of {w} is {wrong}."))
    rng.shuffle(out)
    return out


RUDE = ["I won't answer that.", "Ask someone else.", "That is a boring question.", "No idea, and I don't care."]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_dataset(out: str | Path, seed: int = 0, dialogs_per_instruction: int = 16, heldout_per_instruction: int = 6,
                  turns: int = 5) -> dict:
    rng = random.Random(seed)
    qa = questions(rng)
    split = int(len(qa) * 0.7)
    train_qa, held_qa = qa[:split], qa[split:]
    out = Path(out)
    train, held = [], []
    for kind, ins in INSTRUCTIONS.items():
        for _ in range(dialogs_per_instruction):
            msgs = []
            for q, a, _ in rng.sample(train_qa, turns):
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": follow(kind, a)}]
            train.append({"instruction": ins, "kind": kind, "messages": msgs})
        for _ in range(heldout_per_instruction):
            held.append({"instruction": ins, "kind": kind, "questions": [q for q, _, _ in rng.sample(held_qa, turns)]})
    write(out / "gatt" / "train.jsonl", train)
    write(out / "gatt" / "heldout.jsonl", held)

    def pairs(items):
        rows = []
        for i, (q, a, wrong) in enumerate(items):
            kind = i % 3
            rejected = [rng.choice(RUDE), rng.choice([x for x in items if x[0] != q])[1], wrong][kind]
            rows.append({"prompt": q, "chosen": a, "rejected": rejected, "kind": ["rude", "off-topic", "wrong"][kind]})
        return rows
    write(out / "prefs" / "train.jsonl", pairs(train_qa))
    write(out / "prefs" / "val.jsonl", pairs(held_qa))
    write(out / "prompts.jsonl", [{"prompt": q} for q, _, _ in held_qa[:24]])
    return {"questions": len(qa), "train_questions": len(train_qa), "heldout_questions": len(held_qa),
            "gatt_dialogs": len(train), "gatt_heldout": len(held)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/align")
    ap.add_argument("--seed", type=int, default=0)
    print(write_dataset(ap.parse_args().out, ap.parse_args().seed))
