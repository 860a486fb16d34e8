"""Structured output, tool calling, `n` choices, logit_bias / min_p and /tokenize on the server, the
Python API and the CLI, against test_api.py's "chain" model (with a longer context, for the tool
prompt) and the official `openai` client. Every constrained output is checked with `jsonschema`.

The chain model always prefers one next letter, so without a constraint it never writes JSON or a
tool call: whatever structure appears comes from the constraint, and strings stop only because the
constraint closes them before the token budget runs out."""
import json
import threading
from pathlib import Path
from typing import Literal

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

import llamaforge  # noqa: E402
from test_api import Server, post, sse_events, write_chain_model  # noqa: E402

from conftest import needs_default_model  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                                                            "unit": {"enum": ["c", "f"]}},
                                                           "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"]}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Address(pydantic.BaseModel):
    city: str
    zip_code: str = pydantic.Field(pattern=r"^[0-9]{5}$")


class Person(pydantic.BaseModel):
    name: str
    age: int = pydantic.Field(ge=0, le=150)
    role: Literal["admin", "user"]
    address: Address
    nickname: str | None
    tags: list[str] = pydantic.Field(max_length=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chain-long") / "model"
    write_chain_model(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))  # room for the tool prompt
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, max_batch=8, max_queue=64, ctx_size=4096)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_calls(calls, names=("get_weather", "get_time")):
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function" and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


# ---- response_format ----

def test_parse_returns_a_pydantic_object(client):
    r = client.chat.completions.parse(model="chain", messages=[{"role": "user", "content": "Make up a person."}],
                                      response_format=Person, max_tokens=300)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
    assert choice.message.parsed == Person.model_validate_json(choice.message.content)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_object_and_json_schema_with_n_choices(server, path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "items": {"type": "array", "items": {"type": "integer"},
              "minItems": 1, "maxItems": 3}}, "required": ["ok", "items"], "additionalProperties": False}
    base = {"messages": ASK} if path.endswith("chat/completions") else {"prompt": "JSON:"}
    for fmt, check in (({"type": "json_object"}, lambda v: isinstance(v, dict)),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
                        lambda v: jsonschema.validate(v, schema) is None)):
        r = post(server.url + path, {**base, "response_format": fmt, "max_tokens": 120, "n": 3, "temperature": 1.0, "seed": 5})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2]
        for c in choices:
            text = c["message"]["content"] if "message" in c else c["text"]
            assert c["finish_reason"] == "stop" and check(json.loads(text)), text


def test_grammar_and_json_schema_extensions(server, client):
    r = client.chat.completions.create(model="chain", messages=ASK, max_tokens=20,
                                       extra_body={"grammar": 'root ::= ("yes" | "no") "."'})
    assert r.choices[0].message.content in ("yes.", "no.") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="chain", prompt="x", max_tokens=30, extra_body={"grammar": 'start: /[0-9]{3}-[0-9]{2}/'})
    assert len(r.choices[0].text) == 6 and r.choices[0].text[3] == "-"
    r = post(server.url + "/v1/completions", {"prompt": "x", "max_tokens": 40, "json_schema": {"enum": ["alpha", "beta"]}})
    assert json.loads(r.json()["choices"][0]["text"]) in ("alpha", "beta")


