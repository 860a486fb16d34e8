"""Reward model: the LLaMA trunk with a scalar head, trained on preference pairs (Llama 2, section 3.2.2).

    llamaforge reward train --model M --data prefs.jsonl [--val prefs_val.jsonl] --out rm/ [--method lora|full]
    llamaforge reward score --reward rm/ --data prefs_val.jsonl        # held-out pair accuracy
    llamaforge reward score --reward rm/ --prompt "..." --answer A --answer B

The head replaces the next-token projection: r(x, y) = w . h_last, h_last the final-norm hidden state
(`Transformer.forward(..., hidden=True)`, model.py unchanged) at the last answer token, the one
that predicts the end of turn. Pairs are the DPO lines (`prompt` / `chosen` / `rejected`, sft_data's
encoding), with an optional `margin` per line. The loss is Llama 2's binary ranking loss
    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m(r))
where m(r) is the line's margin (Llama 2 uses a larger margin for pairs rated "significantly better";
0 without one: InstructGPT's loss). Training is the shared loop (warmup + cosine, accumulation,
clipping, validation loss and pair accuracy every N steps); LoRA trains adapters on the trunk and the
head, full trains everything. Output: `rm/reward.json` (base model, method), `rm/head.safetensors`,
and the trunk as a LoRA adapter in rm/ (`lora.save_adapter`) or an HF directory `rm/model/`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import accounting
from ..errors import LlamaforgeError
from .finetune import (DEFAULT_LR, FinetuneConfig, _check, count_pairs, energy_and_cost, evaluate_rows,
                       load_for_training, plan_schedule)
from .loop import IGNORE, Loop, _f, autocast_for, make_optimizer, run_loop
from .sft_data import PairBatches, encode_pref, load_examples, pad_rows, read_jsonl

HEAD_FILE, META_FILE = "head.safetensors", "reward.json"


@dataclass
class RewardConfig(FinetuneConfig):
    margin: bool = _f(True, "use each line's `margin` (Llama 2's m(r)); --no-margin ignores it")
    epochs: float = _f(1.0, "passes over the pairs (Llama 2 trains its reward models for one epoch)")


class RewardModel(nn.Module):
    """A Transformer trunk and a (dim -> 1) head read at each row's last answer position."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        dim = trunk.config.dim
        w = trunk.norm.weight
        self.head = nn.Linear(dim, 1, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(dim + 1))

    def forward(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """x (B, T) token ids, last (B,) the position whose hidden state is scored -> rewards (B,) fp32."""
        h = self.trunk(x, hidden=True)  # (B, T, dim)
        return self.head(h[torch.arange(x.size(0), device=x.device), last]).squeeze(-1).float()


def last_positions(y: torch.Tensor) -> torch.Tensor:
    """(B, T) targets -> (B,) index of each row's last target: the input token there is the answer's last,
    and its hidden state has read the whole answer."""
    idx = torch.arange(y.size(1), device=y.device).expand_as(y)
    return torch.where(y != IGNORE, idx, -1).max(dim=1).values


def ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Llama 2's binary ranking loss per pair: -log sigmoid(r_c - r_r - m) (eq. 1 and 2), (n,)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def reward_loss(model: RewardModel, batch, autocast) -> tuple[torch.Tensor, dict]:
    """Summed ranking loss over a batch of pairs (x, y, margins): n chosen rows then their n rejected rows."""
    x, y, m = batch
    n = x.size(0) // 2
    with autocast:
        r = model(x, last_positions(y))
    diff = r[:n] - r[n:]
    loss = ranking_loss(r[:n], r[n:], m).sum()
    return loss, {"accuracy": (diff > 0).sum().float(), "reward_gap": diff.detach().sum()}


class RewardPairs(PairBatches):
    """Preference pairs with their margins: read() -> (x (2n, L), y (2n, L), margins (n,))."""

    def __init__(self, pairs, margins: list[float], seq_len: int, pad_id: int, seed: int = 0):
        super().__init__(pairs, seq_len, pad_id, seed)
        self.margins = margins

    def read(self, plan):
        x, y = super().read(plan)
        return x, y, torch.tensor([self.margins[i] for i in plan], dtype=torch.float32)


def read_margins(path: str | Path, use: bool) -> dict[str, float]:
    """file:line -> the line's margin (0 when absent or unused); a margin that is not a number is an error."""
    out = {}
    for where, rec in read_jsonl(path):
        m = rec.get("margin", 0.0) if isinstance(rec, dict) and use else 0.0
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise LlamaforgeError(f"{where}: 'margin' must be a number, got {m!r}")
        out[where] = float(m)
    return out


def load_pairs(path, tok, chat, broken, seq_len, on_bad_line, pad, seed=0, use_margin=True) -> RewardPairs:
    pairs = load_examples(path, lambda r: encode_pref(r, tok, chat, broken), seq_len, on_bad_line)
    margins = read_margins(path, use_margin)
    return RewardPairs(pairs, [margins[p[0].where] for p in pairs], seq_len, pad, seed)


def reward_loss_on_device(model: RewardModel, batch, autocast):
    """`reward_loss` on a batch read on the CPU (evaluation reads rows itself), moved to the model's device."""
    dev = model.head.weight.device
    return reward_loss(model, tuple(t.to(dev) for t in batch), autocast)


@torch.no_grad()
def pair_accuracy(model: RewardModel, pairs: RewardPairs, mbs: int = 8, autocast=None) -> dict:
    """Share of pairs whose chosen answer scores above the rejected one, and the mean loss and gap."""
    autocast = autocast or autocast_for("fp32", model.head.weight.device)[0]
    out = evaluate_rows(model, pairs, mbs, autocast, reward_loss_on_device, count_pairs)
    return {"pairs": len(pairs), "accuracy": out["val_accuracy"], "loss": out["val_loss"], "reward_gap": out["val_reward_gap"]}


# ---- saving and loading ----

def save_reward_model(out: Path, model: RewardModel, lc, cfg, base_model: str, tok, chat_template, extra: dict) -> None:
    """rm/head.safetensors, the trunk (LoRA adapter in rm/ or HF directory rm/model/), then rm/reward.json last."""
    from safetensors.torch import save_file

    from ..lora import _replace_atomic, lora_state_dict, save_adapter
    out.mkdir(parents=True, exist_ok=True)
    head = {"weight": model.head.weight.detach().float().cpu().contiguous()}
    _replace_atomic(out / HEAD_FILE, lambda t: save_file(head, str(t), metadata={"format": "pt"}))
    if lc is not None:
        save_adapter(out, lora_state_dict(model.trunk), lc, cfg, base_model, {"command": "reward"}, peft=False)
    else:
        from .checkpoint import export_model
        sd = {k: v.detach().float().cpu() for k, v in model.trunk.state_dict().items()}
        export_model(out / "model", cfg, sd, tok, chat_template)
    meta = {"format": "llamaforge-reward", "version": 1, "base_model": str(base_model),
            "method": "full" if lc is None else "lora", **extra}
    _replace_atomic(out / META_FILE, lambda t: t.write_text(json.dumps(meta, indent=2) + "\n"))


def load_reward_model(path: str | Path, device: str | None = None, chat_format: str | None = None):
    """-> (RewardModel in eval mode, LLM of its trunk: tokenizer and chat format)."""
    from safetensors.torch import load_file

    from ..llm import load
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise LlamaforgeError(f"{path} is not a reward model (no {META_FILE}): train one with `llamaforge reward train`")
    meta = json.loads((path / META_FILE).read_text())
    full = meta["method"] == "full"
    llm = load(path / "model" if full else meta["base_model"], chat_format=chat_format or meta.get("chat_format"),
               device=device or "cpu", dtype=torch.float32, quantize="none", adapter=None if full else path)
    rm = RewardModel(llm.model)
    rm.head.weight.data.copy_(load_file(str(path / HEAD_FILE))["weight"])
    return rm.eval(), llm


@torch.no_grad()
def score(rm: RewardModel, llm, prompt, answers: list[str], batch: int = 8) -> list[float]:
    """Rewards of `answers` to `prompt` (a string or a list of messages), encoded as training encodes pairs."""
    tok, chat, broken = llm.tokenizer, llm.chat_format, llm.chat_format_error
    rows = []
    for a in answers:
        ids, mask = encode_pref({"prompt": prompt, "chosen": a, "rejected": a}, tok, chat, broken)[:2]
        rows.append((ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]))
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    device = rm.head.weight.device
    out = []
    for i in range(0, len(rows), batch):
        x, y = pad_rows(rows[i:i + batch], pad)
        x, y = x.to(device), y.to(device)
        out += rm(x, last_positions(y)).tolist()
    return out


