"""Chat formats: messages -> token ids, plus an assistant-only loss mask for fine-tuning.

Special tokens go in by id, never by pasting user text into a string that is re-tokenized
(llama-models `ChatFormat`): message content is never searched for special-token strings, so a
user who types "<|im_end|>" gets those characters, not the token.

- `JinjaChat`: the model's own template (GGUF `tokenizer.chat_template` or tokenizer_config.json),
  rendered in Jinja's sandbox (as transformers' `apply_chat_template`) with a marker in place of
  each message's content. Special-token strings are parsed in the template's text only; the text
  between two special tokens (template and content together) goes through the BPE as one run, so
  the ids equal those of tokenizing the rendered string, as transformers and llama.cpp do.
- `Llama2Chat`: Meta's `[INST]`/`<<SYS>>` format (llama `chat_completion`); `Llama3Chat`: the
  header-id format (llama3 `ChatFormat`). Both follow Meta's construction token for token.

The mask is True for the assistant's content and for the template tokens after it up to and
including its end-of-turn token (the model must learn to stop), False elsewhere.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime

from .errors import LlamaforgeError
from .sandbox import TemplateLimit, bounded_environment, render_bounded
from .tokenizer import Tokenizer

Messages = list[dict]

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ROLES = ("system", "user", "assistant", "tool", "ipython")


def _check(messages: Messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise LlamaforgeError("messages must be a non-empty list of {'role', 'content'} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LlamaforgeError(f"bad chat message {m!r:.80}: each needs a role ({'/'.join(ROLES)}) and a string content")


def _need_specials(tok: Tokenizer, fmt: str, names: tuple[str, ...]) -> dict[str, int]:
    missing = [n for n in names if n not in tok.specials]
    if missing:
        raise LlamaforgeError(f"chat format {fmt} needs special tokens {', '.join(missing)}, which this tokenizer lacks: "
                              "pick the model's own format (--chat-format)")
    return {n: tok.specials[n] for n in names}


class ChatFormat:
    name = "?"
    accepts_tools = False  # the template renders a `tools` list itself (Llama 3.1, Hermes, Qwen templates)

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def encode(self, messages: Messages, add_generation_prompt: bool = True) -> tuple[list[int], list[bool]]:
        """-> (ids, mask) where mask[i] is True for tokens the assistant wrote (content + end of turn)."""
        raise NotImplementedError

    def encode_prompt(self, messages: Messages, tools: list[dict] | None = None) -> list[int]:
        if tools and not self.accepts_tools:
            raise LlamaforgeError(f"chat format {self.name} does not render tools: use chat.tool_chat's built-in format")
        return self.encode(messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))[0]


class JinjaChat(ChatFormat):
    name = "template"
    # Each content is rendered as PAD \ue000 i \ue001 PAD. PAD is U+2028, whitespace to Python's
    # str.strip (Jinja's `trim`) but never in a template: a missing PAD means the template trimmed.
    _PAD = "\u2028"
    _MARK = re.compile("(\u2028?)\ue000(\\d+)\ue001(\u2028?)")

    def __init__(self, tokenizer: Tokenizer, template: str):
        super().__init__(tokenizer)
        from jinja2 import nodes

        def raise_exception(msg):
            raise LlamaforgeError(f"chat template: {msg}")

        # transformers' environment: trim/lstrip blocks, loop controls, its tojson and helpers; bounded
        env = bounded_environment()
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        fix = "pass --chat-format chatml|llama2|llama3"
        if not isinstance(template, str):
            raise LlamaforgeError(f"the model's chat template is a {type(template).__name__}, not text; {fix}")
        try:
            tree = env.parse(template)
            reads = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import", nodes.Extends: "extends"}
            other = next(tree.find_all(tuple(reads)), None)
            if other is not None:
                raise LlamaforgeError(f"the model's chat template uses {{% {reads[type(other)]} %}}, which would read other "
                                      f"template files; llamaforge renders self-contained templates only: {fix}")
            self.template = env.from_string(tree)
            from jinja2 import meta
            self.accepts_tools = "tools" in meta.find_undeclared_variables(tree)
        except LlamaforgeError:
            raise
        except Exception as e:  # noqa: BLE001 - TemplateSyntaxError, or RecursionError/MemoryError from a pathological one
            msg = " ".join(str(e).split())[:200]
            raise LlamaforgeError(f"the model's chat template does not parse ({type(e).__name__}: {msg}); {fix}") from None
        self.source = template

    def render(self, messages: Messages, add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The template's text with each content as a marker (see `_MARK`); `tools` go to templates that take them."""
        _check(messages)
        # an empty content beside tool calls stays empty: templates test it (`if message.content`)
        marked = [dict(m, content=f"{self._PAD}\ue000{i}\ue001{self._PAD}" if m["content"] or not m.get("tool_calls") else "")
                  for i, m in enumerate(messages)]
        extra = {"tools": tools} if tools else {}
        tok = self.tok
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        try:
            return render_bounded(self.template, messages=marked, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos, eos_token=eos, **extra)
        except LlamaforgeError:  # the template's own raise_exception
            raise
        except TemplateLimit as e:
            raise LlamaforgeError(f"the model's chat template was stopped: {e}; pass --chat-format chatml|llama2|llama3") from None
        except Exception as e:  # noqa: BLE001 - TemplateError, or any Python error the template's code raised
            msg = " ".join(str(e).split())[:200]
            raise LlamaforgeError(f"the chat template failed on these messages ({type(e).__name__}: {msg})") from None

    def encode(self, messages, add_generation_prompt=True, tools=None):
        text = self.render(messages, add_generation_prompt, tools)
        # Pieces of the final text: (str, special id or None, message index or None for template text).
        pieces, pos = [], 0
        for m in self._MARK.finditer(text):
            pieces += [(p, sid, None) for p, sid in self.tok.split_special(text[pos:m.start()])]
            i = int(m.group(2))
            content = messages[i]["content"]
            if not m.group(1):  # the template stripped our padding, so it strips the content too
                content = content.lstrip()
            if not m.group(3):
                content = content.rstrip()
            pieces.append((content, None, i))
            pos = m.end()
        pieces += [(p, sid, None) for p, sid in self.tok.split_special(text[pos:])]
        ids, owner, spans, starts = self._tokenize(pieces)
        return ids, self._mask(ids, owner, starts, spans, messages)

    def _tokenize(self, pieces):
        """Specials by id; each run of text between them through the BPE whole, tracking which
        message each token came from (by character offsets in the final text)."""
        ids, owner, starts, spans = [], [], [], []  # spans: (start, end, message index) of each content
        run, run_start, at = [], 0, 0

        def flush():
            s = "".join(run)
            for t, a, b in self.tok.encode_with_offsets(s) if s else []:
                a, b = a + run_start, max(b, a + 1) + run_start  # zero-width (dummy prefix): its start char
                ids.append(t)
                starts.append(a)
                # a token straddling template text and content belongs to the content
                owner.append(next((i for sa, sb, i in spans if sa < b and a < sb), None))
            run.clear()

        for text, sid, msg in pieces:
            if sid is not None:
                flush()
                ids.append(sid)
                owner.append(None)
                starts.append(at)
                at += len(text)
                run_start = at
                continue
            if msg is not None:
                spans.append((at, at + len(text), msg))
            run.append(text)
            at += len(text)
        flush()
        return ids, owner, spans, starts

    def _mask(self, ids, owner, starts, spans, messages):
        mask = [o is not None and messages[o]["role"] == "assistant" for o in owner]
        for _, end, i in spans:
            if messages[i]["role"] != "assistant":
                continue
            # template tokens after this content, up to its end-of-turn token, are the assistant's too
            k = next((k for k, s in enumerate(starts) if s >= end and owner[k] != i), len(ids))
            marked = []
            while k < len(ids) and owner[k] is None:
                marked.append(k)
                if ids[k] in self.tok.stop_ids:
                    break
                k += 1
            else:
                marked = []  # another message (or the end) came first: no end-of-turn to learn
            for k in marked:
                mask[k] = True
        return mask


