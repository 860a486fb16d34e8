"""Pretraining: the recipe's schedule and optimizer, activation checkpointing, a run that learns, exact
resume after SIGTERM or a crash, and FSDP2 on gloo (2 processes == 1 process; checkpoints cross world sizes).

Every run is the `micro` preset on 32-token windows (pretrain_helpers.tiny_train_config): fp32, CPU,
seeded, so an interrupted-and-resumed run must match an uninterrupted one bit for bit.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge import LlamaforgeError
from llamaforge.config import ModelConfig
from llamaforge.model import Transformer
from llamaforge.training.parallelize import apply_ac
from llamaforge.training.pretrain import TrainConfig, model_config, train
from llamaforge.training.loop import lr_at, make_optimizer, param_groups

from pretrain_helpers import losses, make_data, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~4x faster than two that wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("pretrain"))[0]


def test_schedule_values_at_key_steps():
    tc = TrainConfig(lr=3e-4, warmup_steps=2000, max_steps=100_000, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(3e-4 / 2000)
    assert lr_at(999, tc) == pytest.approx(1.5e-4)
    assert lr_at(1999, tc) == pytest.approx(3e-4)  # end of warmup: the peak
    assert lr_at(2000, tc) == pytest.approx(3e-4)
    assert lr_at(51_000, tc) == pytest.approx(3e-4 * 0.55)  # half way through the cosine
    assert lr_at(100_000, tc) == pytest.approx(3e-5)  # 10% of the peak at the end
    assert lr_at(200_000, tc) == pytest.approx(3e-5)
    lrs = [lr_at(s, tc) for s in range(2000, 100_001, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # a time budget moves the decay along when it is ahead of the step count
    assert lr_at(3000, tc, time_frac=0.5) == pytest.approx(3e-4 * 0.55)
    assert lr_at(3000, tc, time_frac=1.0) == pytest.approx(3e-5)


def test_weight_decay_only_on_2d_weights_and_recipe_hyperparameters(tiny_config):
    model = Transformer(tiny_config)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert {names[id(p)].split(".")[-2] for p in no_decay["params"]} == {"attention_norm", "ffn_norm", "norm"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = make_optimizer(model, TrainConfig())
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["lr"]) == ((0.9, 0.95), 1e-5, 3e-4)
    tc = TrainConfig()
    assert (tc.grad_clip, tc.warmup_steps, tc.min_lr_ratio, tc.batch_tokens) == (1.0, 2000, 0.1, 4 * 2 ** 20)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_names_loss_and_gradients(tiny_config, mode):
    x = torch.randint(0, tiny_config.vocab_size, (2, 17))

    def run(ac):
        torch.manual_seed(0)
        m = Transformer(tiny_config)
        m.init_weights()
        apply_ac(m, ac)
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return m, loss, {n: p.grad for n, p in m.state_dict(keep_vars=True).items()}

    ref_model, ref_loss, ref_grads = run("none")
    model, loss, grads = run(mode)
    assert list(model.state_dict()) == list(ref_model.state_dict())  # Meta names survive the wrapping
    assert torch.equal(loss, ref_loss)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=1e-6)
    with pytest.raises(LlamaforgeError, match="unknown activation checkpointing"):
        apply_ac(model, "some")


def test_model_config_presets_overrides_and_errors(tmp_path):
    cfg = model_config(TrainConfig(config="shakespeare-10m"), 4096)
    assert 9.5e6 < cfg.n_params < 10.5e6 and cfg.max_seq_len == 256 and cfg.head_dim == 64
    cfg = model_config(TrainConfig(config="llama-7b", dim=512, n_layers=2, n_heads=8, seq_len=128), 1000)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len) == (512, 2, 8, 8, 1000, 128)
    assert cfg.hidden_dim == 1536  # Meta's rule for the new width
    ModelConfig.from_name("tiny").save(tmp_path / "c.json")
    assert model_config(TrainConfig(config=str(tmp_path / "c.json")), 300).dim == 64
    with pytest.raises(LlamaforgeError, match="unknown --config"):
        model_config(TrainConfig(config="gpt-5"), 100)


def test_bad_settings_are_one_line_errors(data, tmp_path):
    with pytest.raises(LlamaforgeError, match="warmup-steps"):
        train(tiny_train_config(data, tmp_path / "a", warmup_steps=8, max_steps=8))
    with pytest.raises(LlamaforgeError, match="multiple of seq_len"):
        train(tiny_train_config(data, tmp_path / "b", batch_tokens=100))
    with pytest.raises(LlamaforgeError, match="meta.json"):
        train(tiny_train_config(tmp_path, tmp_path / "c"))


def test_tiny_pretrain_lowers_loss_and_writes_a_loadable_run(data, tmp_path):
    run = tmp_path / "run"
    report = train(tiny_train_config(data, run, max_steps=40, warmup_steps=4, eval_every=20, ckpt_every=20,
                                     sample_tokens=8, sample_prompt="KING."))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in log if "loss" in r]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(train_losses) == 40 and len(vals) == 2
    assert train_losses[0] > math.log(320) - 0.3  # starts near uniform over the 320-piece vocabulary
    assert sum(train_losses[-5:]) / 5 < train_losses[0] - 1.5 and vals[-1] < vals[0]
    assert all(k in log[0] for k in ("lr", "grad_norm", "tokens_per_s", "mfu", "eta_s"))
    for f in ("report.json", "loss.png", "samples.txt", "train_config.json", "model/config.json", "model/tokenizer.model"):
        assert (run / f).exists(), f
    r = json.loads((run / "report.json").read_text())
    assert r["tokens"] == 40 * 128 and r["steps"] == 40 and r["final_val_loss"] == vals[-1]
    assert r["train_flops"] == r["flops_per_token"] * r["tokens"] and r["energy_kwh"] > 0 and r["tco2eq"] > 0
    assert report["samples"][0].startswith("KING.")
    assert [p.name for p in sorted((run / "ckpt").iterdir())] == ["step_00000020", "step_00000040"]
    # `--model run/` loads the exported weights, and they are the last checkpoint's
    llm = llamaforge.load(run, device="cpu")
    ids = llm.tokenizer.encode("Good night, sweet lord.")
    from safetensors.torch import load_file
    from llamaforge.weights import build_model
    cfg = ModelConfig.load(run / "ckpt" / "step_00000040" / "model_config.json")
    ref = build_model(cfg, load_file(run / "ckpt" / "step_00000040" / "model.safetensors"))
    assert torch.equal(llm.logits(ids), ref(torch.tensor([ids]))[0])


def test_gguf_export_of_a_run(data, tmp_path):
    pytest.importorskip("gguf")
    from llamaforge.gguf import GGUFFile
    try:
        from llamaforge.gguf_writer import write_gguf
    except ImportError:
        pytest.skip("gguf.write_gguf not there yet")
    run = tmp_path / "run"
    train(tiny_train_config(data, run, max_steps=4, eval_every=0))
    w = llamaforge.llm.read_weights(run)
    write_gguf(tmp_path / "m.gguf", w.config, w.state_dict, tokenizer=w.tokenizer, qtype="f32")
    a, b = llamaforge.load(run, device="cpu"), llamaforge.load(tmp_path / "m.gguf", device="cpu")
    text = "Thou art a lord, 1603."
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    torch.testing.assert_close(a.logits(a.tokenizer.encode(text)), b.logits(b.tokenizer.encode(text)))
    assert GGUFFile(tmp_path / "m.gguf").metadata["tokenizer.ggml.model"] == "llama"


def test_resume_after_sigterm_and_after_a_crash_is_exact(data, tmp_path):
    ref = tmp_path / "ref"
    train(tiny_train_config(data, ref))
    expected = losses(ref)

    run = tmp_path / "sigterm"  # SIGTERM during step 3: checkpoint at 3, report says so
    def sigterm_at_3(step, rec):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    rep = train(tiny_train_config(data, run), on_step=sigterm_at_3)
    assert rep["stopped_by"] == "SIGTERM" and rep["steps"] == 3 and rep["last_checkpoint_step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    with pytest.raises(LlamaforgeError, match="--resume"):
        train(tiny_train_config(data, run))
    train(tiny_train_config(data, run, resume=True))
    assert losses(run) == expected  # bit for bit

    run = tmp_path / "crash"  # killed at step 6, after the step-4 checkpoint: steps 5-6 are redone
    class Killed(Exception):
        pass

    def crash_at_6(step, rec):
        if step == 6:
            raise Killed
    with pytest.raises(Killed):
        train(tiny_train_config(data, run), on_step=crash_at_6)
    assert len(losses(run)) == 6
    train(tiny_train_config(data, run, resume=True))
    assert losses(run) == expected
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == [4, 8]  # no duplicated records after the resume


def test_ctrl_c_saves_a_checkpoint_too(data, tmp_path):
    def sigint_at_2(step, rec):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / `cmd &`
    rep = train(tiny_train_config(data, tmp_path / "run", eval_every=0), on_step=sigint_at_2)
    assert rep["stopped_by"] == "SIGINT" and (tmp_path / "run" / "ckpt" / "step_00000002" / "train_state.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler training installed is gone again


def test_model_config_mismatch_on_resume_is_an_error(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_train_config(data, run, max_steps=4, eval_every=0))
    with pytest.raises(LlamaforgeError, match="different model config"):
        train(tiny_train_config(data, run, max_steps=8, resume=True, n_layers=3))


def _cli(*args, timeout=300, env=None, torchrun=0):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    head = [sys.executable, "-m", "llamaforge"]
    if torchrun:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m", "llamaforge"]
    return subprocess.run([*head, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _flags(data, out, **kw):
    tc = tiny_train_config(data, out, **kw)
    defaults = TrainConfig()
    args = []
    for k, v in vars(tc).items():
        if v != getattr(defaults, k):
            args += [f"--{k.replace('_', '-')}", str(v)] if not isinstance(v, bool) else ([f"--{k.replace('_', '-')}"] if v else [])
    return args


@pytest.mark.slow
def test_sigterm_through_the_cli_saves_and_exits(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "llamaforge", "pretrain", *_flags(data, run, max_steps=100_000, ckpt_every=100_000)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "log.jsonl").exists() and len(losses(run)) >= 3):
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "resume with --resume" in err
    step = max(losses(run))
    assert (run / "ckpt" / f"step_{step:08d}" / "train_state.pt").exists()
    assert json.loads((run / "report.json").read_text())["stopped_by"] == "SIGTERM"


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_one_and_checkpoints_cross_world_sizes(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny_train_config(data, one, ckpt_every=2, keep_checkpoints=10))
    r = _cli("pretrain", *_flags(data, two, ckpt_every=2, keep_checkpoints=10), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stderr
    l1, l2 = losses(one), losses(two)
    assert l1.keys() == l2.keys() == set(range(1, 9))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-5, abs=1e-5), s
    # world size 2 -> 1: resume the 2-process run's step-4 checkpoint in one process
    for s in (6, 8):
        shutil.rmtree(two / "ckpt" / f"step_{s:08d}")
    train(tiny_train_config(data, two, ckpt_every=2, resume=True))
    for s in l1:
        assert losses(two)[s] == pytest.approx(l1[s], rel=1e-5, abs=1e-5), s
    # world size 1 -> 2: resume the 1-process run's step-4 checkpoint in two processes
    for s in (6, 8):
        shutil.rmtree(one / "ckpt" / f"step_{s:08d}")
    r = _cli("pretrain", *_flags(data, one, ckpt_every=2, resume=True), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    for s in l1:
        assert losses(one)[s] == pytest.approx(l1[s], rel=1e-5, abs=1e-5), s
