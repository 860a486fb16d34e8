"""The training loop, shared by pretraining, fine-tuning and DPO: one readable loop (nanoGPT `train.py`).

`run_loop` runs optimizer steps over a `Loop` (model, optimizer, batches, loss, checkpoint and
evaluation hooks) as a `LoopConfig` says: linear warmup then cosine decay (`lr_at`), AdamW with
weight decay on 2-D weights only (`make_optimizer`), gradient accumulation to a global batch over
micro-batches and data-parallel ranks (`train_step`), clipping, log.jsonl / loss.png (`RunLog`), a
progress line with tokens/s, MFU and ETA, evaluation and atomic checkpoints every N steps, a time
budget, and SIGTERM / Ctrl-C saving a checkpoint before exiting (`StopSignal`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import accounting
from ..errors import LlamaforgeError
from .parallelize import all_reduce_sum


def _f(default, help: str, type=None):
    return field(default=default, metadata={"help": help, "type": type})


def with_defaults(**defaults):
    """Class decorator, applied before @dataclass: the inherited fields named get these defaults and
    keep their help, so a job that trains differently states only what differs."""
    def wrap(cls):
        parent = {f.name: f for f in dataclasses.fields(cls.__mro__[1])}
        for name, value in defaults.items():
            f = parent[name]
            cls.__annotations__[name] = f.type
            setattr(cls, name, field(default=value, metadata=f.metadata))
        return cls
    return wrap



@dataclass
class LoopConfig:
    """What the training loop needs, shared by every job that trains (`TrainConfig`, `FinetuneConfig`,
    `DPOConfig`): optimizer, schedule, precision, logging, checkpoints. Defaults are LLaMA's pretraining
    recipe; a job redeclares only the fields whose defaults differ."""
    # batches and schedule
    micro_batch_size: int = _f(4, "sequences per forward/backward on each process")
    max_steps: int = _f(1000, "optimizer steps")
    max_minutes: float = _f(0.0, "time budget in wall minutes: the cosine follows it and training stops there (0: off)")
    lr: float = _f(3e-4, "peak learning rate (LLaMA 7B/13B: 3e-4, 33B/65B: 1.5e-4)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = _f(2000, "linear warmup steps")
    # AdamW
    weight_decay: float = _f(0.1, "AdamW weight decay on 2-D weights")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-5, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0: off)")
    # precision and placement
    dtype: str = _f("auto", "fp32 | bf16 autocast | auto (bf16 on GPUs that have it, fp32 on CPU)")
    ac: str = _f("selective", "activation checkpointing: none | selective (keep matmul outputs) | full")
    device: str = _f("auto", "cpu | cuda | auto")
    seed: int = _f(0, "seed for initialization and data order")
    # evaluation and logging
    eval_every: int = _f(200, "validation loss every N steps (0: only at the end)")
    log_every: int = _f(10, "terminal log every N steps (log.jsonl gets every step)")
    # checkpoints
    ckpt_every: int = _f(500, "checkpoint every N steps (and at the end, and on SIGTERM/SIGINT)")
    keep_checkpoints: int = _f(3, "checkpoints to keep")
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    # accounting
    peak_flops: float | None = _f(None, "peak FLOP/s per device for MFU (default: measured at start)", float)
    device_power: float | None = _f(None, "W per device for energy (default: 400 per GPU, 10 per CPU thread)", float)
    pue: float = _f(accounting.PUE, "datacenter power usage effectiveness (LLaMA: 1.1)")
    carbon_intensity: float = _f(accounting.CARBON_INTENSITY, "kg CO2eq per kWh (LLaMA: 0.385, US average)")
    price_per_kwh: float = _f(accounting.PRICE_PER_KWH, "electricity price per kWh for the report's cost (US industrial 2023)")
    currency: str = _f(accounting.CURRENCY, "currency of --price-per-kwh and --device-price")
    device_price: float = _f(0.0, "price of one device, amortized over --lifetime-years in the report's cost (0: electricity only)")
    lifetime_years: float = _f(accounting.LIFETIME_YEARS, "device lifetime for amortizing --device-price")


def lr_at(step: int, tc: LoopConfig, time_frac: float = 0.0) -> float:
    """Linear warmup to the peak over `warmup_steps`, then cosine decay to `min_lr_ratio` x peak at `max_steps`.

    With a time budget (`--max-minutes`), `time_frac` is the share of it used, and the decay follows
    whichever of steps and time is further along, so a slow machine still ends at the low rate.
    """
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, max((step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps), time_frac))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings, projections), none on vectors (RMSNorm gains), as nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, tc: LoopConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)



def autocast_for(dtype: str, device: torch.device) -> tuple[torch.autocast, bool]:
    """-> (autocast context, whether it is bf16): bf16 when asked, or with 'auto' on GPUs that have it; fp32 otherwise."""
    if dtype not in ("auto", "fp32", "bf16"):
        raise LlamaforgeError(f"--dtype must be fp32, bf16 or auto, got {dtype!r}")
    bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), bf16


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint after the current step and exits. A second one aborts."""

    def __init__(self):
        self.signum: int | None = None
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[{signal.Signals(signum).name}: saving a checkpoint after this step; send it again to abort]",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False