# ---- the run ----

def train_reward(rc: RewardConfig, on_step=None) -> dict:
    """Train a reward model as `rc` says; -> the report (also out/report.json). No --resume: a run is short."""
    from ..lora import LoRAConfig, apply_lora, trainable_params
    from .parallelize import apply_ac, init_distributed

    _check(rc, dpo=False)
    if rc.resume:
        raise LlamaforgeError("reward training does not resume: start it again with a new --out")
    lc = LoRAConfig(rc.rank, rc.alpha, rc.lora_dropout, rc.targets) if rc.method != "full" else None
    d = init_distributed(rc.device)
    if d.world_size > 1:
        raise LlamaforgeError("reward training runs in one process: start it without torchrun")
    run = Path(rc.out)
    if (run / META_FILE).exists():
        raise LlamaforgeError(f"{run} already holds a reward model: choose another --out")
    t_load = time.perf_counter()
    llm, seq_len = load_for_training(rc, d, "reward training")
    cfg, tok = llm.config, llm.tokenizer
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    args = (tok, llm.chat_format, llm.chat_format_error, seq_len, rc.on_bad_line, pad)
    batches = load_pairs(rc.data, *args, seed=rc.seed, use_margin=rc.margin)
    val = load_pairs(rc.val, *args, use_margin=rc.margin) if rc.val else None
    plan = plan_schedule(len(batches), rc)  # batch size and warmup 'auto' as for fine-tuning; one epoch
    steps = plan["max_steps"]
    rc = dataclasses.replace(rc, max_steps=steps, lr=rc.lr or DEFAULT_LR[rc.method], batch_size=plan["batch_size"],
                             warmup_steps=plan["warmup_steps"],
                             micro_batch_size=math.gcd(plan["batch_size"], rc.micro_batch_size))  # an auto batch below it

    torch.manual_seed(rc.seed)
    if lc is not None:
        apply_lora(llm.model, lc)
    model = RewardModel(llm.model)  # the head trains in every method
    model.train()
    apply_ac(model.trunk, rc.ac)
    opt = make_optimizer(model, rc)
    autocast, bf16 = autocast_for(rc.dtype, d.device)
    before = pair_accuracy(model, val, rc.micro_batch_size, autocast) if val else None
    run.mkdir(parents=True, exist_ok=True)
    (run / "reward_config.json").write_text(json.dumps(dataclasses.asdict(rc), indent=2) + "\n")
    template = getattr(llm.chat_format, "source", None) or (llm.source.chat_template if llm.source else None)
    extra = {"chat_format": rc.chat_format, "seq_len": seq_len}
    save = lambda step, st: save_reward_model(run, model, lc, cfg, rc.model, tok, template, {**extra, "step": step})  # noqa: E731
    evaluate = (lambda: evaluate_rows(model, val, rc.micro_batch_size, autocast, reward_loss_on_device, count_pairs)) if val else None
    n_tok = sum(batches.tokens([i]) for i in range(len(batches)))
    fpt = accounting.finetune_flops_per_token(cfg, n_tok / (2 * len(batches)), 0.0, lc is None)
    peak = rc.peak_flops or accounting.measure_peak_flops(d.device, torch.bfloat16 if bf16 else torch.float32)
    print(f"reward {cfg.name or rc.model} ({rc.method}): {trainable_params(model):,} trainable of {cfg.n_params:,} "
          f"parameters; loaded in {time.perf_counter() - t_load:.1f}s\ndata: {len(batches)} pairs, {n_tok:,} tokens"
          + (f"; validation {len(val)} pairs, accuracy before training {100 * before['accuracy']:.1f}%" if val else "")
          + f"\n{steps} steps of {rc.batch_size} pairs, lr {rc.lr:.1e}", file=sys.stderr)
    state = {"step": 0, "tokens": 0, "wall_s": 0.0, "train_s": 0.0}
    lp = Loop(model, opt, batches, rc.batch_size, d, autocast, run, save=save, evaluate=evaluate, fpt=fpt, peak=peak,
              loss=reward_loss, count=count_pairs)
    log, stopped_by, _, wall_s = run_loop(lp, rc, state, False, on_step)
    after = pair_accuracy(model, val, rc.micro_batch_size, autocast) if val else None
    report = {"command": "reward", "method": rc.method, "model": rc.model, "pairs": len(batches),
              "trainable_params": trainable_params(model), "steps": state["step"], "tokens": state["tokens"],
              "tokens_per_s": state["tokens"] / state["train_s"] if state["train_s"] else 0.0, "wall_s": wall_s,
              "final_loss": next((r["loss"] for r in reversed(log.records) if "loss" in r), None),
              "val_before": before, "val_after": after, "stopped_by": stopped_by,
              **energy_and_cost(rc, d, wall_s, state["tokens"])}
    save_reward_model(run, model, lc, cfg, rc.model, tok, template,
                      {**extra, "step": state["step"], "val_accuracy": after["accuracy"] if after else None})
    accounting.write_report(run / "report.json", report)
    print(f"done: {state['step']} steps in {wall_s / 60:.1f} min; final loss {report['final_loss']:.4f}"
          + (f"; held-out pair accuracy {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
             f"({len(val)} pairs)" if val else "") + f"\nreward model in {run}: llamaforge reward score --reward {run} ...",
          file=sys.stderr)
    return report
