"""Pretraining with the LLaMA recipe, as one readable loop (nanoGPT `train.py`), a function of `TrainConfig`.

Recipe (Touvron et al. 2023, section 2.2-2.4): AdamW (beta1 0.9, beta2 0.95, eps 1e-5), weight
decay 0.1 on 2-D weights only, gradient clipping at 1.0, linear warmup then cosine decay to 10% of
the peak learning rate, a global batch counted in tokens (reached by gradient accumulation and data
parallelism), packed sequences, bf16 autocast where the hardware has it, selective activation
checkpointing. Scale-out is FSDP2 through torchrun (`parallelize.py`); checkpoints are atomic and
resume exactly (`checkpoint.py`); every run writes log.jsonl, loss.png and report.json (`accounting.py`).
The loop itself (`run_loop` over a `Loop`) is shared with fine-tuning and DPO (`finetune.py`), which
bring their own batches, loss and checkpoint contents.

    torchrun --nproc_per_node 8 -m llamaforge pretrain --config llama-7b --data data/ --out run/
"""
from __future__ import annotations

import argparse
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

from .config import CONFIGS, ModelConfig
from .errors import LlamaforgeError

# Small configs for CPU demos, kept here (not in the upstream registry of config.py). vocab_size comes
# from the tokenizer the data was prepared with.
PRESETS: dict[str, dict] = {
    # 10.0M parameters with a 4096-piece vocabulary (8.7M in matmuls, 58 MFLOP/token at context 256):
    # the CPU demo of docs/pretraining.md. Meta's FFN rule with multiple_of 32; head_dim 64.
    "shakespeare-10m": dict(dim=320, n_layers=6, n_heads=5, n_kv_heads=5, hidden_dim=864, max_seq_len=256),
    # ~1M parameters: tests and quick checks
    "micro": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, max_seq_len=128),
}


def _f(default, help: str, type=None):
    return field(default=default, metadata={"help": help, "type": type})


@dataclass
class TrainConfig:
    config: str = _f("tiny", "model: a named config, a preset (" + ", ".join(PRESETS) + ") or a ModelConfig JSON file")
    data: str = _f("", "directory written by `llamaforge prepare`")
    out: str = _f("", "run directory: checkpoints, model/, log.jsonl, loss.png, report.json")
    dim: int | None = _f(None, "override the model width", int)
    n_layers: int | None = _f(None, "override the number of blocks", int)
    n_heads: int | None = _f(None, "override the number of attention heads", int)
    n_kv_heads: int | None = _f(None, "override the number of key/value heads", int)
    hidden_dim: int | None = _f(None, "override the feed-forward width", int)
    seq_len: int = _f(0, "sequence length (0: the model's context, at most 2048)")
    micro_batch_size: int = _f(4, "sequences per forward/backward on each process")
    batch_tokens: int = _f(4 * 2 ** 20, "global batch in tokens (LLaMA: 4M); reached by accumulation x processes")
    max_steps: int = _f(1000, "optimizer steps")
    max_minutes: float = _f(0.0, "time budget in wall minutes: the cosine follows it and training stops there (0: off)")
    lr: float = _f(3e-4, "peak learning rate (LLaMA 7B/13B: 3e-4, 33B/65B: 1.5e-4)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = _f(2000, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay on 2-D weights")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-5, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0: off)")
    dtype: str = _f("auto", "fp32 | bf16 autocast | auto (bf16 on GPUs that have it, fp32 on CPU)")
    ac: str = _f("selective", "activation checkpointing: none | selective (keep matmul outputs) | full")
    compile: bool = _f(False, "torch.compile each block")
    device: str = _f("auto", "cpu | cuda | auto")
    seed: int = _f(0, "seed for initialization and data order")
    init_std: float = _f(0.02, "std of the normal weight initialization")
    eval_every: int = _f(200, "validation loss every N steps (0: only at the end)")
    eval_tokens: int = _f(65536, "validation tokens per evaluation")
    log_every: int = _f(10, "terminal log every N steps (log.jsonl gets every step)")
    ckpt_every: int = _f(500, "checkpoint every N steps (and at the end, and on SIGTERM/SIGINT)")
    keep_checkpoints: int = _f(3, "checkpoints to keep")
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    peak_flops: float | None = _f(None, "peak FLOP/s per device for MFU (default: measured at start)", float)
    device_power: float | None = _f(None, "W per device for energy (default: 400 per GPU, 10 per CPU thread)", float)
    pue: float = _f(1.1, "datacenter power usage effectiveness (LLaMA: 1.1)")
    carbon_intensity: float = _f(0.385, "kg CO2eq per kWh (LLaMA: 0.385, US average)")
    sample_tokens: int = _f(0, "at the end, generate this many tokens of text from --sample-prompt")
    sample_prompt: str = _f("", "prompt for the samples (default: empty, i.e. BOS only)")


def lr_at(step: int, tc: TrainConfig, time_frac: float = 0.0) -> float:
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


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)


