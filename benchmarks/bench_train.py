"""Training throughput: tokens/s and MFU of one optimizer step (forward, backward, clip, AdamW) for fixed configs.

Random tokens (the data loader is not what is measured), the real model, `apply_ac` and the
optimizer of `llamaforge.training`. MFU is against the matmul peak measured in the same run
(`accounting.measure_peak_flops`), so it says how much of this machine the loop gets. Writes JSON
(and a PNG when matplotlib is there). On a shared machine, numbers move with the load: the JSON
records the load average before and after.

    python benchmarks/bench_train.py --out benchmarks/results/train_cpu.json
    python benchmarks/bench_train.py --configs shakespeare-10m --ac none selective full --steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llamaforge import accounting  # noqa: E402
from llamaforge.model import Transformer  # noqa: E402
from llamaforge.training.parallelize import apply_ac, apply_compile  # noqa: E402
from llamaforge.training.pretrain import TrainConfig, model_config
from llamaforge.training.loop import make_optimizer  # noqa: E402


def bench_one(name: str, ac: str, dtype: str, device: str, batch: int, seq_len: int, vocab: int, steps: int,
              compile: bool = False) -> dict:
    tc = TrainConfig(config=name, seq_len=seq_len, ac=ac)
    cfg = model_config(tc, vocab)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    model.to(device)
    apply_ac(model, ac)
    if compile:
        apply_compile(model)
    opt = make_optimizer(model, tc)
    bf16 = dtype == "bf16"
    x = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    tok_s = batch * seq_len / med
    fpt = accounting.flops_per_token(cfg, seq_len)
    return {"config": name, "params": cfg.n_params, "ac": ac, "dtype": dtype, "compile": compile, "batch": batch,
            "seq_len": seq_len, "vocab": vocab, "step_s_median": med, "step_s_min": times[0], "tokens_per_s": tok_s,
            "flops_per_token": fpt, "model_gflops_per_s": fpt * tok_s / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["micro", "shakespeare-10m"])
    p.add_argument("--ac", nargs="+", default=["none", "selective", "full"])
    p.add_argument("--dtypes", nargs="+", default=["fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd blocks")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    peaks = {dt: accounting.measure_peak_flops(args.device, torch.bfloat16 if dt == "bf16" else torch.float32)
             for dt in args.dtypes}
    rows = []
    for name in args.configs:
        for dt in args.dtypes:
            for ac in args.ac:
                for comp in ([False, True] if args.compile else [False]):
                    r = bench_one(name, ac, dt, args.device, args.batch, args.seq_len, args.vocab, args.steps, comp)
                    r["peak_flops"] = peaks[dt]
                    r["mfu"] = r["model_gflops_per_s"] * 1e9 / peaks[dt]
                    rows.append(r)
                    print(f"{name:<16} {dt:<4} ac={ac:<9} compile={comp!s:<5} {r['params'] / 1e6:6.2f}M params  "
                          f"{r['tokens_per_s']:8,.0f} tok/s  {r['model_gflops_per_s']:6.1f} GFLOP/s  MFU {100 * r['mfu']:5.1f}%  "
                          f"(step {r['step_s_median']:.2f}s)", flush=True)
    out = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
           "torch": torch.__version__, "peak_flops_measured": peaks, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
           "results": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['config']}\n{r['dtype']} ac={r['ac']}" + ("\ncompiled" if r["compile"] else "") for r in rows]
    ax.bar(range(len(rows)), [100 * r["mfu"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("MFU (% of measured matmul peak)")
    for i, r in enumerate(rows):
        ax.text(i, 100 * r["mfu"], f"{r['tokens_per_s']:,.0f} tok/s", ha="center", va="bottom", fontsize=7)
    ax.set_title(f"training step throughput, {out['device']}")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
