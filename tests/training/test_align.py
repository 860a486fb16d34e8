"""The Llama 2-Chat recipe beyond SFT and DPO: the reward model's ranking loss and held-out pair accuracy,
rejection sampling keeping the argmax-reward sample, and Ghost Attention's data construction (exact
messages and exact loss mask). Tiny random model over SmolLM2's tokenizer (test_finetune's fixtures)."""
import json
import math

import pytest
import torch

from llamaforge.commands import main
from llamaforge.chat import chat_format_for
from llamaforge.training.gatt import build, gatt_examples, sampling_messages, split_dialog, training_example
from llamaforge.training.loop import IGNORE
from llamaforge.training.rejection import RejectionConfig, pick_best, rejection_sample
from llamaforge.training.reward import (RewardConfig, last_positions, load_reward_model, ranking_loss, score,
                                        train_reward)
from llamaforge.training.sft_data import encode_sft
from test_finetune import A, S, U, _one_thread, msg, smol, tiny_chat_model, write_jsonl  # noqa: F401 (fixtures)

# ---- reward model ----


def test_ranking_loss_by_hand():
    # -log sigmoid(2.0 - 0.5 - 1.0) = log(1 + e^-0.5) = 0.474077
    assert ranking_loss(torch.tensor([2.0]), torch.tensor([0.5]), 1.0).item() == pytest.approx(0.474077, abs=1e-6)
    assert ranking_loss(torch.tensor([0.3]), torch.tensor([0.3])).item() == pytest.approx(math.log(2))
    y = torch.tensor([[IGNORE, 5, 6, IGNORE], [IGNORE, IGNORE, 7, 8]])
    assert last_positions(y).tolist() == [2, 3]


GOOD = ["Certainly, here is a careful answer: {}.", "Happy to help: {}.", "Of course, {}, and thank you."]
BAD = ["No.", "Figure it out yourself.", "Whatever."]
TOPICS = ["the sky is blue", "water boils at 100 degrees", "cats purr", "the moon orbits the earth", "bread needs yeast",
          "rivers reach the sea", "owls hunt at night", "ice floats", "bees make honey", "iron rusts"]


def prefs(topics, offset=0):
    return [{"prompt": f"Tell me why {t}.", "chosen": GOOD[(i + offset) % 3].format(t), "rejected": BAD[(i + offset) % 3],
             **({"margin": 0.5} if i % 2 else {})} for i, t in enumerate(topics)]


