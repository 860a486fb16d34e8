"""`llamaforge serve`: the OpenAI-compatible API and chat page (serving/)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import LlamaforgeError
from .common import add_config_flags, add_model_flags, config_from_args, load_llm


def cmd_serve(args) -> None:
    from ..serving.api import ServeConfig
    cfg = config_from_args(args, ServeConfig)
    cfg.api_key = cfg.api_key or os.environ.get("LLAMAFORGE_API_KEY") or None
    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise LlamaforgeError(f"serving needs {', '.join(missing)}: pip install 'llamaforge[serve]'")
    from ..serving.app import serve
    llm = load_llm(args)
    if llm.tokenizer is None:
        raise LlamaforgeError("this model has no tokenizer: pass --tokenizer PATH")
    name = cfg.model_name or (Path(args.model).stem if Path(args.model).exists() else str(args.model))
    serve(llm, cfg, name)


def add_commands(sub) -> None:
    from ..serving.api import SERVE_HELP, ServeConfig
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a web chat page")
    add_model_flags(p, tp=True)
    add_config_flags(p, ServeConfig, SERVE_HELP)
    p.set_defaults(func=cmd_serve)
