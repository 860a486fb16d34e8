"""Pretraining data: train a tokenizer, tokenize sources into memory-mapped shards, draw packed batches.

- `train_tokenizer`: LLaMA's tokenizer recipe (Touvron et al. 2023, section 2.1): SentencePiece
  BPE with byte fallback (no unknown characters) and digits split into single digits.
- `prepare`: text / markdown / JSONL sources -> `out/<source>/<k>.{train,val}.bin` token files
  (uint16 or uint32, raw, `np.memmap`-able), each document as BOS + text + EOS, packed back to
  back. A shard is a group of input files; its `.json` sidecar is written last, so a re-run skips
  every shard whose sidecar matches (same files, sizes, mtimes, tokenizer). The last
  `val_fraction` of each shard's tokens is its validation split.
- `Batches`: packed sequences of T + 1 tokens (GPT-style, nanoGPT `get_batch`), each drawn from a
  source chosen by the mixture weights (the paper's "sampling proportion"), walking each source in
  a seeded permutation of its windows, epoch after epoch. The whole global batch is planned on every
  rank from the same state, and each rank reads its slice, so the data order does not depend on the
  world size and `state_dict()` is the exact data position for `--resume`.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LlamaforgeError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".jsonl")
SHARD_BYTES = 64 * 2 ** 20  # input bytes per shard (a shard is one or more whole input files)


# ---- reading sources ----

def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence footer (the '*** START OF ...' / '*** END OF ...' lines)."""
    start = text.find("*** START OF")
    if start >= 0:
        nl = text.find("\n", start)
        text = text[nl + 1:] if nl >= 0 else ""
    end = text.find("*** END OF")
    if end >= 0:
        text = text[:end]
    return text.strip("\n\r\ufeff") + "\n"


def read_documents(path: Path):
    """Yield the documents of one file: a text/markdown file is one document; JSONL gives each line's "text"."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise LlamaforgeError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
                if text:
                    yield text
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlamaforgeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = strip_gutenberg(text)
    if text.strip():
        yield text


def expand(pattern: str) -> list[Path]:
    """A file, a directory (its text files, recursively) or a glob -> sorted files."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    if not files:
        raise LlamaforgeError(f"source {pattern!r} matches no text files ({', '.join(TEXT_SUFFIXES)})")
    return sorted(files)


@dataclass
class Source:
    name: str
    files: list[Path]
    weight: float


def parse_sources(specs: list[str]) -> list[Source]:
    """'[NAME=]PATH[:WEIGHT]': PATH a file, directory or glob; WEIGHT the sampling proportion (default 1)."""
    out, names = [], set()
    for spec in specs:
        label, eq, rest = spec.partition("=")
        label, spec = (label, rest) if eq and label.replace("-", "").replace("_", "").isalnum() else ("", spec)
        path, weight = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        if not weight > 0:
            raise LlamaforgeError(f"source {spec!r}: the weight must be > 0")
        files = expand(path)
        base = label or Path(path.split("*")[0]).stem or "data"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "data"
        stem, i = name, 1
        while name in names:
            i += 1
            name = f"{stem}{i}"
        names.add(name)
        out.append(Source(name, files, weight))
    return out


# ---- tokenizer training ----

def train_tokenizer(files: list[Path], out: str | Path, vocab_size: int, max_lines: int = 5_000_000,
                    threads: int | None = None):
    """Train LLaMA's kind of tokenizer: SentencePiece BPE, byte fallback, split digits, identity normalization.

    Writes `out/tokenizer.model`; returns the loaded `SentencePieceTokenizer` (BOS added by default,
    as LLaMA). Options follow LLaMA's tokenizer.model trainer_spec.
    """
    import sentencepiece as spm
    from ..tokenizer import SentencePieceTokenizer
    if vocab_size < 256 + 3 + 16:
        raise LlamaforgeError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 259 pieces")

    def lines():
        n = 0
        for f in files:
            for doc in read_documents(f):
                for line in doc.splitlines():
                    if line.strip():
                        yield line
                        n += 1
                        if n >= max_lines:
                            return
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, character_coverage=0.99995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            max_sentence_length=4192, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise LlamaforgeError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: {e}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tokenizer.model.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out / "tokenizer.model")
    return SentencePieceTokenizer(buf.getvalue())


# ---- prepare: sources -> token shards ----