@pytest.fixture(scope="module")
def reward_run(tiny_chat_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    train = write_jsonl(tmp / "train.jsonl", prefs(TOPICS[:7]))
    val = write_jsonl(tmp / "val.jsonl", prefs(TOPICS[7:], offset=1))  # held-out topics
    torch.set_num_threads(1)
    rep = train_reward(RewardConfig(model=str(tiny_chat_model), data=str(train), val=str(val), out=str(tmp / "rm"),
                                    method="lora", rank=4, alpha=8, batch_size=7, micro_batch_size=7, max_steps=25,
                                    warmup_steps=1, lr=2e-2, eval_every=25, log_every=100, peak_flops=1e11, device="cpu"))
    return tmp, rep


def test_reward_model_learns_the_toy_preference_and_generalizes(reward_run, capsys):
    tmp, rep = reward_run
    log = [json.loads(line) for line in (tmp / "rm" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"] and steps[-1]["accuracy"] == 1.0
    assert rep["val_after"]["accuracy"] == 1.0 and rep["val_after"]["loss"] < rep["val_before"]["loss"]
    assert rep["val_after"]["reward_gap"] > 0
    rm, llm = load_reward_model(tmp / "rm")  # the saved model scores as the trained one did
    good, bad = score(rm, llm, "Tell me why ice floats.", [GOOD[0].format("ice floats"), BAD[1]])
    assert good > bad
    assert main(["reward", "score", "--reward", str(tmp / "rm"), "--data", str(tmp / "val.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == 1.0 and out["pairs"] == 3
    assert out["loss"] == pytest.approx(rep["val_after"]["loss"], rel=1e-4)
    assert main(["reward", "score", "--reward", str(tmp / "rm"), "--prompt", "Why?", "--answer", "Happy to help: yes.",
                 "--answer", "No."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and float(lines[0].split("\t")[0]) > float(lines[1].split("\t")[0])


def test_reward_margin_is_read_and_bad_input_is_one_line(tiny_chat_model, tmp_path, capsys):
    from llamaforge.training.reward import read_margins
    data = write_jsonl(tmp_path / "p.jsonl", prefs(TOPICS[:3]))
    assert list(read_margins(data, True).values()) == [0.0, 0.5, 0.0]
    assert list(read_margins(data, False).values()) == [0.0, 0.0, 0.0]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}])
    assert main(["reward", "train", "--model", str(tiny_chat_model), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: 'margin' must be a number" in capsys.readouterr().err
    assert main(["reward", "score", "--reward", str(tmp_path), "--prompt", "x", "--answer", "y"]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_reward_train_with_default_flags_plans_its_schedule(tiny_chat_model, tmp_path, capsys):
    # batch size and warmup default to 'auto' (as for fine-tuning): a handful of pairs gives batches of 1
    data = write_jsonl(tmp_path / "p.jsonl", prefs(TOPICS[:4]))
    assert main(["reward", "train", "--model", str(tiny_chat_model), "--data", str(data), "--out", str(tmp_path / "rm")]) == 0
    cfg = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert cfg["batch_size"] == 1 and cfg["max_steps"] == 4 and 0 <= cfg["warmup_steps"] < 4


# ---- rejection sampling ----

def test_pick_best_is_the_argmax():
    assert pick_best([0.1, 0.9, 0.9, -1.0]) == 1
    assert pick_best([-3.0]) == 0


def test_rejection_sampling_keeps_the_argmax_reward_sample_and_finetunes_on_it(reward_run, tiny_chat_model, tmp_path):
    tmp, _ = reward_run
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Tell me why owls hunt at night."},
                                                       {"prompt": [msg(S, "Be kind."), msg(U, "Why do bees make honey?")]}])
    out = tmp_path / "rs"
    rep = rejection_sample(RejectionConfig(model=str(tiny_chat_model), reward=str(tmp / "rm"), data=str(prompts),
                                           out=str(out), k=4, max_new_tokens=6, temperature=1.0, seed=3, rank=4, alpha=8,
                                           batch_size=2, micro_batch_size=2, max_steps=2, warmup_steps=1, lr=1e-3,
                                           log_every=100, peak_flops=1e11, device="cpu"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    best = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    rm, llm = load_reward_model(tmp / "rm")
    for row, b in zip(rows, best):
        texts, rewards = [s["text"] for s in row["samples"]], [s["reward"] for s in row["samples"]]
        assert len(texts) == 4 and len(set(texts)) > 1  # K different samples
        assert rewards == pytest.approx(score(rm, llm, row["prompt"], texts), abs=1e-5)
        assert row["best"] == max(range(4), key=lambda i: rewards[i])
        assert b["messages"][-1] == {"role": "assistant", "content": texts[row["best"]]}
    assert best[1]["messages"][0] == msg(S, "Be kind.")
    assert rep["mean_reward_best_of_k"] >= rep["mean_reward_one_sample"]
    assert rep["finetune"]["steps"] == 2 and (out / "adapter.json").exists()
    ft = rep["finetune"]  # the fine-tuning report carries energy and cost: 10 W per thread x PUE 1.1, 0.08 USD/kWh
    assert ft["energy_kwh"] == pytest.approx(ft["wall_s"] / 3600 * 10 * torch.get_num_threads() * 1.1 / 1000)
    assert ft["cost"]["electricity"] == pytest.approx(ft["energy_kwh"] * 0.08)
    assert ft["cost"]["per_million_tokens"] == pytest.approx(ft["cost"]["electricity"] / ft["tokens"] * 1e6)


# ---- Ghost Attention ----

INS = "Always answer as a pirate."
DIALOG = [msg(S, "You are terse."), msg(U, "Hi?"), msg(A, "Arr, hi."), msg(U, "Sky colour?"), msg(A, "Arr, blue."),
          msg(U, "And grass?"), msg(A, "Arr, green.")]


def test_gatt_messages_exact():
    system, turns = split_dialog(DIALOG)
    assert system == [msg(S, "You are terse.")] and turns[2] == ("And grass?", "Arr, green.")
    # sampling turn 3: the instruction on every user turn
    assert sampling_messages(system, turns, INS, 2) == [
        msg(S, "You are terse."), msg(U, INS + "\n\nHi?"), msg(A, "Arr, hi."), msg(U, INS + "\n\nSky colour?"),
        msg(A, "Arr, blue."), msg(U, INS + "\n\nAnd grass?")]
    # training: the instruction in the first turn only, earlier answers weight 0
    assert training_example(system, turns, INS, 2) == {"messages": [
        msg(S, "You are terse."), msg(U, INS + "\n\nHi?"), {**msg(A, "Arr, hi."), "weight": 0}, msg(U, "Sky colour?"),
        {**msg(A, "Arr, blue."), "weight": 0}, msg(U, "And grass?"), msg(A, "Arr, green.")]}
    assert [len(e["messages"]) for e in gatt_examples(system, turns, INS)] == [3, 5, 7]
    assert gatt_examples(system, turns, INS, "last") == [training_example(system, turns, INS, 2)]
    for bad in ([msg(U, "a"), msg(U, "b")], [msg(U, "a"), msg(S, "b")], []):
        with pytest.raises(ValueError):
            split_dialog(bad)


@pytest.mark.parametrize("fmt", ["template", "llama2"])
def test_gatt_loss_mask_is_the_last_answer_only(smol, fmt):
    tok, template = smol
    if fmt == "llama2":  # Meta's format, on a small SentencePiece tokenizer
        from test_finetune import llama2_tokenizer
        tok = llama2_tokenizer()
    chat = chat_format_for(tok, template) if fmt == "template" else chat_format_for(tok, name="llama2")
    system, turns = split_dialog(DIALOG)
    ex = training_example(system, turns, INS, 2)
    ids, mask = encode_sft(ex, tok, chat)
    targets = [t for t, m in zip(ids, mask) if m]
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in ex["messages"]]
    full_ids, full_mask = chat.encode(plain, add_generation_prompt=False)
    assert ids == full_ids  # the weights change the mask, never the tokens
    last = chat.encode_prompt(plain[:-1])
    assert targets == [t for i, (t, m) in enumerate(zip(full_ids, full_mask)) if m and i >= len(last)]
    assert "green" in tok.decode(targets) and "blue" not in tok.decode(targets) and "hi" not in tok.decode(targets)
    with pytest.raises(ValueError, match="weight"):
        encode_sft({"messages": [{**msg(U, "a"), "weight": 0}, msg(A, "b")]}, tok, chat)
    with pytest.raises(ValueError, match="nothing to train"):
        encode_sft({"messages": [msg(U, "a"), {**msg(A, "b"), "weight": 0}]}, tok, chat)


def test_gatt_smollm_targets_decode_exactly(smol):
    tok, template = smol
    chat = chat_format_for(tok, template)
    system, turns = split_dialog(DIALOG)
    ids, mask = encode_sft(training_example(system, turns, INS, 1), tok, chat)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "Arr, blue.<|im_end|>"
    assert tok.decode(ids).count(INS) == 1


class RecordingLLM:
    """The sampling boundary: records each context and answers 'reply <turn>'."""

    def __init__(self):
        self.contexts = []

    def chat(self, messages, **sampling):
        self.contexts.append(messages)
        return f" reply {sum(m['role'] == 'user' for m in messages)} "


def test_gatt_build_samples_with_the_instruction_on_every_turn(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": DIALOG[1:]}, {"messages": DIALOG[1:5], "instruction": "Speak French."},
                                              {"messages": [msg(U, "Only a question?")]}])
    llm = RecordingLLM()
    res = build(data, tmp_path / "g.jsonl", INS, "all", llm, temperature=0.0)
    assert res == {"dialogs": 3, "examples": 3 + 2 + 1, "sampled": True}
    for ctx in llm.contexts:
        users = [m["content"] for m in ctx if m["role"] == "user"]
        ins = "Speak French." if "Speak French." in users[0] else INS
        assert all(u.startswith(ins + "\n\n") for u in users)
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert rows[2]["messages"] == [msg(U, INS + "\n\nHi?"), {**msg(A, "reply 1"), "weight": 0}, msg(U, "Sky colour?"),
                                   {**msg(A, "reply 2"), "weight": 0}, msg(U, "And grass?"), msg(A, "reply 3")]
    assert rows[4]["messages"][0] == msg(U, "Speak French.\n\nHi?")
    # without a model the dialogs' answers are kept, and an unanswered last turn is an error
    assert main(["gatt", "--data", str(data), "--out", str(tmp_path / "x.jsonl"), "--instruction", INS]) == 2
    assert "d.jsonl:3: the last user turn has no answer" in capsys.readouterr().err
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"messages": DIALOG}])
    assert main(["gatt", "--data", str(ok), "--out", str(tmp_path / "y.jsonl"), "--instruction", INS, "--turns", "last"]) == 0
    assert json.loads((tmp_path / "y.jsonl").read_text()) == training_example(*split_dialog(DIALOG), INS, 2)
    assert main(["gatt", "--data", str(ok), "--out", str(tmp_path / "z.jsonl")]) == 2
    assert "no instruction" in capsys.readouterr().err


def test_gatt_cli_samples_from_a_model(tiny_chat_model, tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"messages": DIALOG}])
    out = tmp_path / "s.jsonl"
    assert main(["gatt", "--data", str(ok), "--out", str(out), "--instruction", INS, "--model", str(tiny_chat_model),
                 "--max-new-tokens", "3", "--turns", "last"]) == 0
    msgs = json.loads(out.read_text())["messages"]
    assert [m["role"] for m in msgs] == [S, U, A, U, A, U, A] and msgs[1]["content"] == INS + "\n\nHi?"
    assert msgs[3]["content"] == "Sky colour?" and msgs[2]["weight"] == 0 and "weight" not in msgs[-1]
    assert msgs[-1]["content"] != "Arr, green."  # the answers are the model's, sampled with the instruction on every turn


@pytest.mark.parametrize("cmd", [["reward", "train"], ["reward", "score"], ["rejection-sample"], ["gatt"], ["carbon"], ["plan"]])
def test_help_of_each_new_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0 and "usage: llamaforge" in capsys.readouterr().out
