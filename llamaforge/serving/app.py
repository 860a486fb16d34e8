"""The FastAPI app of `llamaforge serve`: routes over `api.API`, the chat page, the guard, and `serve()`."""
import sys
from pathlib import Path

from ..embeddings import Embedder
from ..errors import LlamaforgeError
from .api import API, ServeConfig, Stream
from .http import BODY_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS, APIError, Guard, http_protocol, listen_socket, sse
from .schemas import schemas

STATIC = Path(__file__).parent / "static"


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
    server = uvicorn.Server(uvicorn_config(app, cfg))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"llamaforge: serving {name} at http://{host}:{port}/ (OpenAI API under /v1)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])


def uvicorn_config(app, cfg: ServeConfig, header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
    """uvicorn's settings for `app`: h11 with a header timeout, a connection cap and JSON errors (`http.http_protocol`);
    headers larger than 16 KiB are malformed HTTP (h11's limit, a 400)."""
    import uvicorn
    return uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5, timeout_keep_alive=5,
                          http=http_protocol(header_timeout, max_connections), h11_max_incomplete_event_size=16 * 1024)


PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                           "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def create_app(llm, cfg: ServeConfig, name: str, embedder: "Embedder | None | str" = "auto", body_timeout: float = BODY_TIMEOUT):
    """The FastAPI app around an `API`; the engine starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.staticfiles import StaticFiles

    from .. import __version__
    S = schemas()
    ChatRequest, CompletionRequest, EmbeddingRequest = S["ChatRequest"], S["CompletionRequest"], S["EmbeddingRequest"]
    TokenizeRequest, DetokenizeRequest = S["TokenizeRequest"], S["DetokenizeRequest"]
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
               f"Invalid value for '{param}': {first.get('msg', 'invalid')}" if param else
               str(first.get("msg", "invalid")).removeprefix("Value error, "))
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

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return JSONResponse(await api.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return JSONResponse(api.detokenize(body))

    @app.get("/health")
    async def health():
        return JSONResponse(*api.health())

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(api.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    class PageFiles(StaticFiles):  # revalidated on each load (a 304 when unchanged): an upgraded server never meets a stale chat.js
        def file_response(self, *args, **kw):
            response = super().file_response(*args, **kw)
            response.headers["Cache-Control"] = "no-cache"
            return response

    app.mount("/static", PageFiles(directory=STATIC), name="static")
    routes = {r.path for r in app.routes if hasattr(r, "path")} | {"/openapi.json"}
    app.add_middleware(Guard, api_key=cfg.api_key, max_body=cfg.max_body_bytes, metrics=api.metrics, endpoints=routes,
                       body_timeout=body_timeout)
    return app

