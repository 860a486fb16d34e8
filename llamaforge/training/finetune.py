"""Supervised fine-tuning (full, LoRA, QLoRA), Direct Preference Optimization, and merging adapters.

    llamaforge finetune --model M --data train.jsonl [--val val.jsonl] --method full|lora|qlora --out ft/
    llamaforge dpo --model M --data prefs.jsonl --out dpo/
    llamaforge merge --model M --adapter ft/ --out merged/ [--to hf|gguf]

Data: JSONL, the format told apart per line: chat (`{"messages": [{"role", "content"}, ...]}`, the
OpenAI shape), instruction (`instruction` / optional `input` / `output`, rendered as one user turn
and one assistant turn) or plain `text`. Chat and instruction lines go through the model's own chat
format (chat.py) and train only on the assistant's tokens, from the mask chat.py builds from token
ids; text lines train on every token. Every line is read, checked and tokenized before anything is
written, and a malformed one is reported as file:line: it stops the run (default) or is skipped
(`--on-bad-line skip`). Optional packing puts several examples in one row (each keeps its own
targets; attention is not reset between them, as TRL's default packing).

Training reuses the pretraining loop (train.run_loop: warmup + cosine, accumulation, clipping,
log.jsonl / loss.png, validation every N steps, progress with tokens/s and ETA, atomic
checkpoints and exact `--resume`); full fine-tuning exports `out/model/` as pretraining does, LoRA and
QLoRA export the adapter to `out/` (lora.py). DPO (Rafailov et al. 2023): the policy is the model
with a LoRA adapter, the frozen reference is the same model with the adapter switched off.
"""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import accounting
from ..errors import LlamaforgeError
from ..llm import DEFAULT_MODEL
from .loop import IGNORE, Loop, LoopConfig, _f, autocast_for, count_targets, make_optimizer, run_loop, with_defaults
from .sft_data import PairBatches, SFTBatches, encode_pref, encode_sft, load_examples

METHODS = ("full", "lora", "qlora")
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}


@dataclass
@with_defaults(warmup_steps=10, weight_decay=0.0, beta2=0.999, eps=1e-8, ac="none", eval_every=50, ckpt_every=100,
               keep_checkpoints=2)