def test_many_constrained_rows_decode_together(server):
    schemas = [{"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 2, "maxItems": 2},
               {"type": "object", "properties": {"a": {"type": "integer", "minimum": 10, "maximum": 20}}, "required": ["a"]},
               {"enum": ["one", "two", 3]}, {"type": "string", "pattern": "^[a-z]{4}$"}]
    results, before = {}, dict(server.engine.batch_sizes)

    def ask(i):
        body = {"prompt": f"row {i}", "max_tokens": 60, "temperature": 1.0, "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schemas[i % 4]}}}
        results[i] = post(server.url + "/v1/completions", body).json()["choices"][0]["text"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(8):
        jsonschema.validate(json.loads(results[i]), schemas[i % 4])
    grown = {b: n - before.get(b, 0) for b, n in server.engine.batch_sizes.items()}
    assert max(b for b, n in grown.items() if n) > 1  # constrained rows shared decode steps


# ---- tools ----

def test_tool_call_round_trip(server, client):
    r = client.chat.completions.create(model="chain", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
    check_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    msgs = ASK + [choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21, "sky": "clear"}'}]
    r = client.chat.completions.create(model="chain", messages=msgs, tools=[WEATHER, TIME], max_tokens=6)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "length"
    prompt = post(server.url + "/tokenize", {"messages": msgs}).json()["tokens"]
    text = server.llm.tokenizer.decode(prompt)
    # the built-in format: the call as the assistant wrote it, the result as a user turn
    assert f'<tool_call>\n{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21, "sky": "clear"}\n</tool_response>' in text


def test_tool_calls_stream_as_the_openai_client_assembles_them(server, client):
    named = {"type": "function", "function": {"name": "get_time"}}
    with client.chat.completions.stream(model="chain", messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=200) as s:
        final = s.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_time"]
    check_calls(calls)
    msgs = ASK + [final.choices[0].message.model_dump(exclude_none=True, exclude={"parsed"}),
                  {"role": "tool", "tool_call_id": calls[0].id, "content": "12:00"}]
    chunks = [c.choices[0] for c in client.chat.completions.create(model="chain", messages=msgs, tools=[WEATHER, TIME], max_tokens=5,
                                                                   stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) and not any(c.delta.tool_calls for c in chunks)
    assert chunks[-1].finish_reason == "length"
    with httpx_stream(server, {"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 200,
                               "parallel_tool_calls": False, "stream": True}) as events:
        deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    first = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert len(first) == 1 and first[0]["index"] == 0 and first[0]["id"].startswith("call_")
    assert first[0]["type"] == "function" and first[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(first[0]["function"]["arguments"]), PARAMS["get_weather"])
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "tool_calls"


class httpx_stream:
    def __init__(self, server, body):
        import httpx
        self.cm = httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60)

    def __enter__(self):
        return sse_events(self.cm.__enter__())

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def test_tool_choice_none_and_auto(client):
    r = client.chat.completions.create(model="chain", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=5)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    r = client.chat.completions.create(model="chain", messages=ASK, tools=[WEATHER], max_tokens=5)  # auto: the model writes letters
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "length"


def test_native_tool_template_and_python_api(model_dir):
    """A template that takes `tools` renders them itself (same ids as transformers), and LLM.chat returns calls."""
    from test_chat import QWEN_STYLE_TEMPLATE
    from llamaforge.chat import JinjaChat
    llm = llamaforge.load(model_dir)
    llm.chat_format = JinjaChat(llm.tokenizer, QWEN_STYLE_TEMPLATE)
    assert llm.chat_format.accepts_tools
    msg = llm.chat(ASK, tools=[WEATHER], tool_choice="get_weather", max_new_tokens=200)
    assert msg["role"] == "assistant" and msg["content"] is None and len(msg["tool_calls"]) == 1
    call = msg["tool_calls"][0]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS["get_weather"])
    ids = llm.chat_ids(ASK + [msg, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}], [WEATHER])
    text = llm.tokenizer.decode(ids)
    assert "<tools>\n" + json.dumps(WEATHER) in text and "<tool_response>\nsunny\n</tool_response>" in text
    out = llm.generate("x", json_schema=Person, max_new_tokens=300)
    Person.model_validate_json(out)
    assert llm.chat(ASK, json_schema={"enum": ["up", "down"]}, max_new_tokens=10) in ('"up"', '"down"')
    with pytest.raises(llamaforge.LlamaforgeError, match="exclude each other"):
        llm.chat(ASK, tools=[WEATHER], json_schema={"type": "object"})


# ---- n, logit_bias, min_p ----

def test_n_choices_share_one_prefill(server, client):
    stats = dict(server.engine.stats)
    r = client.chat.completions.create(model="chain", messages=ASK, max_tokens=8, n=3, temperature=1.5, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.message.content for c in r.choices}) > 1
    n_prompt = len(server.llm.chat_ids(ASK))
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 24
    assert server.engine.stats["prompt_tokens"] - stats.get("prompt_tokens", 0) == n_prompt  # prefilled once
    again = client.chat.completions.create(model="chain", messages=ASK, max_tokens=8, n=3, temperature=1.5, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    greedy = client.chat.completions.create(model="chain", messages=ASK, max_tokens=8, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    chunks = list(client.chat.completions.create(model="chain", messages=ASK, max_tokens=4, n=2, stream=True))
    for j in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == j]
        assert "".join(c.delta.content or "" for c in mine) == greedy.choices[j].message.content[:4]
        assert mine[-1].finish_reason == "length"


def test_logit_bias_and_min_p(server, client):
    plain = client.completions.create(model="chain", prompt="a", max_tokens=1).choices[0].text
    tok = server.llm.tokenizer
    banned = client.completions.create(model="chain", prompt="a", max_tokens=1, logit_bias={str(tok.encode(plain)[0]): -100})
    assert banned.choices[0].text != plain
    forced = client.completions.create(model="chain", prompt="a", max_tokens=3, logit_bias={str(ord("q")): 100})
    assert forced.choices[0].text == "qqq"
    r = client.completions.create(model="chain", prompt="a", max_tokens=5, temperature=1.0, seed=1, extra_body={"min_p": 0.5})
    assert r.choices[0].text == client.completions.create(model="chain", prompt="a", max_tokens=5).choices[0].text


# ---- /tokenize, /detokenize ----

def test_tokenize_and_detokenize(server):
    tok = server.llm.tokenizer
    r = post(server.url + "/tokenize", {"content": "héllo"}).json()  # llama.cpp
    assert r["tokens"] == tok.encode("héllo") and r["count"] == len(r["tokens"])
    r = post(server.url + "/tokenize", {"content": "ab", "with_pieces": True}).json()
    assert r["tokens"] == [{"id": ord("a"), "piece": "a"}, {"id": ord("b"), "piece": "b"}]
    r = post(server.url + "/tokenize", {"model": "chain", "prompt": "hi", "add_special_tokens": True}).json()  # vLLM
    assert r["tokens"] == tok.encode("hi") and r["max_model_len"] == 4096
    assert post(server.url + "/tokenize", {"messages": ASK}).json()["tokens"] == server.llm.chat_ids(ASK)
    ids = tok.encode("Grüße 🐱")
    assert post(server.url + "/detokenize", {"tokens": ids}).json() == {"content": "Grüße 🐱", "prompt": "Grüße 🐱"}
    for path, body in (("/tokenize", {}), ("/tokenize", {"content": "a", "prompt": "b"}), ("/detokenize", {"tokens": [10 ** 6]}),
                       ("/tokenize", {"content": "a", "model": "gpt-4"})):
        r = post(server.url + path, body)
        assert r.status_code in (400, 404) and r.json()["error"]["message"]


# ---- bad input: a 400 that names the problem ----

BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}}, "response_format", "strnig"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"grammar": 'root ::= "a" missing'}, "grammar", "missing"),
    ({"grammar": "start: /[^\\x00-\\U0010FFFF]/"}, "grammar", "matches no text"),
    ({"grammar": "start: 'a'", "response_format": {"type": "json_object"}}, "grammar", "not both"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch_rockets"}}}, "tool_choice", "launch_rockets"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"not": {}}}}}}],
      "tool_choice": "required"}, "tools", "not"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "exclude"),
    ({"n": 9}, "n", None),
    ({"logit_bias": {"999999": 1}}, "logit_bias", None),
    ({"logit_bias": {"5": 200}}, "logit_bias", None),
    ({"min_p": 1.5}, "min_p", None),
]