class Progress:
    """A one-line progress bar on stderr (units: bytes of input)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.t0, self.last = max(total, 1), desc, 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int, note: str = "") -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last < 0.2 and self.n < self.total:
            return
        self.last = now
        frac = min(self.n / self.total, 1.0)
        bar = "#" * int(30 * frac)
        rate = self.n / max(now - self.t0, 1e-9) / 1e6
        line = f"{self.desc} [{bar:<30}] {100 * frac:5.1f}% {self.n / 1e6:.1f}/{self.total / 1e6:.1f} MB {rate:.1f} MB/s {note}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if self.n >= self.total else ""))
        elif self.n >= self.total:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _file_key(files: list[Path], tok_hash: str, val_fraction: float) -> str:
    h = hashlib.sha256(f"{tok_hash} {val_fraction}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _group(files: list[Path], shard_bytes: int) -> list[list[Path]]:
    groups, cur, size = [], [], 0
    for f in files:
        n = f.stat().st_size
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += n
    return groups + ([cur] if cur else [])


def prepare(sources: list[Source], tokenizer_dir: str | Path, out: str | Path, val_fraction: float = 0.005,
            shard_bytes: int = SHARD_BYTES) -> dict:
    """Tokenize every source into shards under `out`; write `out/meta.json`. Finished shards are skipped."""
    from ..tokenizer import load_tokenizer_file
    if not 0 <= val_fraction < 0.5:
        raise LlamaforgeError(f"--val-fraction must be in [0, 0.5), got {val_fraction}")
    tok = load_tokenizer_file(tokenizer_dir)
    if tok.eos_id is None:
        raise LlamaforgeError("the tokenizer has no EOS token: documents need one as a separator")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_files = tok.save(out)  # the data carries its tokenizer: pretrain reads it from here
    cfg = Path(tokenizer_dir) / "tokenizer_config.json"
    if cfg.exists():  # BOS/EOS names of a tokenizer.json live beside it
        _write_atomic(out / cfg.name, cfg.read_bytes())
    tok_hash = hashlib.sha256(b"".join((out / f).read_bytes() for f in tok_files)).hexdigest()[:16]
    dtype = token_dtype(tok.vocab_size)
    meta = {"tokenizer": tok_files[0], "tokenizer_sha256": tok_hash, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name, "val_fraction": val_fraction,
            "sources": []}
    for src in sources:
        groups = _group(src.files, shard_bytes)
        (out / src.name).mkdir(exist_ok=True)
        bar = Progress(sum(f.stat().st_size for f in src.files), f"prepare {src.name}")
        shards, skipped = [], 0
        for k, files in enumerate(groups):
            key = _file_key(files, tok_hash, val_fraction)
            side = out / src.name / f"{k:05d}.json"
            done = json.loads(side.read_text()) if side.exists() else None
            if not (done and done.get("key") == key and all((out / src.name / done[s]).exists() for s in ("train", "val"))):
                done = _tokenize_shard(tok, files, out / src.name, k, dtype, val_fraction, key)
            else:
                skipped += 1
            shards.append(done)
            bar.update(sum(f.stat().st_size for f in files), f"shard {k + 1}/{len(groups)}")
        n_train, n_val = sum(s["n_train"] for s in shards), sum(s["n_val"] for s in shards)
        print(f"{src.name}: {len(src.files)} files -> {len(shards)} shards ({skipped} already done), "
              f"{n_train:,} train + {n_val:,} val tokens, weight {src.weight:g}", file=sys.stderr)
        meta["sources"].append({"name": src.name, "weight": src.weight, "n_train": n_train, "n_val": n_val,
                                "shards": [{k: s[k] for k in ("train", "val", "n_train", "n_val")} for s in shards]})
    _write_atomic(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _tokenize_shard(tok, files: list[Path], dst: Path, k: int, dtype, val_fraction: float, key: str) -> dict:
    docs = []
    for f in files:
        for doc in read_documents(f):  # BOS + text + EOS: EOS separates the packed documents
            docs.append(np.asarray(tok.encode(doc, bos=True, eos=True), dtype=dtype))
    n_docs = len(docs)
    arr = np.concatenate(docs) if docs else np.zeros(0, dtype=dtype)
    n_val = int(round(len(arr) * val_fraction))
    train, val = arr[:len(arr) - n_val], arr[len(arr) - n_val:]
    info = {"key": key, "files": [str(f) for f in files], "n_docs": n_docs, "train": f"{k:05d}.train.bin",
            "val": f"{k:05d}.val.bin", "n_train": int(len(train)), "n_val": int(len(val))}
    _write_atomic(dst / info["train"], train.tobytes())
    _write_atomic(dst / info["val"], val.tobytes())
    _write_atomic(dst / f"{k:05d}.json", (json.dumps(info, indent=2) + "\n").encode())  # last: marks the shard done
    return info


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise LlamaforgeError(f"{data_dir} has no meta.json: run `llamaforge prepare --out {data_dir} ...` first")
    return json.loads(path.read_text())


# ---- batches ----

class TokenStream:
    """One source's split as a single token array over its memory-mapped shards."""

    def __init__(self, data_dir: Path, src: dict, split: str, dtype):
        self.parts = [np.memmap(data_dir / src["name"] / s[split], dtype=dtype, mode="r")
                      for s in src["shards"] if s[f"n_{split}"] > 0]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        out, pos = [], start
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while n > 0:  # a window may cross a shard boundary
            off = pos - int(self.starts[i])
            take = self.parts[i][off:off + n]
            out.append(take)
            n -= len(take)
            pos += len(take)
            i += 1
        return np.concatenate(out) if len(out) > 1 else np.array(out[0])


