"""Grammar engines for constrained decoding: llguidance vs xgrammar vs outlines-core on our vocabulary.

For each engine and each grammar (JSON Schemas of growing size, free JSON, a regex): the time to
compile the grammar against the default model's 49,152-token byte-level BPE vocabulary, and the
time to compute the next-token mask at each step while walking a valid document token by token
(the document's own BPE tokens: the path a model takes when it writes that output). The mask is
what the token loop waits for, so its per-token time is the engine's decode cost; applying it to
the logits is the same bitmask for every engine and is not counted here.

    PYTHONPATH=. python benchmarks/bench_constrain.py          # engines not installed are skipped
    pip install --target /tmp/engines --no-deps xgrammar apache-tvm-ffi outlines-core   # to compare all
    PYTHONPATH=.:/tmp/engines python benchmarks/bench_constrain.py

Writes benchmarks/results/constrain/engines.json and a markdown table. Runs on one thread
(the engines' own thread pools set to 1 where they have one) so that the figures are per core.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from llamaforge.constrain import JSON_OPTIONS, vocabulary_bytes

ROOT = Path(__file__).resolve().parent.parent

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False},
             {"name": "Ada Lovelace", "age": 36}),
    "nested": ({"type": "object", "additionalProperties": False, "required": ["id", "person", "tags", "status", "score"],
                "properties": {
                    "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "person": {"type": "object", "additionalProperties": False, "required": ["name", "address"],
                               "properties": {"name": {"type": "string"},
                                              "address": {"type": "object", "additionalProperties": False,
                                                          "required": ["city", "zip"],
                                                          "properties": {"city": {"type": "string"},
                                                                         "zip": {"type": "string", "maxLength": 10}}}}},
                    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
                    "status": {"enum": ["active", "inactive", "banned"]},
                    "score": {"type": "number"}}},
               {"id": "ABC-1234", "person": {"name": "Grace Hopper", "address": {"city": "Arlington", "zip": "22201"}},
                "tags": ["navy", "cobol"], "status": "active", "score": 9.5}),
    "any_json": (None, {"items": [1, 2.5, "three", None, True], "meta": {"source": "bench", "ok": False}}),
}
REGEX = (r"\d{3}-\d{3}-\d{4}", "555-867-5309")


class LLG:
    name = "llguidance"

    def __init__(self, tok, vocab):
        import llguidance as lg
        from llamaforge.constrain import vocab_for
        self.lg, self.tok = lg, vocab_for(tok).llg  # the LLTokenizer llamaforge builds
        self.words = np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32)

    def compile(self, schema, regex=None):
        M = self.lg.LLMatcher
        g = M.grammar_from_regex(regex) if regex else M.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}, defaults=JSON_OPTIONS)
        m = M(self.tok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, m):
        m.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        return self.words

    def consume(self, m, token):
        assert m.consume_token(token), m.get_error()


class XGR:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import torch
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.stop_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.words = torch.zeros((1, (tok.vocab_size + 31) // 32), dtype=torch.int32)

    def compile(self, schema, regex=None):
        c = self.compiler
        g = (c.compile_regex(regex) if regex else c.compile_builtin_json_grammar() if schema is None
             else c.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": ")))
        return self.xgr.GrammarMatcher(g)

    def fill(self, m):
        m.fill_next_token_bitmask(self.words)
        return self.words[0].numpy()

    def consume(self, m, token):
        assert m.accept_token(token)


class OC:
    name = "outlines-core"

    def __init__(self, tok, vocab):
        import outlines_core as oc
        self.oc = oc
        pieces: dict[bytes, list[int]] = {}
        specials = set(tok.specials.values())
        for i, b in enumerate(vocab):
            if i not in specials:
                pieces.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_id, pieces)
        self.words = np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32)

    def compile(self, schema, regex=None):
        from outlines_core.json_schema import build_regex_from_schema
        if regex is None:
            # outlines-core has no free-JSON grammar: an object of any keys, depth-limited by its regex builder
            regex = build_regex_from_schema(json.dumps(schema if schema is not None else {"type": "object"}))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def fill(self, g):
        g.write_mask_into(self.words.ctypes.data, self.words.size, self.words.itemsize)
        return self.words

    def consume(self, g, token):
        g.advance(token)


def measure(engine, tok, schema, doc, regex=None) -> dict:
    """Compile, then walk the document's tokens: fill the mask (the engine), apply it to (1, vocab) logits
    (the same unpack + masked_fill for every engine: what llamaforge's Constraint.mask does), consume."""
    import torch
    text = doc if regex else json.dumps(doc)  # ", " and ": ", the separators llamaforge asks for
    ids = tok.encode(text)
    logits = torch.randn(1, tok.vocab_size)
    t0 = time.perf_counter()
    try:
        m = engine.compile(schema, regex)
    except Exception as e:  # noqa: BLE001 -- reported as the engine's limitation
        return {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    compile_s = time.perf_counter() - t0
    fill, apply = [], []
    for i, t in enumerate(ids):
        a = time.perf_counter()
        words = engine.fill(m)
        b = time.perf_counter()
        keep = torch.from_numpy(np.unpackbits(words.view(np.uint8), bitorder="little")[:tok.vocab_size].astype(bool))
        masked = logits.masked_fill(~keep, float("-inf"))
        c = time.perf_counter()
        fill.append(b - a)
        apply.append(c - b)
        if masked[0, t] == float("-inf"):
            return {"compile_s": compile_s, "error": f"rejected its own document at token {i} ({tok.decode([t])!r})"}
        engine.consume(m, t)
    fill_us = sorted(x * 1e6 for x in fill)
    return {"compile_s": round(compile_s, 4), "tokens": len(ids), "mask_us_median": round(statistics.median(fill_us), 1),
            "mask_us_p90": round(fill_us[int(0.9 * (len(fill_us) - 1))], 1), "mask_us_max": round(fill_us[-1], 1),
            "apply_us_median": round(statistics.median(apply) * 1e6, 1)}


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies", "biography"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string"}, "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                         "biography": {"type": "string"}}}


def decode_speed(llm, twin, repeats: int, max_new: int) -> dict:
    """Decode time per token of the default model with and without the PERSON schema. Two copies of the
    model (each generation owns a KV cache) decode in lockstep, one token each in turn (which goes first
    alternates), so the machine's load hits both alike; medians of the per-token times. Also the
    constraint hook's own time per token (mask + advance) and its share of the constrained steps."""
    from llamaforge.generate import SamplingConfig, generate
    ids = llm.chat_ids([{"role": "user", "content": "Describe a fictional person as JSON: name, age, city, hobbies "
                                                     "and a long biography."}])
    cfg = SamplingConfig(max_new_tokens=max_new)
    steps, hook_us, lengths = {"free": [], "json": []}, [], {"free": [], "json": []}
    for _ in range(repeats):
        c = llm.constraint(PERSON)
        for name in ("mask", "advance"):  # time the hook itself
            def timed(*a, _f=getattr(c, name), **k):
                t0 = time.perf_counter()
                out = _f(*a, **k)
                hook_us.append((time.perf_counter() - t0) * 1e6)
                return out
            setattr(c, name, timed)
        gens = {"free": generate(twin.model, ids, cfg, llm.tokenizer.stop_ids, twin.decode),
                "json": generate(llm.model, ids, cfg, llm.tokenizer.stop_ids, llm.decode, c)}
        for mode, g in gens.items():  # the prefills, not timed
            next(g)
            lengths[mode].append(1)
        order, i = ["free", "json"], 0
        while gens:
            for mode in order if i % 2 == 0 else order[::-1]:
                if mode not in gens:
                    continue
                t0 = time.perf_counter()
                try:
                    next(gens[mode])
                except StopIteration:
                    del gens[mode]
                    continue
                steps[mode].append(time.perf_counter() - t0)
                lengths[mode][-1] += 1
            i += 1
    per_token = [a + b for a, b in zip(hook_us[::2], hook_us[1::2])]
    free, constrained = statistics.median(steps["free"]), statistics.median(steps["json"])
    return {"free_ms": round(free * 1e3, 2), "json_ms": round(constrained * 1e3, 2), "slowdown_pct": round(100 * (constrained / free - 1), 1),
            "hook_us_median": round(statistics.median(per_token), 1), "hook_us_p90": round(sorted(per_token)[int(0.9 * len(per_token))], 1),
            "hook_share_pct": round(100 * sum(per_token) / 1e6 / sum(steps["json"]), 2),
            "tokens_free": lengths["free"], "tokens_json": lengths["json"], "repeats": repeats}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="walks per grammar (medians over all steps)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "constrain"))
    ap.add_argument("--decode-repeats", type=int, default=5, help="runs per mode of the decode-speed comparison (0: skip it)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the decode-speed comparison")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    import os
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import llamaforge
    llm = llamaforge.load()
    tok = llm.tokenizer
    vocab = vocabulary_bytes(tok)
    engines = []
    for cls in (LLG, XGR, OC):
        try:
            engines.append(cls(tok, vocab))
        except ImportError as e:
            print(f"{cls.name}: not installed ({e}); skipped")
    cases = [(k, s, d, None) for k, (s, d) in SCHEMAS.items()] + [("regex", None, REGEX[1], REGEX[0])]
    results = {}
    for name, schema, doc, regex in cases:
        for _ in range(args.repeats):  # engines alternate within each repeat: the machine's load hits them alike
            for e in engines:
                r = measure(e, tok, schema, doc, regex)
                results.setdefault(name, {}).setdefault(e.name, []).append(r)
    summary = {}
    for name, per in results.items():
        for ename, runs in per.items():
            ok = [r for r in runs if "error" not in r]
            summary.setdefault(name, {})[ename] = runs[0] if not ok else {
                k: statistics.median(r[k] for r in ok) for k in ok[0]}
    speed = None
    if args.decode_repeats:
        torch.set_num_threads(args.threads)
        speed = decode_speed(llm, llamaforge.load(), args.decode_repeats, args.max_new_tokens)
        print(json.dumps(speed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "results": summary, "decode": speed,
                                                  "threads": args.threads}, indent=1))
    lines = ["| grammar | engine | compile s | tokens | mask µs median | p90 | max | apply µs |", "|---|---|---|---|---|---|---|---|"]
    for name, per in summary.items():
        for ename, r in per.items():
            if "error" in r:
                lines.append(f"| {name} | {ename} | {r.get('compile_s', '-')} | - | {r['error']} | | | |")
            else:
                lines.append(f"| {name} | {ename} | {r['compile_s']:.3f} | {r['tokens']:g} | {r['mask_us_median']:.0f} | "
                             f"{r['mask_us_p90']:.0f} | {r['mask_us_max']:.0f} | {r['apply_us_median']:.0f} |")
    if speed:
        lines += ["", f"Decode, default model, {args.threads} thread(s), two copies in lockstep, {speed['repeats']} runs, "
                      f"median per token: {speed['free_ms']} ms free, {speed['json_ms']} ms with a JSON schema "
                      f"({speed['slowdown_pct']:+}%); the constraint hook {speed['hook_us_median']} µs/token "
                      f"(p90 {speed['hook_us_p90']}), {speed['hook_share_pct']}% of the constrained steps' time."]
    (out / "engines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
