"""What every command shares: flags generated from a job's dataclass, the model flags, loading a model.

`add_config_flags` is the one dataclass -> argparse translation: a flag per field, its type from
the field's annotation, its help from the field's metadata (training configs) or a help table,
its default from the field, so each default is written once. Nothing here is imported by the
library: the commands layer sits on top of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import LlamaforgeError
from ..generate import SamplingConfig
from ..llm import DEFAULT_MODEL

SAMPLING_HELP = {
    "max_new_tokens": "most tokens to generate",
    "temperature": "sampling temperature; 0 is greedy",
    "top_k": "keep the k most likely tokens (0: off)",
    "top_p": "nucleus sampling mass (1.0: off)",
    "min_p": "drop tokens below min_p x the most likely one's probability (0: off)",
    "repetition_penalty": "penalize tokens already seen (1.0: off)",
    "logit_bias": "add to token logits: 'ID:BIAS,ID:BIAS' or a JSON object (-100 bans a token)",
    "seed": "random seed for reproducible sampling",
    "stop": "stop when this string appears (repeatable)",
}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# One spelling per idea across commands: every output is --out/-o (--output kept), every model -m.
ALIASES = {"out": ("-o",), "output": ("--out", "-o"), "model": ("-m",)}


def _flag_type(f: dataclasses.Field) -> str:
    """'int', 'float', 'str', 'bool' or 'list' from an annotation such as 'float | None' or list[str]."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" ", "").replace("|None", "").replace("None|", "")
    return "list" if t.startswith("list") else t


def add_config_flags(p: argparse.ArgumentParser, cls, help: dict[str, str] | None = None, optional: bool = False,
                     skip: tuple[str, ...] = (), choices: dict[str, tuple] | None = None) -> None:
    """A `--flag-name` per field of the dataclass `cls`. `optional`: every default is None, so that
    `config_kwargs` passes on only the flags given (and the dataclass keeps its own defaults)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        flags = (flag, *(a for a in ALIASES.get(f.name, ()) if a not in p._option_string_actions))
        text = f.metadata.get("help") or (help or {}).get(f.name, "")
        default = None if optional else f.default
        if default is dataclasses.MISSING:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        shown = f.default if f.default is not dataclasses.MISSING else default
        kind = _flag_type(f)
        if kind == "bool":
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind == "list":
            p.add_argument(*flags, action="append", default=None, help=text)
        else:
            extra = {"choices": (choices or {})[f.name]} if f.name in (choices or {}) else {}
            suffix = "" if shown in (None, "", [], dataclasses.MISSING) else f" (default: {shown})"
            p.add_argument(*flags, type=_TYPES.get(kind, str), default=default, help=text + suffix, **extra)


def config_kwargs(args, cls) -> dict:
    """The parsed values of `cls`'s fields (those left at None dropped when the flags were `optional`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}


def config_from_args(args, cls):
    return cls(**config_kwargs(args, cls))


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, SamplingConfig, SAMPLING_HELP, optional=True)


def sampling_kwargs(args) -> dict:
    return {k: v for k, v in config_kwargs(args, SamplingConfig).items() if v is not None}


def add_model_flags(p: argparse.ArgumentParser, positional: bool = False, adapter: bool = True, tp: bool = False,
                    speculative: bool = False) -> None:
    """--model/-m (and with `positional`, the same as an optional first argument, the older spelling)."""
    if positional:
        p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help="same as --model")
    p.add_argument("--model", "-m", default=None if positional else DEFAULT_MODEL,
                   help=f"named model, GGUF file, HF or Meta directory (default: {DEFAULT_MODEL}; `llamaforge models` lists them)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / tokenizer.model to use instead of the model's own")
    p.add_argument("--chat-format", default=None, choices=["template", "chatml", "llama2", "llama3"], help="override the chat format")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_threads_flag(p)
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weights in memory: auto keeps GGUF blocks quantized (int4/int8), none dequantizes to float")
    p.add_argument("--decode", default=None, choices=["auto", "eager", "compile"],
                   help="how decode steps run: auto (default: the fused native step where the model allows, else eager), "
                        "eager (PyTorch ops), compile (torch.compile; float and int4/int8 models)")
    p.add_argument("--compile", action="store_true", help="same as --decode compile (slow first call, faster tokens)")
    if tp:
        p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor parallelism over N processes: "
                       "torchrun --nproc_per_node N -m llamaforge ... --tp N (see docs/parallel.md)")
    if speculative:
        add_speculative_flags(p)
    if adapter:
        p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA adapter to apply (`llamaforge finetune` output or PEFT layout)")


