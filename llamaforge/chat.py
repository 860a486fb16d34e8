"""Chat formats: messages -> token ids, plus an assistant-only loss mask for fine-tuning.

Special tokens go in by id, never by pasting user text into a string that is re-tokenized
(llama-models `ChatFormat`): message content is always encoded with special-token parsing off,
so a user who types "<|im_end|>" gets those characters, not the token.

- `JinjaChat`: the model's own template (GGUF `tokenizer.chat_template` or tokenizer_config.json),
  rendered in Jinja's sandbox with a marker in place of each message's content; the rendered
  template text is tokenized with special tokens on, the contents with them off.
- `Llama2Chat`: Meta's `[INST]`/`<<SYS>>` format; `Llama3Chat`: the header-id format.
"""
from __future__ import annotations

import re
from datetime import datetime

from .errors import LlamaforgeError
from .tokenizer import Tokenizer

Messages = list[dict]

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _check(messages: Messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise LlamaforgeError("messages must be a non-empty list of {'role', 'content'} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(m.get("content"), str):
            raise LlamaforgeError(f"bad chat message {m!r}: each needs a role (system/user/assistant) and a string content")


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
    _MARK = re.compile(r"( ?)\ue000(\d+)\ue001( ?)")

    def __init__(self, tokenizer: Tokenizer, template: str):
        super().__init__(tokenizer)
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise LlamaforgeError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise LlamaforgeError(f"the model's chat template does not parse ({e}); pass --chat-format chatml|llama2|llama3") from None
        self.source = template

    def encode(self, messages, add_generation_prompt=True):
        _check(messages)
        from jinja2 import TemplateError
        marked = [dict(m, content=f" \ue000{i}\ue001 ") for i, m in enumerate(messages)]
        tok = self.tok
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        try:
            text = self.template.render(messages=marked, add_generation_prompt=add_generation_prompt,
                                        bos_token=bos, eos_token=eos)
        except TemplateError as e:
            raise LlamaforgeError(f"the chat template failed on these messages: {e}") from None
        ids, mask, pending = [], [], False  # pending: inside an assistant turn, until its end-of-turn token
        pos = 0
        for m in self._MARK.finditer(text):
            self._template_part(text[pos:m.start()], ids, mask, pending)
            pending = False
            msg = messages[int(m.group(2))]
            trimmed = not (m.group(1) and m.group(3))  # the template stripped our padding: strip the content too
            content = msg["content"].strip() if trimmed else msg["content"]
            part = tok.encode(content, bos=False)
            ids += part
            is_asst = msg["role"] == "assistant"
            mask += [is_asst] * len(part)
            pending = is_asst
            pos = m.end()
        self._template_part(text[pos:], ids, mask, pending)
        return ids, mask

    def _template_part(self, text, ids, mask, pending):
        part = self.tok.encode(text, bos=False, special=True)
        for t in part:
            ids.append(t)
            mask.append(pending)
            if pending and t in self.tok.stop_ids:
                pending = False
        if pending:  # no end-of-turn token found: only the content counts
            for j in range(len(mask) - len(part), len(mask)):
                mask[j] = False


class Llama3Chat(ChatFormat):
    """<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>... (llama-models ChatFormat)."""
    name = "llama3"

    def encode(self, messages, add_generation_prompt=True):
        _check(messages)
        tok, sid = self.tok, self.tok.specials
        ids, mask = [tok.bos_id], [False]

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
    """Meta's Llama 2 chat: <s>[INST] <<SYS>>\\nsys\\n<</SYS>>\\n\\nuser [/INST] answer </s> (llama `chat_completion`)."""
    name = "llama2"

    def encode(self, messages, add_generation_prompt=True):
        _check(messages)
        tok = self.tok
        if messages[0]["role"] == "system":
            rest = list(messages[1:])
            if not rest:
                rest = [{"role": "user", "content": ""}]
            rest[0] = dict(rest[0], content=f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{rest[0]['content']}")
            messages = rest
        ids, mask = [], []
        for i in range(0, len(messages), 2):
            user = messages[i]
            if user["role"] != "user":
                raise LlamaforgeError("Llama 2 chat needs turns in the order (system), user, assistant, user, ...")
            prompt = f"[INST] {user['content'].strip()} [/INST]"
            if i + 1 < len(messages):
                p_ids = tok.encode(prompt, bos=True)
                full = tok.encode(f"{prompt} {messages[i + 1]['content'].strip()} ", bos=True, eos=True)
                n = len(p_ids) if full[:len(p_ids)] == p_ids else len(p_ids) - 1
                ids += full
                mask += [False] * n + [True] * (len(full) - n)
            elif add_generation_prompt:
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
        return JinjaChat(tokenizer, CHATML_TEMPLATE)
    raise LlamaforgeError("cannot tell this model's chat format: pass --chat-format chatml|llama2|llama3")
