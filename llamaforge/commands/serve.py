"""`llamaforge serve`: the OpenAI-compatible API and chat page (serving/)."""
from __future__ import annotations

import os
import sys

from ..errors import LlamaforgeError, require
from .common import add_config_flags, add_model_flags, config_from_args, load_llm


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fit_context(cfg, max_batch: int, kv_bytes: int, available: int, share: float = 0.5) -> int:
    """The model's context window, halved until `max_batch` sequences' KV caches fit in `share` of the
    available memory (at least 512 tokens, or the model's window when it is smaller)."""
    ctx = cfg.max_seq_len
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_bytes * max_batch  # keys and values, every row
    while available and ctx > 512 and ctx * per_token > share * available:
        ctx //= 2
    return ctx


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
        kv_bytes = llm.model.norm.weight.element_size()  # the KV caches take the model's float dtype (model.setup_caches)
        cfg.ctx_size = fit_context(llm.config, cfg.max_batch, kv_bytes, available_memory())
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
