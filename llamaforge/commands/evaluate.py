"""`llamaforge eval | efficiency | perplexity`: the LLaMA paper's benchmarks, accuracy per cost, perplexity."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LlamaforgeError
from .common import add_config_flags, add_model_flags, add_threads_flag, config_from_args, load_llm, set_threads


def cmd_eval(args) -> None:
    from ..evaluation.benchmarks import EvalConfig, evaluate, markdown_table, write_report
    cfg = config_from_args(args, EvalConfig)
    cfg.validate()  # bad input fails before the slow load
    llm = load_llm(args, announce=True)
    report = evaluate(llm, cfg, args.model)
    report["quantize"] = args.quantize
    files = write_report(report, cfg.output)
    sys.stdout.write(markdown_table(report))
    print(f"[wrote {', '.join(map(str, files))}]", file=sys.stderr)


def cmd_efficiency(args) -> None:
    from ..evaluation.efficiency import EfficiencyConfig, efficiency, markdown, plot
    cfg = config_from_args(args, EfficiencyConfig)
    set_threads(args, quiet=True)
    report = efficiency(args.model, cfg, args.tokenizer, args.device, args.threads)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "efficiency.md").write_text(markdown(report))
    plot(report, out / "efficiency.png")
    sys.stdout.write(markdown(report))
    print(f"[wrote {out}/efficiency.json, efficiency.md, efficiency.png]", file=sys.stderr)


def cmd_perplexity(args) -> None:
    from ..evaluation.perplexity import perplexity
    path = Path(args.file)
    if not path.is_file():
        raise LlamaforgeError(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlamaforgeError(f"{path} is not UTF-8 text") from None
    llm = load_llm(args, announce=True)
    ids = llm._need_tokenizer().encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    res = perplexity(llm, ids, args.window, args.stride, progress=True)
    res.update(model=str(args.model), file=str(path), quantize=args.quantize)
    print(f"{res['tokens']} tokens  nll {res['nll']:.4f} nats/token  ppl {res['ppl']:.4f}  ({res['tokens_per_s']} tok/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


def add_commands(sub) -> None:
    from ..evaluation.benchmarks import HELP, EvalConfig
    from ..evaluation.efficiency import HELP as EFFICIENCY_HELP
    from ..evaluation.efficiency import EfficiencyConfig
    from ..llm import DEFAULT_MODEL
    e = sub.add_parser("eval", help="LLaMA-paper benchmarks: zero-shot multiple choice, MMLU 5-shot, closed-book QA")
    add_model_flags(e)
    e.set_defaults(quantize="none")  # exact weights of the file unless asked: scores comparable to transformers'
    add_config_flags(e, EvalConfig, HELP)
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("efficiency", help="accuracy vs weight bytes, memory, tokens/s, FLOPs and energy for fp32/int8/int4")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"named model, GGUF file, HF or Meta directory (default: {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / tokenizer.model to use instead of the model's own")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_threads_flag(p)
    add_config_flags(p, EfficiencyConfig, EFFICIENCY_HELP)
    p.set_defaults(func=cmd_efficiency)

    x = sub.add_parser("perplexity", help="sliding-window perplexity of a text file (nats/token and ppl)")
    add_model_flags(x)
    x.add_argument("file", help="UTF-8 text file")
    x.add_argument("--window", type=int, default=None, help="tokens per window (default: min(context, 1024))")
    x.add_argument("--stride", type=int, default=None, help="window step (default: window / 2)")
    x.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    x.add_argument("--json", default=None, help="also write the result to this JSON file")
    x.set_defaults(func=cmd_perplexity)
