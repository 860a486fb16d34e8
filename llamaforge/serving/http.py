"""HTTP plumbing of `llamaforge serve`, free of the endpoints: OpenAI-shaped errors, Prometheus metrics,
the ASGI guard (API key, body size and time limits, request metrics), server-sent events, the listening
socket and the connection-level limits uvicorn lacks (header timeout, connection cap, JSON errors for
malformed HTTP).
"""
import asyncio
import hmac
import json
import logging
import math
import threading
import time


PROTECTED = ("/v1", "/tokenize", "/detokenize")  # paths that need the API key when there is one

# ---- errors ----

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        message = message.encode("utf-8", "backslashreplace").decode()  # a lone surrogate echoed from a request stays JSON
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_bytes(status: int, message: str, code: str | None = None, type: str = "invalid_request_error") -> bytes:
    return json.dumps(APIError(status, message, type, None, code).body()).encode()


# Connection limits (slowloris): a request's headers must arrive within HEADER_TIMEOUT of its first byte
# (or of the connection), its body within BODY_TIMEOUT of the headers; at most MAX_CONNECTIONS are open.
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
MAX_CONNECTIONS = 512


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

    def __init__(self, app, api_key: str | None, max_body: int, metrics: Metrics, endpoints: set[str],
                 body_timeout: float = BODY_TIMEOUT):
        self.app, self.api_key, self.max_body, self.metrics, self.endpoints = app, api_key, max_body, metrics, endpoints
        self.body_timeout = body_timeout

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
            deadline = time.monotonic() + self.body_timeout
            while more:  # read it all here (bounded in size and time), then hand it to the app in one message
                try:
                    msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    return await self._reject(send_and_count, 408, f"The request body did not arrive within {self.body_timeout:g} s",
                                              "timeout")
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
        """An error before the body was read: the connection closes after it (what is left of the body is not read)."""
        body = _error_bytes(status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *extra_headers]})
        await send({"type": "http.response.body", "body": body})


async def sse(chunks, runs: list):
    """Server-sent events: one `data: {json}` per chunk, an error as a last chunk, then `data: [DONE]`.
    After the 200 is sent an error can only be an event: `{"error": ...}` (APIError's body), then [DONE]."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    except Exception as e:  # noqa: BLE001 - a bug: the client still gets an error event and [DONE]
        logging.getLogger("uvicorn.error").error("stream failed: %s: %s", type(e).__name__, e)
        yield f"data: {json.dumps(APIError(500, f'generation failed: {type(e).__name__}', 'server_error').body())}\n\n"
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


# ---- the connection: uvicorn's h11 protocol with a header timeout, a connection cap and JSON errors ----

def _raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, for when h11 cannot send one (no request was parsed)."""
    body = _error_bytes(status, message, code)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def http_protocol(header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
    """An asyncio protocol class for `uvicorn.Config(http=...)`: uvicorn's h11 one, plus
    - a header timeout: a connection whose request line and headers are not complete `header_timeout`
      seconds after it opened (or after its next request's first byte) gets a 408 and is closed, so
      stalled (slowloris) connections do not stay open; uvicorn only times out idle keep-alive ones;
    - a cap on open connections: past `max_connections`, a new one gets a 503 and is closed;
    - a connection closed once its response is complete if its request body is not (the body is never read);
    - OpenAI-shaped JSON instead of uvicorn's plain-text 400 for malformed HTTP."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self._refuse(_raw_error(503, "Service Unavailable", f"The server has {max_connections} connections open: "
                                        "retry later", "too_many_connections"))
                return
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc):
            self._stop_watching()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self.transport.close()  # answered before its body ended (a GET with one, say): no trickling it forever

        def _watch_headers(self) -> None:
            """Armed while a request's headers are incomplete, disarmed once h11 has parsed them."""
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(header_timeout, self._headers_late)
            else:
                self._stop_watching()

        def _stop_watching(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            started = bool(self.conn.trailing_data[0])  # bytes of a request, or an idle connection
            self._refuse(_raw_error(408, "Request Timeout", f"The request headers did not arrive within {header_timeout:g} s",
                                    "timeout") if started else b"")

        def _refuse(self, response: bytes) -> None:
            self._stop_watching()
            if response:
                self.transport.write(response)
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._refuse(_raw_error(400, "Bad Request", "The request is not valid HTTP/1.1", "invalid_http"))

    return Protocol