@pytest.mark.parametrize("extra,param,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_structured_requests_get_a_clear_400(server, extra, param, needle):
    r = post(server.url + "/v1/chat/completions", {"messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and (needle is None or needle in err["message"]), err


# ---- the command line ----

def test_cli_generate_json_schema_and_grammar(model_dir, tmp_path, capsys):
    from llamaforge.commands import main
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 5}},
              "required": ["n", "s"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.gbnf").write_text('root ::= "red" | "green"\n')
    assert main(["generate", "-m", str(model_dir), "-p", "x", "--max-new-tokens", "60", "--json-schema", str(tmp_path / "s.json")]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    assert main(["generate", "-m", str(model_dir), "-p", "x", "--grammar", str(tmp_path / "g.gbnf"), "--logit-bias", "103:5"]) == 0
    assert capsys.readouterr().out.strip() in ("red", "green")
    (tmp_path / "bad.json").write_text("{")
    assert main(["generate", "-m", str(model_dir), "-p", "x", "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# ---- the default model ----

@needs_default_model
@pytest.mark.slow
def test_default_model_writes_valid_json_and_tool_calls(default_llm_q):
    s = Server(default_llm_q, name="smol", max_batch=4, ctx_size=1024)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.parse(model="smol", messages=[{"role": "user", "content": "Invent a person: name, age, role."}],
                                     response_format=Person, max_tokens=120)
        assert isinstance(r.choices[0].message.parsed, Person)
        r = c.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80)
        check_calls(r.choices[0].message.tool_calls)
    finally:
        s.close()
        default_llm_q.model.clear_caches()
