"""`llamaforge serve`: the OpenAI-compatible API and chat page (serving/)."""
from __future__ import annotations

import os
import sys

from ..errors import LlamaforgeError, require
from .common import add_config_flags, add_model_flags, config_from_args, load_llm


def cmd_serve(args) -> None:
    from ..serving.api import ServeConfig
    cfg = config_from_args(args, ServeConfig)
    cfg.api_key = cfg.api_key or os.environ.get("LLAMAFORGE_API_KEY") or None
    for m in ("fastapi", "uvicorn", "pydantic"):
        require(m, "serve")
    from ..llm import model_names
    from ..serving.app import serve
    llm = load_llm(args)
    if llm.tokenizer is None:
        raise LlamaforgeError("this model has no tokenizer: pass --tokenizer PATH")
    ident, aliases = model_names(args.model, llm.config)
    name = cfg.model_name or ident
    cfg.model_aliases = [a for a in [*(cfg.model_aliases or []), *aliases, ident] if a != name]
    from .. import threads
    cpu = f"; cpu: {threads.describe()}" if llm.device.type == "cpu" else ""
    if cfg.ctx_size == 0:
        from ..serving.engine import default_context
        cfg.ctx_size = default_context(llm.model, cfg.max_batch)
        if cfg.ctx_size < llm.config.max_seq_len:
            print(f"[context {cfg.ctx_size:,} of the model's {llm.config.max_seq_len:,} tokens: {cfg.max_batch} sequences' "
                  "KV caches at full length would not fit in memory; --ctx-size or --max-batch to change]", file=sys.stderr)
    print(f"[model {name} ({', '.join(aliases[:4])} also accepted); context {cfg.ctx_size:,} tokens x {cfg.max_batch} "
          f"sequences{cpu}]", file=sys.stderr)
    serve(llm, cfg, name)


def add_commands(sub) -> None:
    from ..serving.api import SERVE_HELP, ServeConfig
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a web chat page")
    add_model_flags(p, tp=True)
    add_config_flags(p, ServeConfig, SERVE_HELP)
    p.set_defaults(func=cmd_serve)