class Batches:
    """Packed (T + 1)-token windows from the sources by weight; `plan` + `read` keep ranks in step."""

    def __init__(self, data_dir: str | Path, seq_len: int, seed: int = 0, split: str = "train",
                 weights: dict[str, float] | None = None):
        self.dir = Path(data_dir)
        meta = load_meta(self.dir)
        self.meta, self.seq_len, self.seed = meta, seq_len, seed
        dtype = np.dtype(meta["dtype"])
        srcs = [s for s in meta["sources"] if s[f"n_{split}"] > seq_len + 1]
        if not srcs:
            raise LlamaforgeError(f"{data_dir}: no source has more than seq_len + 1 = {seq_len + 1} {split} tokens")
        self.names = [s["name"] for s in srcs]
        self.streams = [TokenStream(self.dir, s, split, dtype) for s in srcs]
        w = np.array([(weights or {}).get(s["name"], s["weight"]) for s in srcs], dtype=np.float64)
        self.weights = w / w.sum()
        self.n_windows = [(len(s) - 1) // seq_len for s in self.streams]  # windows start at multiples of T
        self.n_seen = 0  # sequences drawn so far (all ranks)
        self.epoch = [0] * len(srcs)
        self.cursor = [0] * len(srcs)
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    def _order(self, s: int) -> np.ndarray:
        e = self.epoch[s]
        if self._perm.get(s, (None,))[0] != e:
            self._perm[s] = (e, np.random.default_rng([self.seed, s, e]).permutation(self.n_windows[s]))
        return self._perm[s][1]

    def plan(self, n: int) -> list[tuple[int, int]]:
        """The next n sequences of the global order as (source index, token offset); advances the state."""
        src = np.random.default_rng([self.seed, 1 << 30, self.n_seen]).choice(len(self.weights), size=n, p=self.weights)
        out = []
        for s in src.tolist():
            out.append((s, int(self._order(s)[self.cursor[s]]) * self.seq_len))
            self.cursor[s] += 1
            if self.cursor[s] == self.n_windows[s]:
                self.epoch[s] += 1
                self.cursor[s] = 0
        self.n_seen += n
        return out

    def read(self, plan: list[tuple[int, int]]):
        """(inputs, targets), each (len(plan), T) int64 tensors."""
        import torch
        rows = np.stack([self.streams[s].read(off, self.seq_len + 1) for s, off in plan]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def tokens(self, plan: list[tuple[int, int]]) -> int:
        return len(plan) * self.seq_len

    def epochs(self) -> dict[str, float]:
        """Epochs seen per source (the paper's 'Epochs' column)."""
        return {n: e + c / w for n, e, c, w in zip(self.names, self.epoch, self.cursor, self.n_windows)}

    def state_dict(self) -> dict:
        return {"n_seen": self.n_seen, "epoch": list(self.epoch), "cursor": list(self.cursor), "names": list(self.names),
                "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, st: dict) -> None:
        if st["names"] != self.names or st["seq_len"] != self.seq_len or st["seed"] != self.seed:
            raise LlamaforgeError(f"the checkpoint's data position is for sources {st['names']}, seq_len {st['seq_len']}, "
                                  f"seed {st['seed']}; this run has {self.names}, {self.seq_len}, {self.seed}")
        self.n_seen, self.epoch, self.cursor = st["n_seen"], list(st["epoch"]), list(st["cursor"])


def validation_plan(data_dir: str | Path, seq_len: int, n: int) -> tuple["Batches", list[tuple[int, int]]]:
    """A fixed set of n validation windows, shared among the sources by weight, evenly spaced in each."""
    val = Batches(data_dir, seq_len, split="val")
    counts = np.maximum(1, np.round(val.weights * n)).astype(int)
    plan = []
    for s, c in enumerate(counts):
        c = min(int(c), val.n_windows[s])
        plan += [(s, int(i) * seq_len) for i in np.linspace(0, val.n_windows[s] - 1, c).astype(int)]
    return val, plan
