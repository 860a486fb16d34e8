"""HTTP plumbing of `llamaforge serve`, free of the endpoints: OpenAI-shaped errors, Prometheus metrics,
the ASGI guard (API key, body size limit, request metrics), server-sent events and the listening socket.
"""
import hmac
import json
import math
import threading
import time


PROTECTED = ("/v1", "/tokenize", "/detokenize")  # paths that need the API key when there is one

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
        if self.api_key and path.startswith(PROTECTED) and not self._authorized(headers.get(b"authorization", b"")):
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


async def sse(chunks, runs: list):
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


