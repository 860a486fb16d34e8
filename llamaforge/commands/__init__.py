"""The `llamaforge` command line: one module per command group, on top of the library.

Flags are generated from the jobs' dataclasses (`common.add_config_flags`), so each default is
written once. Bad input raises `LlamaforgeError`; `main` prints it on one line and exits 2, never a
traceback (anything else is a bug: one line and exit 1, the traceback with LLAMAFORGE_DEBUG=1). Heavy imports stay inside the command functions: `llamaforge --help` starts fast.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import LlamaforgeError
from . import account, align, evaluate, rag, run, serve, train

GROUPS = (run, train, align, evaluate, serve, rag, account)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge", description="Run, quantize, pretrain, fine-tune, serve and evaluate "
                                "LLaMA-family models on a CPU or a GPU.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "convert" and args.dtype is None:
        args.dtype = "f32" if args.to == "hf" else "f16"
    func = args.func
    if getattr(args, "tp", 1) > 1 and os.environ.get("RANK", "0") != "0":  # ranks > 0 load their slice and follow rank 0
        from .common import load_llm as func
    try:
        func(args)
    except LlamaforgeError as e:
        print(f"llamaforge: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"llamaforge: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (RecursionError, MemoryError) as e:  # input nested or sized past what the checks foresaw
        print(f"llamaforge: error: {'the input nests too deeply' if isinstance(e, RecursionError) else 'out of memory'} "
              "(a corrupt or hostile file?)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, not a traceback, unless asked for
        if os.environ.get("LLAMAFORGE_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:300]
        print(f"llamaforge: internal error: {type(e).__name__}: {msg} (a bug: please report it; "
              "LLAMAFORGE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
