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
import os
import re
import sys
import time
from datetime import datetime

from .errors import LlamaforgeError
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

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def encode(self, messages: Messages, add_generation_prompt: bool = True) -> tuple[list[int], list[bool]]:
        """-> (ids, mask) where mask[i] is True for tokens the assistant wrote (content + end of turn)."""
        raise NotImplementedError

    def encode_prompt(self, messages: Messages) -> list[int]:
        return self.encode(messages, add_generation_prompt=True)[0]


def _tojson(x, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


# ---- a bounded render: a chat template comes from a model file, so it is untrusted code ----
# Jinja's sandbox keeps a template from reaching Python's internals, not from running for hours or
# building a 10 GB string. On top of it: operations that multiply sizes are checked before they run,
# every value built is sized after, and the template's own code is watched line by line for time and
# for the process's memory growth (what accumulates across lines).

RENDER_SECONDS = 2.0  # a real template renders in milliseconds
RENDER_CHARS = 1 << 18  # output, and any one value a template builds (as text)
RENDER_MEMORY = 512 << 20  # growth of the process's memory during one render
_MAX_INT = 100_000  # integer arguments (widths, counts, indents): Jinja's own range() limit
_UNTRUSTED = "<template>"  # the file name Jinja compiles templates from strings under


class _TemplateLimit(Exception):
    """A chat template went past a render bound."""


def _size(x, limit: int = 1 << 62) -> int:
    """About how many characters `x` is as text (counting stops past `limit`). A loop, not recursion: it
    runs on every value a template builds, under the render's trace function."""
    n, stack = 0, [x]
    while stack and n <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            n += len(v)
        elif isinstance(v, dict):
            n += 4 * len(v) + 2
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, (list, tuple)):
            n += 2 * len(v) + 2
            stack += v
        else:
            n += 24
    return n


def _depth(x) -> int:
    depth, level = 0, [x]
    while level := [c for v in level if isinstance(v, (dict, list, tuple)) for c in (v.values() if isinstance(v, dict) else v)]:
        depth += 1
    return depth


def _check_call(name: str, s, args: tuple, kwargs: dict) -> None:
    """Before a str method or filter `name` runs on `s` (its text, or the filter's value) with `args`:
    integer arguments are bounded, and the calls that multiply sizes (replace, join, format, %,
    indent, expandtabs, tojson) by the output they would make."""
    def arg(i, key, default):
        return args[i] if len(args) > i else kwargs.get(key, default)
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_INT:
            raise _TemplateLimit(f"it passes {a:,} to {name}")
    if name in ("do_join", "_tojson") and isinstance(s, (list, tuple, dict)):  # seq|join(sep), x|tojson(indent=)
        sep, indent = (arg(0, "d", ""), 0) if name == "do_join" else ("", arg(0, "indent", 0) or 0)
        seps = "".join(map(str, arg(1, "separators", None) or ())) if name == "_tojson" else ""
        n = _size(s) + (len(s) if name == "do_join" else _size(s)) * (len(str(sep)) + len(seps) + _depth(s) * indent)
    elif not isinstance(s, str):
        return
    else:
        n = len(s)
    if name in ("replace", "do_replace"):
        old, new = str(arg(0, "old", "")), str(arg(1, "new", ""))
        n += (len(s) + 1 if not old else s.count(old)) * max(len(new) - len(old), 0)
    elif name in ("format", "format_map", "do_format", "%"):
        for w in re.findall(r"\d{6,}", s):  # field widths are allocations: '{:>10000000000}'
            n = max(n, int(w))
        n += (s.count("{") + s.count("%")) * max([_size(a) for a in (*args, *kwargs.values())] + [0])
    elif name == "do_indent":
        width = arg(0, "width", 4)
        n += (s.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))
    elif name == "expandtabs":
        n += s.count("\t") * abs(arg(0, "tabsize", 8))
    elif name == "join":  # sep.join(seq): s is the separator
        seq = arg(0, "iterable", ())
        if isinstance(seq, (list, tuple, str, dict)):
            n = _size(seq) + len(s) * len(seq)
    if n > RENDER_CHARS:
        raise _TemplateLimit(f"{name} would make {n:,} characters")


def _check_size(value):
    """A value a template built, at most RENDER_CHARS as text (a list of 10^5 references to one 1 MB string
    is 100 GB once joined or printed)."""
    if isinstance(value, (str, bytes, list, tuple, dict)) and _size(value, RENDER_CHARS) > RENDER_CHARS:
        raise _TemplateLimit(f"it builds a value of more than {RENDER_CHARS:,} characters")
    return value


