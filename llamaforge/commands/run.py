"""`llamaforge chat | generate | info | convert | quantize`: run a model, look at it, write it in another format."""
from __future__ import annotations

import os
import sys
import time

from ..errors import LlamaforgeError
from .common import add_model_flags, add_sampling_flags, load_llm, sampling_kwargs, write


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
        print(f"[{len(ids)} prompt tokens, {n} pieces in {dt:.2f}s]", file=sys.stderr)


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
    llm = load_llm(args, speculative="lookup" if rag else "off")
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
        print(f"llamaforge chat with {llm.config.name or args.model} — /reset clears the history, /exit quits", file=sys.stderr)
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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def cmd_info(args) -> None:
    from ..config import matching_configs
    from ..llm import read_info
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


def cmd_convert(args) -> None:
    from ..llm import read_weights
    dst = args.dst
    if os.path.abspath(dst) == os.path.abspath(args.src):
        raise LlamaforgeError("convert would overwrite its source: choose another destination")
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


def cmd_quantize(args) -> None:
    from ..gguf_writer import write_gguf
    from ..llm import read_weights
    if args.group_size != 32:
        raise LlamaforgeError("GGUF Q4/Q8 blocks hold 32 weights: --group-size must be 32 for GGUF output")
    if os.path.abspath(args.dst) == os.path.abspath(args.src):
        raise LlamaforgeError("quantize would overwrite its source: choose another destination")
    qtype = {"int8": "q8_0", "int4": args.int4_format}[args.mode]
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

    i = sub.add_parser("info", help="architecture, config, parameters, tokenizer and tensor types of a model")
    add_model_flags(i, positional=True, adapter=False)
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("convert", help="convert a model to an HF directory or a GGUF file")
    v.add_argument("src", help="named model, GGUF file, HF or Meta directory")
    v.add_argument("dst", help="output directory (hf) or file (gguf)")
    v.add_argument("--to", required=True, choices=["hf", "gguf"])
    v.add_argument("--dtype", default=None, help="hf: f32|f16|bf16 (default f32); gguf: f32|f16|bf16|q8_0|q4_0|q4_1 (default f16)")
    v.add_argument("--tokenizer", default=None, help="tokenizer file to include instead of the source's")
    v.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="quantize a model to a GGUF file (Q8_0 / Q4_0 / Q4_1) llamaforge and llama.cpp load")
    q.add_argument("src", help="named model, GGUF file, HF or Meta directory")
    q.add_argument("dst", help="output .gguf file")
    q.add_argument("--mode", required=True, choices=["int8", "int4"])
    q.add_argument("--group-size", type=int, default=32, help="weights per scale (GGUF blocks: 32)")
    q.add_argument("--int4-format", default="q4_0", choices=["q4_0", "q4_1"], help="int4 block type (q4_1 adds a minimum per block)")
    q.add_argument("--tokenizer", default=None, help="tokenizer file to include instead of the source's")
    q.add_argument("--verbose", "-v", action="store_true", help="also list float tensors")
    q.set_defaults(func=cmd_quantize)