class RunLog:
    """log.jsonl (every step and evaluation) and loss.png, written by rank 0. On resume, records after the checkpoint are dropped."""

    def __init__(self, run: Path, resume_step: int | None, enabled: bool):
        self.path, self.png, self.enabled = run / "log.jsonl", run / "loss.png", enabled
        self.records: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut by kill -9
                    continue
                if r.get("step", 0) <= resume_step:
                    self.records.append(r)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, rec: dict) -> None:
        if self.enabled:
            self.records.append(rec)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def plot(self) -> None:
        if not self.enabled:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        tr = [(r["tokens"], r["loss"]) for r in self.records if "loss" in r]
        va = [(r["tokens"], r["val_loss"]) for r in self.records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), lw=0.8, label="train")
        if va:
            ax.plot(*zip(*va), "o-", label="validation")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.png)


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"



IGNORE = -100  # target id of positions without a loss (prompt tokens, padding): F.cross_entropy's ignore_index


def lm_loss(model, batch, autocast) -> tuple[torch.Tensor, dict]:
    """Next-token cross entropy summed over the batch's targets (IGNORE positions excluded)."""
    x, y = batch  # (mbs, T) each
    with autocast:
        logits = model(x)  # (mbs, T, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"), {}


def count_targets(batch) -> int:
    return int((batch[1] != IGNORE).sum())


def train_step(model, opt, batches, plan, tc, d, autocast, loss_fn=lm_loss, count=count_targets) -> tuple[dict, float]:
    """One optimizer step over the global batch `plan`: this rank's micro-batches, accumulated; -> (losses, grad norm).

    `loss_fn(model, batch, autocast)` returns a loss summed over the batch's items (target tokens;
    preference pairs for DPO) and other sums to report; `count(batch)` is its number of items. The
    step's loss is the sum over all micro-batches and ranks divided by the total count, so every
    target token weighs the same however the tokens fall into micro-batches.
    """
    mbs = tc.micro_batch_size
    accum = len(plan) // (mbs * d.world_size)
    starts = [(micro * d.world_size + d.rank) * mbs for micro in range(accum)]
    mine = [batches.read(plan[i:i + mbs]) for i in starts]  # read ahead: the count comes before the first backward
    n = float(all_reduce_sum(torch.tensor(float(sum(count(b) for b in mine))), d))  # items in the global batch
    sums: dict[str, torch.Tensor] = {}
    for micro, batch in enumerate(mine):
        batch = tuple(t.to(d.device, non_blocking=True) for t in batch)
        if d.world_size > 1:
            model.set_requires_gradient_sync(micro == accum - 1)  # reduce-scatter once per step
        loss, extra = loss_fn(model, batch, autocast)
        (loss * (d.world_size / n)).backward()  # FSDP averages gradients over ranks: scale so the mean is the batch mean
        for k, v in {"loss": loss, **extra}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().double().cpu()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    opt.step()
    opt.zero_grad(set_to_none=True)
    keys = sorted(sums)
    totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys]), d) / n
    return dict(zip(keys, totals.tolist())), float(norm)