def _bounded_environment():
    """Jinja's immutable sandbox (as transformers' `apply_chat_template`) with `*`, `**`, `%` and `+`,
    every call and every filter checked before (`_check_call`) and sized after (`_check_size`)."""
    import functools

    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context, operator, left, right):
            if operator == "%" and isinstance(left, str):
                _check_call("%", left, right if isinstance(right, tuple) else (right,), {})
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                    abs(right) * max(abs(left), 2).bit_length() > 8 * RENDER_CHARS:
                raise _TemplateLimit(f"it computes {left} ** {right}")
            if operator == "*" and {type(left), type(right)} & {int} and {type(left), type(right)} & {str, list, tuple}:
                count, seq = (left, right) if isinstance(left, int) else (right, left)
                if _size(seq) * count > RENDER_CHARS:
                    raise _TemplateLimit(f"it repeats a value {count:,} times")
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
            method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
            name = getattr(method, "__name__", "a function")
            if name == "join" and args and not isinstance(args[0], (list, tuple, dict, str)):
                args = (list(args[0]), *args[1:])  # a generator: counted before str.join makes one string of it
            _check_call(name, getattr(method, "__self__", None), args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    def bounded(f):
        skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # the context / environment Jinja passes first

        @functools.wraps(f)  # keeps that mark
        def run(*args, **kwargs):
            if f.__name__ == "do_join" and len(args) > skip and not isinstance(args[skip], (list, tuple, dict, str)):
                args = (*args[:skip], list(args[skip]), *args[skip + 1:])
            _check_call(f.__name__, args[skip] if len(args) > skip else None, args[skip + 1:], kwargs)
            return _check_size(f(*args, **kwargs))
        return run

    class Sized(CodeGenerator):
        """Values no call or operator makes are sized too: list, tuple and dict literals, and the operands
        of `a ~ b` before they are joined into one string."""

        def _sized(self, visit, node, frame):
            self.write("environment.sized(")
            visit(node, frame)
            self.write(")")

        def visit_List(self, node, frame):
            self._sized(super().visit_List, node, frame)

        def visit_Dict(self, node, frame):
            self._sized(super().visit_Dict, node, frame)

        def visit_Tuple(self, node, frame):
            if node.ctx != "load":  # an assignment target (`{% for a, b in ... %}`)
                return super().visit_Tuple(node, frame)
            self._sized(super().visit_Tuple, node, frame)

        def visit_Concat(self, node, frame):
            self.write("environment.sized(str_join((")
            for arg in node.nodes:
                self._sized(self.visit, arg, frame)
                self.write(", ")
            self.write(")))")

    Bounded.code_generator_class, Bounded.sized = Sized, staticmethod(_check_size)
    # finalize: each {{ value }} is sized before it is turned into text
    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"], finalize=_check_size)
    env.filters["tojson"] = _tojson
    env.filters.update({name: bounded(f) for name, f in env.filters.items()})
    return env


def _rss() -> int:
    """This process's resident memory in bytes (peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _render_bounded(template, **context) -> str:
    """`template.render(**context)` within RENDER_SECONDS and RENDER_MEMORY (checked by a trace function: the
    clock at each Python call and at each line of the template's own code, memory at every 16th such line,
    as one line adds at most a few values of RENDER_CHARS), RENDER_CHARS of output and Python's recursion limit."""
    deadline, memory, lines = time.monotonic() + RENDER_SECONDS, _rss() + RENDER_MEMORY, [0]

    def on_line(frame, event, arg):
        lines[0] += 1
        if time.monotonic() > deadline:
            raise _TemplateLimit(f"it runs longer than {RENDER_SECONDS:g} s")
        if lines[0] % 16 == 0 and _rss() > memory:
            raise _TemplateLimit(f"it uses more than {RENDER_MEMORY >> 20} MB")
        return on_line

    def on_call(frame, event, arg):  # every Python call while rendering: Jinja's runtime and filters too
        if time.monotonic() > deadline:
            raise _TemplateLimit(f"it runs longer than {RENDER_SECONDS:g} s")
        return on_line if frame.f_code.co_filename == _UNTRUSTED else None

    out, n, previous = [], 0, sys.gettrace()
    sys.settrace(on_call)
    try:
        for piece in template.generate(**context):
            n += len(piece)
            if n > RENDER_CHARS:
                raise _TemplateLimit(f"its output passes {RENDER_CHARS:,} characters")
            out.append(piece)
    except RecursionError:
        raise _TemplateLimit("it recurses too deeply") from None
    except MemoryError:
        raise _TemplateLimit("it ran out of memory") from None
    finally:
        sys.settrace(previous)
    return "".join(out)


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
        env = _bounded_environment()
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        fix = "pass --chat-format chatml|llama2|llama3"
        if not isinstance(template, str):
            raise LlamaforgeError(f"the model's chat template is a {type(template).__name__}, not text; {fix}")
        try:
            tree = env.parse(template)
            other = next(tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)), None)
            if other is not None:
                raise LlamaforgeError(f"the model's chat template uses {{% {type(other).__name__.lower()} %}}, which would read "
                                      f"other template files; llamaforge renders self-contained templates only: {fix}")
            self.template = env.from_string(tree)
        except LlamaforgeError:
            raise
        except Exception as e:  # noqa: BLE001 - TemplateSyntaxError, or RecursionError/MemoryError from a pathological one
            msg = " ".join(str(e).split())[:200]
            raise LlamaforgeError(f"the model's chat template does not parse ({type(e).__name__}: {msg}); {fix}") from None
        self.source = template

    def render(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The template's text with each content as a marker (see `_MARK`)."""
        _check(messages)
        marked = [dict(m, content=f"{self._PAD}\ue000{i}\ue001{self._PAD}") for i, m in enumerate(messages)]
        tok = self.tok
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        try:
            return _render_bounded(self.template, messages=marked, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos, eos_token=eos)
        except LlamaforgeError:  # the template's own raise_exception
            raise
        except _TemplateLimit as e:
            raise LlamaforgeError(f"the model's chat template was stopped: {e}; pass --chat-format chatml|llama2|llama3") from None
        except Exception as e:  # noqa: BLE001 - TemplateError, or any Python error the template's code raised
            msg = " ".join(str(e).split())[:200]
            raise LlamaforgeError(f"the chat template failed on these messages ({type(e).__name__}: {msg})") from None

    def encode(self, messages, add_generation_prompt=True):
        text = self.render(messages, add_generation_prompt)
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
