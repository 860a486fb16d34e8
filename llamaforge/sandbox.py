"""Rendering untrusted Jinja templates (a model file's chat template) within bounds on time, memory,
output and recursion.

Jinja's sandbox (as transformers' `apply_chat_template` uses it) keeps a template from reaching
Python's internals, not from running for hours or building a 10 GB string. On top of it: operations
that multiply sizes are checked before they run, every value built is sized after, and the
template's own code is watched by a trace function for time and for the process's memory growth
(what accumulates across lines).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

RENDER_SECONDS = 2.0  # a real template renders in milliseconds
RENDER_CHARS = 1 << 18  # output, and any one value a template builds (as text)
RENDER_MEMORY = 512 << 20  # growth of the process's memory during one render
_MAX_INT = 100_000  # integer arguments (widths, counts, indents): Jinja's own range() limit
_UNTRUSTED = "<template>"  # the file name Jinja compiles templates from strings under


def _tojson(x, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson` filter for chat templates: not HTML-escaped, non-ASCII kept."""
    return json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


class TemplateLimit(Exception):
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
            raise TemplateLimit(f"it passes {a:,} to {name}")
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
        raise TemplateLimit(f"{name} would make {n:,} characters")


def _check_size(value):
    """A value a template built, at most RENDER_CHARS as text (a list of 10^5 references to one 1 MB string
    is 100 GB once joined or printed)."""
    if isinstance(value, (str, bytes, list, tuple, dict)) and _size(value, RENDER_CHARS) > RENDER_CHARS:
        raise TemplateLimit(f"it builds a value of more than {RENDER_CHARS:,} characters")
    return value


def bounded_environment():
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
                raise TemplateLimit(f"it computes {left} ** {right}")
            if operator == "*" and {type(left), type(right)} & {int} and {type(left), type(right)} & {str, list, tuple}:
                count, seq = (left, right) if isinstance(left, int) else (right, left)
                if _size(seq) * count > RENDER_CHARS:
                    raise TemplateLimit(f"it repeats a value {count:,} times")
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


def render_bounded(template, **context) -> str:
    """`template.render(**context)` within RENDER_SECONDS and RENDER_MEMORY (checked by a trace function: the
    clock at each Python call and at each line of the template's own code, memory at every 16th such line,
    as one line adds at most a few values of RENDER_CHARS), RENDER_CHARS of output and Python's recursion limit."""
    deadline, memory, lines = time.monotonic() + RENDER_SECONDS, _rss() + RENDER_MEMORY, [0]

    def on_line(frame, event, arg):
        lines[0] += 1
        if time.monotonic() > deadline:
            raise TemplateLimit(f"it runs longer than {RENDER_SECONDS:g} s")
        if lines[0] % 16 == 0 and _rss() > memory:
            raise TemplateLimit(f"it uses more than {RENDER_MEMORY >> 20} MB")
        return on_line

    def on_call(frame, event, arg):  # every Python call while rendering: Jinja's runtime and filters too
        if time.monotonic() > deadline:
            raise TemplateLimit(f"it runs longer than {RENDER_SECONDS:g} s")
        return on_line if frame.f_code.co_filename == _UNTRUSTED else None

    out, n, previous = [], 0, sys.gettrace()
    sys.settrace(on_call)
    try:
        for piece in template.generate(**context):
            n += len(piece)
            if n > RENDER_CHARS:
                raise TemplateLimit(f"its output passes {RENDER_CHARS:,} characters")
            out.append(piece)
    except RecursionError:
        raise TemplateLimit("it recurses too deeply") from None
    except MemoryError:
        raise TemplateLimit("it ran out of memory") from None
    finally:
        sys.settrace(previous)
    return "".join(out)