def model_config(tc: TrainConfig, vocab_size: int) -> ModelConfig:
    """The named config, preset or JSON file, with flag overrides, the tokenizer's vocabulary and the
    trained context (`--seq-len`, else the config's context up to 2048) as max_seq_len."""
    if tc.config in PRESETS:
        d = dict(PRESETS[tc.config], name=tc.config)
    elif tc.config in CONFIGS:
        d = ModelConfig.from_name(tc.config).to_dict()
    elif Path(tc.config).is_file():
        try:
            d = json.loads(Path(tc.config).read_text())
        except ValueError as e:
            raise LlamaforgeError(f"{tc.config} is not a ModelConfig JSON file: {e}") from None
    else:
        raise LlamaforgeError(f"unknown --config {tc.config!r}: pass a preset ({', '.join(PRESETS)}), "
                              f"a named config ({', '.join(CONFIGS)}) or a ModelConfig JSON file")
    over = {k: getattr(tc, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim") if getattr(tc, k)}
    if "dim" in over and "hidden_dim" not in over:
        d["hidden_dim"] = None  # Meta's rule from the new width
    if "n_heads" in over and "n_kv_heads" not in over and d.get("n_kv_heads") in (None, d.get("n_heads")):
        d["n_kv_heads"] = None
    seq_len = tc.seq_len or min(d.get("max_seq_len", 2048), 2048)
    d.update(over, vocab_size=vocab_size, max_seq_len=seq_len)
    d["name"] = d.get("name") or Path(tc.config).stem
    return ModelConfig.from_dict(d)


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


@torch.no_grad()
def evaluate(model, val, plan, d, mbs: int, autocast) -> dict:
    """Mean validation loss over a fixed plan of windows, split evenly over ranks (FSDP needs equal forwards)."""
    from .parallelize import all_reduce_sum
    model.eval()
    per = len(plan) // d.world_size
    mine = plan[d.rank * per:(d.rank + 1) * per]
    sums = torch.zeros(len(val.names) * 2, dtype=torch.float64)
    for i in range(0, len(mine), mbs):
        chunk = mine[i:i + mbs]
        x, y = (t.to(d.device) for t in val.read(chunk))
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        for (s, _), l in zip(chunk, loss.tolist()):
            sums[2 * s] += l
            sums[2 * s + 1] += 1
    sums = all_reduce_sum(sums, d)
    model.train()
    tot, n = sums[0::2], sums[1::2]
    out = {"val_loss": float(tot.sum() / n.sum()) if n.sum() else float("nan")}
    out["val_loss_by_source"] = {name: float(t / c) for name, t, c in zip(val.names, tot, n) if c}
    return out


def build_model(cfg: ModelConfig, tc: TrainConfig, d) -> torch.nn.Module:
    """Initialize (the same seed on every rank: the same weights before sharding), then AC, compile, FSDP."""
    from .model import Transformer
    from .parallelize import apply_ac, apply_compile, apply_fsdp
    torch.manual_seed(tc.seed)
    with torch.device("cpu"):
        model = Transformer(cfg)
        model.init_weights(tc.init_std)
    model.to(d.device)
    apply_ac(model, tc.ac)
    if tc.compile:
        apply_compile(model)
    if d.world_size > 1:
        apply_fsdp(model, d)
    return model.train()


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
    from .parallelize import all_reduce_sum
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
    from . import accounting
    from .parallelize import all_reduce_sum
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


def train(tc: TrainConfig, on_step=None) -> dict:
    """Pretrain from scratch (or `--resume`); returns the report. `on_step(step, record)` is a hook for tests."""
    from . import accounting
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .data import Batches, load_meta, validation_plan
    from .parallelize import all_reduce_sum, init_distributed
    from .tokenizer import load_tokenizer_file

    if not tc.data or not tc.out:
        raise LlamaforgeError("pass --data (a `llamaforge prepare` directory) and --out (the run directory)")
    if tc.warmup_steps >= tc.max_steps:
        raise LlamaforgeError(f"--warmup-steps {tc.warmup_steps} must be below --max-steps {tc.max_steps} "
                              "(LLaMA warms up for 2000 of ~250k steps; short runs need a short warmup)")
    if tc.dtype not in ("auto", "fp32", "bf16"):
        raise LlamaforgeError(f"--dtype must be fp32, bf16 or auto, got {tc.dtype!r}")
    d = init_distributed(tc.device)
    run, data = Path(tc.out), Path(tc.data)
    meta = load_meta(data)
    tok = load_tokenizer_file(data / meta["tokenizer"])
    cfg = model_config(tc, tok.vocab_size)
    seq_len, per_step = cfg.max_seq_len, tc.micro_batch_size * d.world_size
    n_seqs = tc.batch_tokens // seq_len  # global batch in sequences
    if tc.batch_tokens % seq_len or n_seqs % per_step or n_seqs == 0:
        raise LlamaforgeError(f"--batch-tokens {tc.batch_tokens} must be a multiple of seq_len x micro_batch_size x processes "
                              f"= {seq_len} x {tc.micro_batch_size} x {d.world_size} = {seq_len * per_step}")
    bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and d.device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16)
    ckpt = latest_checkpoint(run)
    if ckpt is not None and not tc.resume:
        raise LlamaforgeError(f"{run} already holds checkpoints: pass --resume to continue, or choose another --out")
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2) + "\n")

    model = build_model(cfg, tc, d)
    opt = make_optimizer(model, tc)
    batches = Batches(data, seq_len, seed=tc.seed)
    try:
        val, val_plan = validation_plan(data, seq_len, max(1, tc.eval_tokens // seq_len))
    except LlamaforgeError as e:
        val, val_plan = None, []
        print(f"no validation: {e}", file=sys.stderr)
    state = {"step": 0, "tokens": 0, "wall_s": 0.0, "train_s": 0.0}
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model, opt, cfg)
        batches.load_state_dict(saved["data"])
        state = {k: saved[k] for k in state}

    fpt = accounting.flops_per_token(cfg, seq_len)
    peak = tc.peak_flops or float(all_reduce_sum(torch.tensor(accounting.measure_peak_flops(
        d.device, torch.bfloat16 if bf16 else torch.float32)), d)) / d.world_size
    if d.is_main:
        print(f"model {cfg.name}: {cfg.n_params:,} parameters ({cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}), "
              f"{fpt / 1e6:.1f} MFLOP/token\nbatch {n_seqs} x {seq_len} = {n_seqs * seq_len:,} tokens = {tc.micro_batch_size} "
              f"x {d.world_size} processes x {n_seqs // per_step} accumulation steps; {'bf16' if bf16 else 'fp32'}, "
              f"ac {tc.ac}, compile {tc.compile}; peak {peak / 1e9:.0f} GFLOP/s per device"
              + (f"\nresuming from {ckpt} (step {state['step']})" if ckpt else ""), file=sys.stderr)

    lp = Loop(model, opt, batches, n_seqs, d, autocast, run,
              save=lambda step, st: save_checkpoint(run, step, model, opt, cfg, tok, st, d, tc.keep_checkpoints),
              evaluate=(lambda: evaluate(model, val, val_plan, d, tc.micro_batch_size, autocast)) if val is not None else None,
              fpt=fpt, peak=peak)
    log, stopped_by, last, wall_s = run_loop(lp, tc, state, ckpt is not None, on_step)
    final_val = next((r for r in reversed(log.records) if "val_loss" in r), None)
    report = accounting.run_report(
        cfg, seq_len, state["tokens"], state["step"], wall_s, state["train_s"], peak, d.world_size,
        torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        tc.device_power or (accounting.GPU_POWER_W if d.device.type == "cuda" else accounting.CPU_POWER_PER_THREAD_W * torch.get_num_threads()),
        tc.pue, tc.carbon_intensity, peak_measured=not tc.peak_flops,
        extra={"final_loss": next((r["loss"] for r in reversed(log.records) if "loss" in r), None),
               "final_val_loss": final_val["val_loss"] if final_val else None,
               "val_loss_by_source": final_val.get("val_loss_by_source") if final_val else None,
               "epochs_by_source": batches.epochs(), "stopped_by": stopped_by,
               "last_checkpoint_step": last["ckpt"], "last_eval_step": last["eval"]})
    if d.is_main:
        accounting.write_report(run / "report.json", report)
        print(("stopped by " + stopped_by + f" at step {state['step']}: resume with --resume\n" if stopped_by else "")
              + accounting.format_report(report), file=sys.stderr)
        if tc.sample_tokens and not stopped_by:
            report["samples"] = write_samples(run, tc)
    return report


def write_samples(run: Path, tc: TrainConfig, n: int = 3) -> list[str]:
    """Sample text from the exported model (run/model) and save it to run/samples.txt."""
    from .llm import load
    llm = load(run / "model", device="cpu", dtype=torch.float32)
    out = []
    for seed in range(n):
        text = llm.generate(tc.sample_prompt, max_new_tokens=tc.sample_tokens, temperature=0.8, top_k=200, top_p=1.0, seed=seed)
        out.append(tc.sample_prompt + text)
    (run / "samples.txt").write_text("".join(f"--- sample {i} (temperature 0.8, top-k 200) ---\n{s}\n" for i, s in enumerate(out)))
    print(f"\n--- sample (temperature 0.8) ---\n{out[0]}\n", file=sys.stderr)
    return out


# ---- CLI: flags generated from TrainConfig's fields ----

def add_train_flags(p: argparse.ArgumentParser, cls=None) -> None:
    """A flag per field of `cls` (TrainConfig, or fine-tuning's configs), help and default from the field."""
    for f in dataclasses.fields(cls or TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.metadata["type"] or type(f.default), default=f.default, help=help)


def cmd_pretrain(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        report = train(tc)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if report.get("stopped_by") in ("SIGTERM", "SIGINT"):
        raise SystemExit(128 + signal.Signals[report["stopped_by"]].value)


def add_commands(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a LLaMA from scratch (LLaMA recipe; torchrun for several processes)")
    add_train_flags(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.set_defaults(func=cmd_pretrain)
