"""The llamaforge command: piped chat, generate, info, convert, and one-line errors on bad input."""
import os
import subprocess
import sys

import pytest

from llamaforge.commands import main
from llamaforge.llm import resolve

from conftest import needs_default_model


def run_cli(*args, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "llamaforge", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("llamaforge: error:") and fragment in err, err


@needs_default_model
def test_piped_chat_answers_each_line_and_exits():
    # not "What is the capital of France?": a near-tie for the int4 model with 8-bit activations on hosts whose
    # prompts run in fp32, answered "L'Étoile, la Marseillaise, ..." there -- as llama.cpp answers it (tests/test_llm.py)
    r = run_cli("chat", stdin="Name the capital of France.\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@needs_default_model
def test_generate_and_info(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("smollm2-135m-instruct", "Q4_1", "Q8_0", "134,515,008", "8,192", "bpe"):
        assert needle in out


@needs_default_model
def test_convert_to_hf_then_generate_the_same(tmp_path, capsys):
    dst = tmp_path / "hf"
    assert main(["convert", "smollm2-135m-instruct", str(dst), "--to", "hf"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in dst.iterdir()}
    # the same weights through the same arithmetic: the GGUF dequantized to fp32, and the HF directory's fp32
    # (the GGUF's default path runs its blocks natively with 8-bit activations, a different rounding)
    args = ["generate", "--prompt", "The capital of France is", "--temperature", "0", "--max-new-tokens", "8"]
    main(args + ["--quantize", "none"])
    gguf_out = capsys.readouterr().out
    main(args + ["--model", str(dst)])
    assert capsys.readouterr().out == gguf_out


@pytest.mark.parametrize("args,fragment", [
    (["info", "no-such-model"], "unknown model"),
    (["info", "llama-2-7b"], "not on this machine"),
    (["generate", "-m", "/nonexistent/model.gguf", "-p", "hi"], "no such file"),
    (["generate", "-p", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "-p", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "-p", "hi", "--speculative", "draft"], "--draft-model"),
])
def test_bad_input_one_line_errors(args, fragment):
    assert_one_line_error(run_cli(*args), fragment)


@needs_default_model
def test_corrupt_gguf_and_too_long_prompt(tmp_path):
    _, src = resolve("smollm2-135m-instruct")
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as fh:
        bad.write_bytes(fh.read(1 << 20))
    assert_one_line_error(run_cli("info", str(bad)), "not a readable GGUF file")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(4096))
    assert_one_line_error(run_cli("generate", "-m", str(garbage), "-p", "hi"), "GGUF")
    assert_one_line_error(run_cli("generate", "-p", "word " * 9000), "context window")


@needs_default_model
def test_repl_turns_reuse_the_cache_and_answer_as_without_it(default_llm_q, monkeypatch, capsys):
    """Piped chat turns: each turn runs only what follows the cached conversation, /reset empties the
    cache, and the answers are the ones the uncached REPL gives."""
    import io

    import llamaforge.commands.run as run_mod
    llm = default_llm_q
    monkeypatch.setattr(run_mod, "load_llm", lambda args, speculative="off": llm)
    lines = "Name a colour.\nAnd another one?\n/reset\nName a colour.\n"
    reused = []
    real = llm.cache.reusable

    def spy(model, ids):
        n = real(model, ids)
        reused.append((n, len(ids)))
        return n
    outs = []
    for cached in (True, False):
        llm.prompt_cache = cached
        monkeypatch.setattr(llm.cache, "reusable", spy)
        monkeypatch.setattr("sys.stdin", io.StringIO(lines))
        reused.clear()
        assert main(["chat", "--max-new-tokens", "12", "--temperature", "0"]) == 0
        outs.append(capsys.readouterr().out)
        if cached:
            first, second, after_reset = reused
            assert first[0] < 40 and second[0] > first[1] and after_reset[0] == 0
    llm.prompt_cache = True
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 3