@dataclass
class Loop:
    """What the training loop is generic over. Pretraining (`train`), fine-tuning and DPO (`finetune.py`)
    each build one and share `run_loop`: schedule, accumulation, clipping, logging, evaluation,
    checkpoints, signals and the time budget."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    batches: object  # plan(n) -> plan; read(plan) -> batch tensors; tokens(plan) -> int; state_dict()
    n_seqs: int  # sequences per optimizer step, all processes together
    d: object  # parallelize.Dist
    autocast: object
    run: Path
    save: Callable[[int, dict], None]  # (step, train state) -> None: an atomic checkpoint
    evaluate: Callable[[], dict] | None = None  # -> {"val_loss": ...}
    fpt: float = 0.0  # training FLOPs per token, for MFU
    peak: float = 0.0  # peak FLOP/s per device
    loss: Callable = lm_loss
    count: Callable = count_targets


def run_loop(lp: Loop, tc, state: dict, resumed: bool, on_step=None) -> tuple["RunLog", str | None, dict, float]:
    """Optimizer steps from `state` (step, tokens, wall_s, train_s; updated in place) to `tc.max_steps`
    or the time budget; -> (log, stopped_by, last checkpoint/eval steps, elapsed seconds).

    `tc` is any config with TrainConfig's schedule, optimizer and logging fields."""
    d = lp.d
    log = RunLog(lp.run, state["step"] if resumed else None, d.is_main)
    t_session, wall0 = time.perf_counter(), state["wall_s"]
    elapsed = lambda: wall0 + time.perf_counter() - t_session  # noqa: E731
    budget = tc.max_minutes * 60
    session_s, session_steps, stopped_by = 0.0, 0, None
    last = {"ckpt": state["step"] if resumed else -1, "eval": -1}
    with StopSignal() as stop:
        while state["step"] < tc.max_steps:
            t0 = time.perf_counter()
            time_frac = elapsed() / budget if budget else 0.0
            lr = lr_at(state["step"], tc, time_frac)
            for g in lp.opt.param_groups:
                g["lr"] = lr
            plan = lp.batches.plan(lp.n_seqs)  # the whole global batch, the same on every rank
            n_tok = lp.batches.tokens(plan)
            losses, norm = train_step(lp.model, lp.opt, lp.batches, plan, tc, d, lp.autocast, lp.loss, lp.count)
            loss = losses.pop("loss")
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["tokens"] += n_tok
            state["train_s"] += dt
            session_s, session_steps, step = session_s + dt, session_steps + 1, state["step"]
            eta = session_s / session_steps * (tc.max_steps - step)
            if budget:
                eta = min(eta, max(0.0, budget - elapsed()))
            tok_s = n_tok / dt
            rec = {"step": step, "loss": loss, **losses, "lr": lr, "grad_norm": norm, "tokens": state["tokens"],
                   "tokens_per_s": tok_s, "mfu": accounting.mfu(lp.fpt, tok_s, lp.peak, d.world_size) if lp.peak else 0.0,
                   "elapsed_s": elapsed(), "eta_s": eta}
            log.write(rec)
            if on_step is not None:
                on_step(step, rec)
            # one collective for both decisions, so every rank stops at the same step
            flags = all_reduce_sum(torch.tensor([float(stop.signum or 0), elapsed() / budget if budget else 0.0]), d)
            signalled, done = flags[0] > 0, step >= tc.max_steps or flags[1] / d.world_size >= 1
            if d.is_main and (step % tc.log_every == 0 or step == 1 or done):
                more = "".join(f" | {k.replace('_', ' ')} {v:.3f}" for k, v in losses.items())
                print(f"step {step:>6}/{tc.max_steps} | loss {loss:.4f}{more} | lr {lr:.2e} | grad norm {norm:.3f} | "
                      f"{tok_s:,.0f} tok/s | MFU {100 * rec['mfu']:.1f}% | ETA {_fmt_time(eta)}", file=sys.stderr, flush=True)
            if lp.evaluate is not None and not signalled and ((tc.eval_every and step % tc.eval_every == 0) or done):
                ev = lp.evaluate()
                log.write({"step": step, "tokens": state["tokens"], **ev})
                log.plot()
                last["eval"] = step
                if d.is_main:
                    print(f"step {step:>6} | val loss {ev['val_loss']:.4f}", file=sys.stderr, flush=True)
            if step % tc.ckpt_every == 0 or done or signalled:
                lp.save(step, {**state, "wall_s": elapsed(), "data": lp.batches.state_dict()})
                last["ckpt"] = step
            if signalled:
                stopped_by = signal.Signals(stop.signum).name if stop.signum else "a signal to another rank"
                break
            if done:
                break
    log.plot()
    return log, stopped_by, last, elapsed()