class Llama3Chat(ChatFormat):
    """<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>... (llama3 `ChatFormat`)."""
    name = "llama3"
    _NEEDS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.sid = _need_specials(tokenizer, self.name, self._NEEDS)

    def encode(self, messages, add_generation_prompt=True):
        _check(messages)
        tok, sid = self.tok, self.sid
        ids, mask = [sid["<|begin_of_text|>"]], [False]

        def header(role):
            h = [sid["<|start_header_id|>"]] + tok.encode(role, bos=False) + [sid["<|end_header_id|>"]] + tok.encode("\n\n", bos=False)
            ids.extend(h)
            mask.extend([False] * len(h))

        for m in messages:
            header(m["role"])
            body = tok.encode(m["content"].strip(), bos=False) + [sid["<|eot_id|>"]]
            ids.extend(body)
            mask.extend([m["role"] == "assistant"] * len(body))
        if add_generation_prompt:
            header("assistant")
        return ids, mask


class Llama2Chat(ChatFormat):
    """Meta's Llama 2 chat: <s>[INST] <<SYS>>\\nsys\\n<</SYS>>\\n\\nuser [/INST] answer </s> (llama `chat_completion`).

    Each (user, answer) pair is encode(f"[INST] {user} [/INST] {answer} ", bos, eos); the last user
    turn is encode(f"[INST] {user} [/INST]", bos). The format always ends in the prompt for the
    next answer, so `add_generation_prompt` changes nothing.
    """
    name = "llama2"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise LlamaforgeError("chat format llama2 needs a tokenizer with BOS and EOS tokens: "
                                  "pick the model's own format (--chat-format)")

    def encode(self, messages, add_generation_prompt=True):
        _check(messages)
        tok = self.tok
        if messages[0]["role"] == "system":
            rest = list(messages[1:]) or [{"role": "user", "content": ""}]
            rest[0] = dict(rest[0], content=f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{rest[0]['content']}")
            messages = rest
        roles = [m["role"] for m in messages]
        if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
            raise LlamaforgeError(f"Llama 2 chat needs turns in the order (system), user, assistant, user, ...; got {roles}")
        ids, mask = [], []
        for i in range(0, len(messages), 2):
            prompt = f"[INST] {messages[i]['content'].strip()} [/INST]"
            if i + 1 < len(messages):
                answer = messages[i + 1]["content"].strip()
                full = tok.encode_with_offsets(f"{prompt} {answer} ")
                # as JinjaChat: tokens touching the answer, then the template's " " and EOS after it
                c0, c1 = len(prompt) + 1, len(prompt) + 1 + len(answer)
                ids += [tok.bos_id] + [t for t, _, _ in full] + [tok.eos_id]
                mask += [False] + [(a < c1 and max(b, a + 1) > c0) or a >= c1 for _, a, b in full] + [True]
            else:
                part = tok.encode(prompt, bos=True)
                ids += part
                mask += [False] * len(part)
        return ids, mask


FORMATS = {"chatml": None, "llama2": Llama2Chat, "llama3": Llama3Chat, "template": None}


def chat_format_for(tokenizer: Tokenizer, template: str | None = None, name: str | None = None) -> ChatFormat:
    """Pick the chat format: an explicit name, else the model's template, else by special tokens."""
    if name is not None and name not in FORMATS:
        raise LlamaforgeError(f"unknown chat format {name!r}; known: {', '.join(FORMATS)}")
    if name == "template" and not template:
        raise LlamaforgeError("this model has no chat template; pass --chat-format chatml|llama2|llama3")
    if name in (None, "template") and template:
        return JinjaChat(tokenizer, template)
    if name == "llama3" or (name is None and "<|start_header_id|>" in tokenizer.specials):
        return Llama3Chat(tokenizer)
    if name == "llama2" or (name is None and tokenizer.kind == "sentencepiece"):
        return Llama2Chat(tokenizer)
    if name == "chatml" or "<|im_start|>" in tokenizer.specials:
        _need_specials(tokenizer, "chatml", ("<|im_start|>", "<|im_end|>"))
        return JinjaChat(tokenizer, CHATML_TEMPLATE)
    raise LlamaforgeError("cannot tell this model's chat format: pass --chat-format chatml|llama2|llama3")


# ---- tools (function calling) ----
# A template that takes `tools` renders them itself (Llama 3.1, Hermes, Qwen); otherwise the built-in
# format (Hermes/Qwen2.5's, which many small models have seen): a system block listing the functions
# as JSON inside <tools></tools>, calls written as <tool_call>{"name", "arguments"}</tool_call>, and
# results given back as a user turn of <tool_response></tool_response> blocks.

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOLS_PROMPT = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def check_tools(tools) -> list[dict]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]),
    checked, with a missing `parameters` made an empty object schema."""
    if not isinstance(tools, list) or not tools:
        raise LlamaforgeError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    out, names = [], set()
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise LlamaforgeError(f"bad tool {t!r:.80}: each is {{'type': 'function', 'function': {{'name': 'a_z-09 (1-64)', ...}}}}")
        if name in names:
            raise LlamaforgeError(f"two tools are named {name!r}: tool names must be unique")
        names.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        elif not isinstance(params, dict):
            raise LlamaforgeError(f"tool {name!r}: parameters must be a JSON Schema object")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def tool_call_style(fmt: ChatFormat) -> str:
    """How the model writes calls: 'tagged' (<tool_call>{"name", "arguments"}</tool_call>: the built-in
    format, Hermes, Qwen) or 'json' (a bare {"name", "parameters"} object: Llama 3.1's template)."""
    return "json" if fmt.accepts_tools and CALL_OPEN not in getattr(fmt, "source", "") else "tagged"


def _arguments(call: dict):
    args = call.get("function", {}).get("arguments", "{}")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except ValueError:
        return args


def tool_chat(fmt: ChatFormat, messages: Messages, tools: list[dict] | None) -> tuple[Messages, list[dict] | None]:
    """OpenAI messages (assistant `tool_calls`, `tool` results) and tools -> (messages, tools) for `fmt`:
    a template that takes tools gets them and the calls as data (arguments parsed, as HF templates
    expect); any other gets the built-in format as plain text."""
    names = {c.get("id"): c.get("function", {}).get("name") for m in messages for c in m.get("tool_calls") or []}
    if fmt.accepts_tools:
        out = []
        for m in messages:
            m = dict(m, content=m.get("content") or "")
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c)}} for c in m["tool_calls"]]
            if m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in names:
                m["name"] = names[m["tool_call_id"]]
            out.append(m)
        return out, tools or None
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [f"{CALL_OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _arguments(c)}, ensure_ascii=False)}\n{CALL_CLOSE}"
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": m["role"], "content": content})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tools:
        block = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


def parse_tool_calls(text: str, style: str, names) -> tuple[str | None, list[dict]]:
    """The model's whole answer -> (content or None, calls as {"name", "arguments": JSON string})."""
    ts = ToolCallStream(style, names)
    content, calls = ts.feed(text)
    more, late = ts.finish()
    return (content + more).strip() or None, calls + late


class ToolCallStream:
    """Splits an answer, piece by piece, into content and tool calls as soon as each is certain:
    `feed(piece)` and `finish()` return (content text, calls). Tagged style: text before and between
    <tool_call> blocks is content (a possible start of a tag is held back); each block whose JSON names
    a known function is a call, others stay content; an unclosed block at the end counts if it parses.
    JSON style: an answer that starts with '{' or '[' (or <|python_tag|>) is held to the end and is
    calls if it parses as them. Whitespace-only content is held until more text follows it."""

    def __init__(self, style: str, names):
        self.style, self.names = style, set(names)
        self.buf, self.in_call, self.space, self.started = "", False, "", False

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        self.buf += piece
        if self.style == "json":
            head = self.buf.lstrip()
            if not self.started and head:
                self.started = True
                self.in_call = head.startswith(("{", "[", "<|python_tag|>"))
            if self.in_call or not head:
                return "", []
            out, self.buf = self.buf, ""
            return self._content(out), []
        text, calls = "", []
        while True:
            if not self.in_call:
                i = self.buf.find(CALL_OPEN)
                if i < 0:
                    keep = next((k for k in range(min(len(CALL_OPEN) - 1, len(self.buf)), 0, -1)
                                 if CALL_OPEN.startswith(self.buf[-k:])), 0)
                    text += self._content(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return text, calls
                text += self._content(self.buf[:i])
                self.buf, self.in_call = self.buf[i:], True
            j = self.buf.find(CALL_CLOSE)
            if j < 0:
                return text, calls
            block, self.buf, self.in_call = self.buf[:j + len(CALL_CLOSE)], self.buf[j + len(CALL_CLOSE):], False
            call = _call(block[len(CALL_OPEN):-len(CALL_CLOSE)].strip(), self.names)
            if call is None:
                text += self._content(block)
            else:
                calls.append(call)
                self.space = ""  # the whitespace between calls is layout, not content

    def finish(self) -> tuple[str, list[dict]]:
        rest, self.buf = self.buf, ""
        if self.in_call:
            body = rest.strip()
            if self.style == "json":
                body = body.removeprefix("<|python_tag|>").strip()
                try:
                    found = json.loads(body)
                except ValueError:
                    found = None
                calls = [_call(o, self.names) for o in (found if isinstance(found, list) else [found])]
                if calls and all(calls):
                    return "", calls
            else:
                call = _call(body[len(CALL_OPEN):].strip(), self.names)
                if call is not None:
                    return "", [call]
        return self._content(rest), []

    def _content(self, text: str) -> str:
        """Content, with whitespace-only runs held until something else follows them."""
        if not text:
            return ""
        if not text.strip():
            self.space += text
            return ""
        text, self.space = self.space + text, ""
        return text


def _call(obj, names) -> dict | None:
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError:
            return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}


def tool_call_grammar(tools: list[dict], style: str, name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's, with %json schemas) whose sentences are calls to `tools` (only
    `name` when given) in `style`: one call, or with `parallel` one or more separated by newlines."""
    from .constrain import JSON_OPTIONS
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    key = "arguments" if style == "tagged" else "parameters"
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
                         "required": ["name", key], "additionalProperties": False} for f in chosen],
              "x-guidance": JSON_OPTIONS}
    if style == "json":
        return f"start: %json {json.dumps(schema)}\n"
    more = ' ("\\n" call)*' if parallel and name is None else ""
    return f'start: call{more}\ncall: "{CALL_OPEN}\\n" %json {json.dumps(schema)} "\\n{CALL_CLOSE}"\n'


@dataclass
class ToolPlan:
    """What a tool_choice means for one request: render the tools? parse calls from the answer
    (`names`: the callable functions)? constrain it (`grammar`: calls only, for required / a name)?"""
    render: bool
    parse: bool
    names: set
    grammar: object = None  # constrain.Grammar


def tool_plan(tok, fmt, tools: list[dict], choice="auto", parallel: bool = True) -> ToolPlan:
    """tool_choice: "auto", "none", "required", a function name, or OpenAI's {"type": "function",
    "function": {"name"}}; an unknown name raises LlamaforgeError."""
    names = {t["function"]["name"] for t in tools}
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if choice is None:
            raise LlamaforgeError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
    if choice == "none":
        return ToolPlan(False, False, names)
    if choice == "auto":
        return ToolPlan(True, True, names)
    if choice != "required" and choice not in names:
        raise LlamaforgeError(f"tool_choice names {choice!r}, which is not among the tools ({', '.join(sorted(names))})")
    from .constrain import Grammar, grammar_source
    lark = tool_call_grammar(tools, tool_call_style(fmt), None if choice == "required" else choice, parallel)
    return ToolPlan(True, True, names, Grammar(tok, grammar_source(lark=lark), "tools' parameter schemas"))


def with_ids(calls: list[dict]) -> list[dict]:
    """Parsed calls ({"name", "arguments"}) -> OpenAI's tool_calls, each with a fresh id."""
    import secrets
    return [{"id": "call_" + secrets.token_hex(12), "type": "function", "function": c} for c in calls]