def positional_or_flag(args, positional: str, flag: str, name: str, default=None):
    """The value given as a positional argument (the older spelling) or as a flag, not both differently."""
    a, b = getattr(args, positional, None), getattr(args, flag, None)
    if a is not None and b is not None and a != b:
        raise LlamaforgeError(f"two {name}s given ({a!r} and {b!r}): pass one")
    value = a if a is not None else b if b is not None else default
    setattr(args, flag, value)
    return value


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", default="auto", choices=["auto", "lookup", "draft", "off"],
                   help="speculative decoding, exact: lookup drafts from the prompt's n-grams, draft from --draft-model; "
                        "auto: off (with the fused native decode step, a verified draft can part from plain greedy at a near-tie: docs/inference.md)")
    p.add_argument("--draft-model", default=None, metavar="M", help="a smaller model with the same tokenizer, for --speculative draft")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="CPU threads (default: the cores not busy with other work, at most 8; the choice is printed)")


def set_threads(args, quiet: bool = False) -> str:
    """Apply --threads, or choose from the free cores (threads.py); say what was chosen on stderr. -> the description."""
    from .. import threads
    n = getattr(args, "threads", None)
    if n is not None and n < 1:
        raise LlamaforgeError(f"--threads must be >= 1, got {n}")
    threads.use(n)
    text = threads.describe()
    if not quiet and n is None:
        print(f"[cpu: {text}; --threads N to change]", file=sys.stderr)
    return text


def load_llm(args, announce: bool = False, speculative: str = "off"):
    """The model the flags of `add_model_flags` name, with its decode mode and speculative decoding
    (`speculative`: what --speculative auto means for this command). `announce`: print the thread choice.
    With --tp N, ranks > 0 follow rank 0's model calls here and get None when it is done (parallel.load_parallel)."""
    from ..llm import load
    set_threads(args, quiet=not announce)
    mode = getattr(args, "speculative", "auto")
    draft_path = getattr(args, "draft_model", None)
    if getattr(args, "tp", 1) != 1:
        if mode not in ("auto", "off"):
            raise LlamaforgeError("--tp decodes one token per step: drop --speculative")
        return _load_parallel(args)
    mode = speculative if mode == "auto" else mode
    if mode == "draft" and not draft_path:
        raise LlamaforgeError("--speculative draft needs --draft-model M (a smaller model with the same tokenizer)")
    llm = load(args.model, tokenizer=args.tokenizer, chat_format=args.chat_format, device=args.device,
               quantize=getattr(args, "quantize", "auto"), adapter=getattr(args, "adapter", None))
    if getattr(args, "compile", False):
        llm.compile()
    elif getattr(args, "decode", None):
        llm.set_decode(args.decode)
    draft = load(draft_path, device=args.device) if mode == "draft" else None
    return llm.set_speculative(mode, draft)


def _load_parallel(args):
    if args.tp < 1:
        raise LlamaforgeError(f"--tp must be >= 1, got {args.tp}")
    if args.adapter or args.compile or args.decode not in (None, "auto", "eager"):
        raise LlamaforgeError("--tp runs eager decode steps without adapters: drop --adapter, --compile and --decode")
    from ..parallel import load_parallel
    return load_parallel(args.model, args.tp, tokenizer=args.tokenizer, chat_format=args.chat_format, device=args.device,
                         quantize=args.quantize)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