class FinetuneConfig(LoopConfig):
    # what to train, on what
    model: str = _f(DEFAULT_MODEL, "named model, GGUF file, HF or Meta directory to start from")
    data: str = _f("", "training JSONL: chat, instruction or text lines")
    val: str = _f("", "validation JSONL (optional): loss every --eval-every steps")
    out: str = _f("", "output directory: adapter (LoRA/QLoRA) or model/ (full), checkpoints, logs")
    # LoRA / QLoRA
    method: str = _f("lora", "full | lora | qlora (LoRA on a frozen int4/int8 base)")
    rank: int = _f(16, "LoRA rank")
    alpha: float = _f(32.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (PEFT's default is 0 too; on a CPU it costs about a fifth of a step)")
    targets: str = _f("all", "LoRA target modules: wq,wk,wv,wo,w1,w2,w3 (or q_proj...), attention, mlp, all")
    # QLoRA
    quantize: str = _f("int4", "QLoRA base precision: int4 | int8")
    # examples
    chat_format: str | None = _f(None, "override the model's chat format: template | chatml | llama2 | llama3", str)
    seq_len: int = _f(0, "longest example in tokens (0: the model's context, at most 2048)")
    packing: bool = _f(False, "pack several examples into each row of --seq-len tokens")
    on_bad_line: str = _f("stop", "a malformed JSONL line: stop (before training) | skip (warn and go on)")
    # schedule (the rest of LoopConfig's fields take the defaults in @with_defaults)
    batch_size: int = _f(16, "sequences (rows) per optimizer step")
    epochs: float = _f(3.0, "passes over the data (used when --max-steps is 0)")
    max_steps: int = _f(0, "optimizer steps (0: --epochs worth)")
    lr: float = _f(0.0, "peak learning rate (0: 2e-4 for LoRA/QLoRA, 2e-5 for full; DPO: a tenth of that)")


@dataclass
class DPOConfig(FinetuneConfig):
    beta: float = _f(0.1, "DPO beta: how far the policy may move from the reference")


# ---- losses ----

def target_logits(model, x: torch.Tensor, y: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits at the target positions (n, vocab) fp32, the (B, T) mask of those positions). The output
    projection (vocab x dim, a small model's largest matrix) runs only where there are targets."""
    from ..lora import frozen_linear
    keep = y != IGNORE
    with autocast:
        h = model(x, hidden=True)[keep]  # (n, dim)
    with autocast:
        return frozen_linear(model.output, h).float(), keep


def sft_loss(model, batch, autocast) -> tuple[torch.Tensor, dict]:
    """Cross entropy summed over the target positions."""
    x, y = batch
    logits, keep = target_logits(model, x, y, autocast)
    return F.cross_entropy(logits, y[keep], reduction="sum"), {}


def sequence_logps(model, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    """Sum of log p(target) over each row's target positions: (B,)."""
    logits, keep = target_logits(model, x, y, autocast)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, y[keep][:, None]).squeeze(-1)  # (n,)
    return torch.zeros(x.size(0), dtype=logp.dtype, device=logp.device).index_add(0, keep.nonzero()[:, 0], logp)


def make_dpo_loss(beta: float):
    """DPO: -log sigmoid(beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]) per pair, summed.
    The reference is the same model with its LoRA adapters off (lora.lora_disabled)."""
    from ..lora import lora_disabled

    def dpo_loss(model, batch, autocast):
        x, y = batch  # (2 n, T): n chosen rows, then their n rejected rows
        n = x.size(0) // 2
        with torch.no_grad(), lora_disabled(model):
            ref = sequence_logps(model, x, y, autocast)
        pi = sequence_logps(model, x, y, autocast)
        margin = beta * ((pi[:n] - ref[:n]) - (pi[n:] - ref[n:]))  # (n,) reward of chosen minus rejected
        loss = -F.logsigmoid(margin).sum()
        return loss, {"reward_margin": margin.detach().sum(), "reward_accuracy": (margin > 0).sum().float()}
    return dpo_loss


def count_pairs(batch) -> int:
    return batch[0].size(0) // 2


@torch.no_grad()
def evaluate_rows(model, batches: SFTBatches, mbs: int, autocast, loss_fn, count) -> dict:
    """Mean loss (and other reported means) over every row of `batches`, in order."""
    was = model.training
    model.eval()
    sums, n = {}, 0
    for i in range(0, len(batches), mbs):
        batch = batches.read(list(range(i, min(i + mbs, len(batches)))))
        loss, extra = loss_fn(model, batch, autocast)
        for k, v in {"val_loss": loss, **{f"val_{k}": v for k, v in extra.items()}}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += count(batch)
    model.train(was)
    return {k: v / n for k, v in sums.items()}


# ---- the run ----

def count_targets_all(batches: SFTBatches) -> int:
    return sum(count_targets(batches.read([i])) for i in range(len(batches)))


def _check(fc: FinetuneConfig, dpo: bool) -> None:
    if not fc.data or not fc.out:
        raise LlamaforgeError("pass --data (a JSONL file) and --out (the output directory)")
    if fc.method not in METHODS:
        raise LlamaforgeError(f"unknown --method {fc.method!r}: use full, lora or qlora")
    if dpo and fc.method == "full":
        raise LlamaforgeError("DPO here trains a LoRA adapter (its reference is the base with the adapter off): "
                              "use --method lora or qlora")
    if fc.on_bad_line not in ("stop", "skip"):
        raise LlamaforgeError(f"--on-bad-line must be stop or skip, got {fc.on_bad_line!r}")
    if fc.quantize not in ("int4", "int8"):
        raise LlamaforgeError(f"--quantize must be int4 or int8, got {fc.quantize!r}")
    if fc.micro_batch_size < 1 or fc.batch_size % fc.micro_batch_size:
        raise LlamaforgeError(f"--batch-size {fc.batch_size} must be a multiple of --micro-batch-size {fc.micro_batch_size}")
    if fc.seq_len < 0:
        raise LlamaforgeError(f"--seq-len must be >= 0, got {fc.seq_len}")


# settings a resumed run must share with the run it continues
_RESUME_KEYS = ("model", "data", "method", "rank", "alpha", "lora_dropout", "targets", "quantize", "seq_len", "packing",
                "batch_size", "micro_batch_size", "seed", "on_bad_line")


def load_for_training(fc: FinetuneConfig, d, what: str = "fine-tuning"):
    """The model to train in fp32 (its int4/int8 base for QLoRA) and the row length: -> (LLM, seq_len)."""
    from ..llm import load
    llm = load(fc.model, chat_format=fc.chat_format, device=str(d.device), dtype=torch.float32,
               quantize=fc.quantize if fc.method == "qlora" else "none")
    if llm.tokenizer is None:
        raise LlamaforgeError(f"{fc.model} has no tokenizer: {what} reads text")
    seq_len = fc.seq_len or min(llm.config.max_seq_len, 2048)
    if seq_len > llm.config.max_seq_len:
        raise LlamaforgeError(f"--seq-len {seq_len} is longer than the model's context ({llm.config.max_seq_len})")
    return llm, seq_len


def finetune(fc: FinetuneConfig, on_step=None, dpo: bool = False) -> dict:
    """Fine-tune (or with `dpo`, preference-tune) as `fc` says; returns the report (also out/report.json)."""
    from ..lora import LoRAConfig, apply_lora, save_adapter, trainable_params
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .parallelize import apply_ac, init_distributed

    _check(fc, dpo)
    lc = LoRAConfig(fc.rank, fc.alpha, fc.lora_dropout, fc.targets) if fc.method != "full" else None  # bad targets fail here
    d = init_distributed(fc.device)
    if d.world_size > 1:
        raise LlamaforgeError("fine-tuning runs in one process: start it without torchrun")
    run = Path(fc.out)
    ckpt = latest_checkpoint(run)
    if ckpt is not None and not fc.resume:
        raise LlamaforgeError(f"{run} already holds checkpoints: pass --resume to continue, or choose another --out")
    if ckpt is not None:
        before = json.loads((run / "finetune_config.json").read_text())
        diff = {k: (before.get(k), getattr(fc, k)) for k in _RESUME_KEYS if before.get(k) != getattr(fc, k)}
        if diff:
            raise LlamaforgeError(f"{run} was started with other settings (then vs now: {diff}): resume with the same ones")
    t_load = time.perf_counter()
    llm, seq_len = load_for_training(fc, d)
    model, cfg, tok = llm.model, llm.config, llm.tokenizer

    # every line is read and checked before anything is written
    chat, broken = llm.chat_format, llm.chat_format_error
    encode = (lambda r: encode_pref(r, tok, chat, broken)) if dpo else (lambda r: encode_sft(r, tok, chat, broken))
    train_ex = load_examples(fc.data, encode, seq_len, fc.on_bad_line)
    val_ex = load_examples(fc.val, encode, seq_len, fc.on_bad_line) if fc.val else []
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    if dpo:
        batches, val = PairBatches(train_ex, seq_len, pad, fc.seed), PairBatches(val_ex, seq_len, pad) if val_ex else None
        loss_fn, count = make_dpo_loss(fc.beta), count_pairs
    else:
        batches = SFTBatches([e for ex in train_ex for e in ex], seq_len, pad, fc.seed, fc.packing)
        val = SFTBatches([e for ex in val_ex for e in ex], seq_len, pad) if val_ex else None
        loss_fn, count = sft_loss, count_targets
    steps = fc.max_steps or max(1, math.ceil(fc.epochs * len(batches) / fc.batch_size))
    lr = fc.lr or DEFAULT_LR[fc.method] / (10 if dpo else 1)
    fc = dataclasses.replace(fc, max_steps=steps, lr=lr, warmup_steps=min(fc.warmup_steps, steps - 1))

    torch.manual_seed(fc.seed)
    if lc is not None:
        apply_lora(model, lc)
    model.train()
    apply_ac(model, fc.ac)
    opt = make_optimizer(model, fc)
    n_train = trainable_params(model)
    autocast, bf16 = autocast_for(fc.dtype, d.device)

    run.mkdir(parents=True, exist_ok=True)
    (run / "finetune_config.json").write_text(json.dumps({**dataclasses.asdict(fc), "command": "dpo" if dpo else "finetune"},
                                                         indent=2) + "\n")
    peak = fc.peak_flops or accounting.measure_peak_flops(d.device, torch.bfloat16 if bf16 else torch.float32)
    state = {"step": 0, "tokens": 0, "wall_s": 0.0, "train_s": 0.0}
    if ckpt is not None:  # after anything that draws random numbers: this restores the RNG
        saved = load_checkpoint(ckpt, model, opt, cfg, trainable_only=lc is not None)
        batches.load_state_dict(saved["data"])
        state = {k: saved[k] for k in state}

    template = getattr(llm.chat_format, "source", None) or (llm.source.chat_template if llm.source else None)
    if lc is not None:
        extra = {"method": fc.method, "base_quantize": fc.quantize if fc.method == "qlora" else None, "command": "dpo" if dpo else "finetune"}
        export = lambda msd: save_adapter(run, msd, lc, cfg, fc.model, extra)  # noqa: E731
    else:
        export = None
    save = lambda step, st: save_checkpoint(run, step, model, opt, cfg, tok if lc is None else None, st, d,  # noqa: E731
                                            fc.keep_checkpoints, trainable_only=lc is not None, export=export,
                                            chat_template=template)
    evaluate = (lambda: evaluate_rows(model, val, fc.micro_batch_size, autocast, loss_fn, count)) if val else None
    n_tok = sum(batches.tokens([i]) for i in range(len(batches)))
    rows = len(batches) * (2 if dpo else 1)  # a preference pair is two rows
    fpt = accounting.finetune_flops_per_token(cfg, n_tok / rows, count_targets_all(batches) / n_tok, lc is None, dpo)
    print(f"{'dpo' if dpo else 'finetune'} {cfg.name or fc.model} ({fc.method}): {n_train:,} trainable of "
          f"{cfg.n_params:,} parameters; loaded in {time.perf_counter() - t_load:.1f}s\n"
          f"data: {len(train_ex)} {'pairs' if dpo else 'examples'} in {len(batches)} rows, {n_tok:,} tokens"
          + (f"; validation {len(val_ex)}" if val_ex else "")
          + f"\n{steps} steps of {fc.batch_size} rows (~{steps * fc.batch_size / len(batches):.1f} epochs), lr {lr:.1e}, "
          f"seq_len {seq_len}{', packed' if fc.packing and not dpo else ''}"
          + (f"\nresuming from {ckpt} (step {state['step']})" if ckpt else ""), file=sys.stderr)

    lp = Loop(model, opt, batches, fc.batch_size, d, autocast, run, save=save, evaluate=evaluate, fpt=fpt, peak=peak,
              loss=loss_fn, count=count)
    log, stopped_by, last, wall_s = run_loop(lp, fc, state, ckpt is not None, on_step)
    final_val = next((r for r in reversed(log.records) if "val_loss" in r), None)
    report = {"command": "dpo" if dpo else "finetune", "method": fc.method, "model": fc.model,
              "trainable_params": n_train, "params": cfg.n_params, "examples": len(train_ex), "rows": len(batches),
              "steps": state["step"], "epochs": batches.epochs(), "tokens": state["tokens"],
              "tokens_per_s": state["tokens"] / state["train_s"] if state["train_s"] else 0.0,
              "wall_s": wall_s, "train_s": state["train_s"],
              "final_loss": next((r["loss"] for r in reversed(log.records) if "loss" in r), None),
              "final_val_loss": final_val["val_loss"] if final_val else None,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "stopped_by": stopped_by, "last_checkpoint_step": last["ckpt"], **energy_and_cost(fc, d, wall_s, state["tokens"])}
    accounting.write_report(run / "report.json", report)
    print(("stopped by " + stopped_by + f" at step {state['step']}: resume with --resume\n" if stopped_by else "")
          + f"done: {state['step']} steps, {state['tokens']:,} tokens at {report['tokens_per_s']:,.0f} tok/s in "
          f"{wall_s / 60:.1f} min; final loss {report['final_loss']:.4f}"
          + (f", validation {report['final_val_loss']:.4f}" if final_val else "")
          + f"; peak RSS {report['peak_rss_mb']:,.0f} MB\n"
          + f"energy {report['energy_kwh']:.4f} kWh at {report['power_w']:g} W x PUE {fc.pue:g}; cost "
          + accounting.format_cost(report["cost"]) + "\n"
          + (f"adapter in {run}: llamaforge chat --model {fc.model} --adapter {run}" if lc is not None
             else f"model in {run / 'model'}: llamaforge chat --model {run}"), file=sys.stderr)
    return report


def energy_and_cost(tc, d, wall_s: float, tokens: int) -> dict:
    """Energy, carbon and cost of `wall_s` seconds on one device at the job's power, PUE, intensity and prices."""
    power = accounting.device_power(tc.device_power, d.device.type)
    kwh = accounting.energy_kwh(wall_s / 3600, power, tc.pue)
    return {"power_w": power, "pue": tc.pue, "energy_kwh": kwh, "tco2eq": accounting.co2_tonnes(kwh, tc.carbon_intensity),
            "cost": accounting.cost_row(kwh, wall_s / 3600, tokens=tokens or None, **accounting.cost_kwargs(tc))}


def merge(model: str | Path, adapter: str | Path, out: str | Path, to: str = "hf", dtype: str | None = None) -> None:
    """Fold an adapter into float weights and write an HF directory or a GGUF file."""
    from ..llm import read_weights
    from ..lora import load_adapter, merge_lora
    from ..weights import build_model
    if to not in ("hf", "gguf"):
        raise LlamaforgeError(f"--to must be hf or gguf, got {to!r}")
    w = read_weights(model)
    net = build_model(w.config, w.state_dict, dtype=torch.float32)
    load_adapter(net, adapter)
    merge_lora(net)
    sd = net.state_dict()
    if to == "hf":
        from ..weights import save_hf
        dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
        if (dtype or "f32") not in dtypes:
            raise LlamaforgeError(f"--dtype {dtype} is not available for HF output; use one of {', '.join(dtypes)}")
        save_hf(out, w.config, sd, w.tokenizer, w.chat_template, dtype=dtypes[dtype or "f32"])
    else:
        from ..gguf_writer import write_gguf
        write_gguf(out, w.config, sd, tokenizer=w.tokenizer, chat_template=w.chat_template, qtype=dtype or "f16",
                   name=w.config.name)
