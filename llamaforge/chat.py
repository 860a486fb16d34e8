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

import re
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

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def encode(self, messages: Messages, add_generation_prompt: bool = True) -> tuple[list[int], list[bool]]:
        """-> (ids, mask) where mask[i] is True for tokens the assistant wrote (content + end of turn)."""
        raise NotImplementedError

    def encode_prompt(self, messages: Messages) -> list[int]:
        return self.encode(messages, add_generation_prompt=True)[0]


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
            return render_bounded(self.template, messages=marked, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos, eos_token=eos)
        except LlamaforgeError:  # the template's own raise_exception
            raise
        except TemplateLimit as e:
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
