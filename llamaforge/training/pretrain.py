"""Pretraining with the LLaMA recipe, as one readable loop (nanoGPT `train.py`), a function of `TrainConfig`.

Recipe (Touvron et al. 2023, section 2.2-2.4): AdamW (beta1 0.9, beta2 0.95, eps 1e-5), weight
decay 0.1 on 2-D weights only, gradient clipping at 1.0, linear warmup then cosine decay to 10% of
the peak learning rate, a global batch counted in tokens (reached by gradient accumulation and data
parallelism), packed sequences, bf16 autocast where the hardware has it, selective activation
checkpointing. Scale-out is FSDP2 through torchrun (`parallelize.py`); checkpoints are atomic and
resume exactly (`checkpoint.py`); every run writes log.jsonl, loss.png and report.json (`accounting.py`).
The loop itself (`loop.run_loop`) is shared with fine-tuning and DPO (`finetune.py`), which bring their own
batches, loss and checkpoint contents.

    torchrun --nproc_per_node 8 -m llamaforge pretrain --config llama-7b --data data/ --out run/
"""

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import accounting
from ..config import CONFIGS, ModelConfig
from ..errors import LlamaforgeError
from .parallelize import all_reduce_sum
from .loop import Loop, LoopConfig, _f, autocast_for, make_optimizer, run_loop


@dataclass
class TrainConfig(LoopConfig):
    config: str = _f("tiny", "model: a named config (config.CONFIGS; shakespeare-10m and micro are CPU demos) or a ModelConfig JSON file")
    data: str = _f("", "directory written by `llamaforge prepare`")
    out: str = _f("", "run directory: checkpoints, model/, log.jsonl, loss.png, report.json")
    dim: int | None = _f(None, "override the model width", int)
    n_layers: int | None = _f(None, "override the number of blocks", int)
    n_heads: int | None = _f(None, "override the number of attention heads", int)
    n_kv_heads: int | None = _f(None, "override the number of key/value heads", int)
    hidden_dim: int | None = _f(None, "override the feed-forward width", int)
    seq_len: int = _f(0, "sequence length (0: the model's context, at most 2048)")
    batch_tokens: int = _f(4 * 2 ** 20, "global batch in tokens (LLaMA: 4M); reached by accumulation x processes")
    compile: bool = _f(False, "torch.compile each block")
    init_std: float = _f(0.02, "std of the normal weight initialization")
    eval_tokens: int = _f(65536, "validation tokens per evaluation")
    sample_tokens: int = _f(0, "at the end, generate this many tokens of text from --sample-prompt")
    sample_prompt: str = _f("", "prompt for the samples (default: empty, i.e. BOS only)")


def model_config(tc: TrainConfig, vocab_size: int) -> ModelConfig:
    """The named config, preset or JSON file, with flag overrides, the tokenizer's vocabulary and the
    trained context (`--seq-len`, else the config's context up to 2048) as max_seq_len."""
    if tc.config in CONFIGS:
        d = ModelConfig.from_name(tc.config).to_dict()
    elif Path(tc.config).is_file():
        try:
            d = json.loads(Path(tc.config).read_text())
        except ValueError as e:
            raise LlamaforgeError(f"{tc.config} is not a ModelConfig JSON file: {e}") from None
    else:
        raise LlamaforgeError(f"unknown --config {tc.config!r}: pass a named config ({', '.join(CONFIGS)}) "
                              "or a ModelConfig JSON file")
    over = {k: getattr(tc, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim") if getattr(tc, k)}
    if "dim" in over and "hidden_dim" not in over:
        d["hidden_dim"] = None  # Meta's rule from the new width
    if "n_heads" in over and "n_kv_heads" not in over and d.get("n_kv_heads") in (None, d.get("n_heads")):
        d["n_kv_heads"] = None
    seq_len = tc.seq_len or min(d.get("max_seq_len", 2048), 2048)
    d.update(over, vocab_size=vocab_size, max_seq_len=seq_len)
    d["name"] = d.get("name") or Path(tc.config).stem
    return ModelConfig.from_dict(d)


@torch.no_grad()
def evaluate(model, val, plan, d, mbs: int, autocast) -> dict:
    """Mean validation loss over a fixed plan of windows, split evenly over ranks (FSDP needs equal forwards)."""
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
    from ..model import Transformer
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



def train(tc: TrainConfig, on_step=None) -> dict:
    """Pretrain from scratch (or `--resume`); returns the report. `on_step(step, record)` is a hook for tests."""
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .data import Batches, load_meta, validation_plan
    from .parallelize import all_reduce_sum, init_distributed
    from ..tokenizer import load_tokenizer_file

    if not tc.data or not tc.out:
        raise LlamaforgeError("pass --data (a `llamaforge prepare` directory) and --out (the run directory)")
    if tc.warmup_steps >= tc.max_steps:
        raise LlamaforgeError(f"--warmup-steps {tc.warmup_steps} must be below --max-steps {tc.max_steps} "
                              "(LLaMA warms up for 2000 of ~250k steps; short runs need a short warmup)")
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
    autocast, bf16 = autocast_for(tc.dtype, d.device)
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
        accounting.device_power(tc.device_power, d.device.type),
        tc.pue, tc.carbon_intensity, peak_measured=not tc.peak_flops, **accounting.cost_kwargs(tc),
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
    from ..llm import load
    llm = load(run / "model", device="cpu", dtype=torch.float32)
    out = []
    for seed in range(n):
        text = llm.generate(tc.sample_prompt, max_new_tokens=tc.sample_tokens, temperature=0.8, top_k=200, top_p=1.0, seed=seed)
        out.append(tc.sample_prompt + text)
    (run / "samples.txt").write_text("".join(f"--- sample {i} (temperature 0.8, top-k 200) ---\n{s}\n" for i, s in enumerate(out)))
    print(f"\n--- sample (temperature 0.8) ---\n{out[0]}\n", file=sys.stderr)
    return out


