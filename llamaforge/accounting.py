"""Cost accounting: FLOPs, MFU, energy and carbon (LLaMA section 6), and compute planning; the one
home of the FLOPs formulas (training, fine-tuning, inference).

- `flops_per_token`: 6N plus attention, as PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT
  `estimate_mfu`; MFU is measured against the device's *measured* matmul peak.
- `energy_kwh` / `co2_tonnes`: the LLaMA paper's formula (Touvron et al. 2023, section 6.1):
  Wh = GPU-h x (GPU power) x PUE, tCO2eq = MWh x 0.385; `LLAMA_TABLE15` holds the paper's rows.
- `chinchilla_optimal` / `overtrained`: Hoffmann et al. 2022 (approach 3 fit and the 20
  tokens/parameter rule), and the smaller model trained longer that reaches the same loss at a
  lower training + inference cost (Sardana & Frankle 2023), which is LLaMA's choice.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .config import ModelConfig
from .errors import LlamaforgeError

# LLaMA paper defaults (section 6.1): A100-80GB at 400 W, datacenter PUE 1.1, US average 0.385 kgCO2eq/kWh.
GPU_POWER_W = 400.0
PUE = 1.1
CARBON_INTENSITY = 0.385  # kg CO2eq per kWh
# CPU power is a guess, not a measurement: ~10 W per busy core of a server socket. Pass --device-power.
CPU_POWER_PER_THREAD_W = 10.0

# LLaMA Table 15 (and the OPT/BLOOM rows it compares with): GPU-hours -> MWh -> tCO2eq, all at 400 W.
LLAMA_TABLE15 = [
    # name, GPU-hours, MWh, tCO2eq (as printed in the paper)
    ("OPT-175B", 809_472, 356, 137),
    ("BLOOM-175B", 1_082_880, 475, 183),
    ("LLaMA-7B", 82_432, 36, 14),
    ("LLaMA-13B", 135_168, 59, 23),
    ("LLaMA-33B", 530_432, 233, 90),
    ("LLaMA-65B", 1_022_362, 449, 173),
]

# Chinchilla approach 3 fit, L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 10).
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


# ---- FLOPs and MFU ----

def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matrix product: all but the input embedding lookup and the norms.

    A tied embedding is the output projection too, so it counts once; an untied input embedding is
    a table lookup and costs no FLOPs.
    """
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return cfg.n_params - norms - embedding


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 N + 12 L T dim.

    Derivation (PaLM appendix B; Kaplan et al. 2020 table 1). A weight matrix of N entries applied to
    one token costs N multiply-adds = 2N FLOPs in the forward pass. The backward pass computes two
    products of the same size, the gradient with respect to the input and with respect to the
    weight: 4N. Together 6N per token, N = `matmul_params(cfg)`.
    Attention adds products whose size depends on the context, not on parameters: per layer and
    token, the scores q.k over T positions cost 2 T dim FLOPs and the weighted sum of values another
    2 T dim, so 4 T dim forward and 12 T dim forward + backward; 12 L T dim over L layers.
    Like PaLM we count the full T x T score matrix; a causal kernel skips half of it, so this is an
    upper bound for that term. Recomputation (activation checkpointing) is not counted: MFU counts
    the model's FLOPs, not the hardware's (that would be HFU).
    """
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * seq_len * cfg.dim


def forward_flops_per_token(cfg: ModelConfig, context: float) -> float:
    """Inference FLOPs per token: 2 N + 4 L T dim, the forward third of `flops_per_token` at a mean
    context of T positions. Weight-only quantization changes bytes moved, not multiply-adds."""
    return 2 * matmul_params(cfg) + 4 * cfg.n_layers * context * cfg.dim


def finetune_flops_per_token(cfg: ModelConfig, mean_len: float, target_frac: float, full: bool, dpo: bool = False) -> float:
    """Fine-tuning FLOPs per input token, `flops_per_token`'s derivation adapted: a matrix of N entries
    costs 2N forward, 2N for the input gradient and, only if it trains, 2N for its weight gradient (6N
    full, 4N LoRA: the adapters are negligible); the output projection runs only at target positions
    (`target_frac` of the tokens); attention costs 12 L T dim at the rows' mean length T. DPO adds the
    reference model's forward pass (2N + 4 L T dim)."""
    head = cfg.vocab_size * cfg.dim
    per = (6 if full else 4) + (2 if dpo else 0)
    attn = (12 + (4 if dpo else 0)) * cfg.n_layers * mean_len * cfg.dim
    return per * (matmul_params(cfg) - head) + per * head * target_frac + attn


def measure_peak_flops(device: str = "cpu", dtype=None, n: int | None = None, reps: int = 5) -> float:
    """The best FLOP/s of square matmuls in `dtype` on `device`: the peak MFU is measured against.

    On a CPU this is the attainable GEMM rate of the threads torch uses (not a datasheet number), so
    MFU says how much of what this machine can do the training loop gets. The best of several sizes
    and repetitions: on a shared machine a slow run measures the neighbours, not the hardware.
    """
    import torch
    dtype = dtype or torch.float32
    cuda = str(device).startswith("cuda")
    sizes = [n] if n else ([4096, 8192] if cuda else [1024, 2048])
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for i in range(reps + 1):  # the first run warms up (allocation, cuBLAS heuristics)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if cuda:
                torch.cuda.synchronize()
            if i:
                best = max(best, 2 * size ** 3 / (time.perf_counter() - t0))
    return best


def mfu(flops_per_tok: float, tokens_per_s: float, peak_flops: float, n_devices: int = 1) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' peak."""
    return flops_per_tok * tokens_per_s / (peak_flops * n_devices)


# ---- energy and carbon (LLaMA section 6.1) ----

def energy_kwh(device_hours: float, power_w: float = GPU_POWER_W, pue: float = PUE) -> float:
    """kWh = device-hours x power x PUE / 1000 (device-hours: wall hours x number of devices)."""
    return device_hours * power_w * pue / 1000.0


def co2_tonnes(kwh: float, intensity: float = CARBON_INTENSITY) -> float:
    """tCO2eq = kWh x kg/kWh / 1000."""
    return kwh * intensity / 1000.0


def carbon_row(gpu_hours: float, power_w: float = GPU_POWER_W, pue: float = PUE,
               intensity: float = CARBON_INTENSITY) -> dict:
    kwh = energy_kwh(gpu_hours, power_w, pue)
    return {"gpu_hours": gpu_hours, "power_w": power_w, "pue": pue, "kg_per_kwh": intensity,
            "mwh": kwh / 1000.0, "tco2eq": co2_tonnes(kwh, intensity)}


# ---- planning: Chinchilla-optimal and over-trained ----

def chinchilla_loss(n_params: float, n_tokens: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / n_params ** c["alpha"] + c["B"] / n_tokens ** c["beta"]


def chinchilla_optimal(flops: float) -> dict:
    """Compute-optimal parameters and tokens for C = 6 N D training FLOPs, two ways.

    - rule of thumb (Hoffmann et al. table 3, approaches 1 and 2): D = 20 N, so N = sqrt(C / 120).
    - approach 3 (parametric fit): minimizing L(N, D) on C = 6 N D gives
      N = G (C/6)^a, D = (C/6)^b / G with a = beta / (alpha + beta), b = alpha / (alpha + beta),
      G = (alpha A / (beta B))^(1 / (alpha + beta)).
    """
    if not flops > 0:
        raise LlamaforgeError(f"--flops must be a positive number, got {flops}")
    c = CHINCHILLA
    a, b = c["beta"] / (c["alpha"] + c["beta"]), c["alpha"] / (c["alpha"] + c["beta"])
    g = (c["alpha"] * c["A"] / (c["beta"] * c["B"])) ** (1 / (c["alpha"] + c["beta"]))
    n3, d3 = g * (flops / 6) ** a, (flops / 6) ** b / g
    n20 = math.sqrt(flops / 120)
    return {"flops": flops,
            "rule_20": {"params": n20, "tokens": 20 * n20, "loss": chinchilla_loss(n20, 20 * n20)},
            "approach3": {"params": n3, "tokens": d3, "loss": chinchilla_loss(n3, d3)}}


def tokens_for_loss(n_params: float, loss: float) -> float:
    """Tokens a model of n_params needs to reach `loss` under the approach 3 fit (inf if it never does)."""
    c = CHINCHILLA
    gap = loss - c["E"] - c["A"] / n_params ** c["alpha"]
    return (c["B"] / gap) ** (1 / c["beta"]) if gap > 0 else math.inf


def overtrained(flops: float, inference_tokens: float) -> dict:
    """The model that reaches the compute-optimal loss at the least training + inference cost.

    Target loss L* = L(N_opt, D_opt) of the approach 3 optimum for `flops`. A smaller N reaches L*
    with more tokens D(N) (`tokens_for_loss`); its lifetime cost is 6 N D(N) to train plus
    2 N per inference token. We minimize that over N on a log grid below N_opt.
    """
    opt = chinchilla_optimal(flops)["approach3"]
    target = opt["loss"]
    best = None
    for i in range(2001):  # N from N_opt down to N_opt / 100
        n = opt["params"] * 10 ** (-2 * i / 2000)
        d = tokens_for_loss(n, target)
        if not math.isfinite(d):
            break
        total = 6 * n * d + 2 * n * inference_tokens
        if best is None or total < best["total_flops"]:
            best = {"params": n, "tokens": d, "train_flops": 6 * n * d, "inference_flops": 2 * n * inference_tokens,
                    "total_flops": total, "loss": target}
    best["optimal_total_flops"] = 6 * opt["params"] * opt["tokens"] + 2 * opt["params"] * inference_tokens
    return best


# ---- the run report ----

def run_report(cfg: ModelConfig, seq_len: int, tokens: int, steps: int, wall_s: float, train_s: float,
               peak_flops: float, n_devices: int, device: str, power_w: float, pue: float = PUE,
               intensity: float = CARBON_INTENSITY, peak_measured: bool = True, extra: dict | None = None) -> dict:
    """Everything `run/report.json` holds: size, tokens, FLOPs, MFU, time, energy, carbon."""
    fpt = flops_per_token(cfg, seq_len)
    total = fpt * tokens
    tok_s = tokens / train_s if train_s > 0 else 0.0
    device_hours = wall_s / 3600 * n_devices
    kwh = energy_kwh(device_hours, power_w, pue)
    opt = chinchilla_optimal(total)["rule_20"] if total > 0 else None
    return {
        "params": cfg.n_params, "params_matmul": matmul_params(cfg),
        "params_non_embedding": cfg.n_params - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2),
        "tokens": tokens, "steps": steps, "seq_len": seq_len, "tokens_per_param": tokens / cfg.n_params,
        "flops_per_token": fpt, "train_flops": total,
        "device": device, "n_devices": n_devices, "peak_flops_per_device": peak_flops,
        "peak_flops_source": "measured" if peak_measured else "given",
        "tokens_per_s": tok_s, "mfu": mfu(fpt, tok_s, peak_flops, n_devices) if peak_flops else None,
        "wall_s": wall_s, "train_s": train_s, "device_hours": device_hours,
        "power_w_per_device": power_w, "pue": pue, "energy_kwh": kwh,
        "kg_co2_per_kwh": intensity, "tco2eq": co2_tonnes(kwh, intensity),
        "chinchilla_optimal_for_this_compute": opt, **(extra or {}),
    }


def format_report(r: dict) -> str:
    lines = [
        f"parameters      {r['params']:,} ({r['params_matmul']:,} in matmuls)",
        f"tokens          {r['tokens']:,} ({r['tokens_per_param']:.2f} per parameter; Chinchilla-optimal is ~20)",
        f"training FLOPs  {r['train_flops']:.3e} ({r['flops_per_token']:,} per token)",
        f"throughput      {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * (r['mfu'] or 0):.1f}% of a {r['peak_flops_source']} "
        f"{r['peak_flops_per_device'] / 1e9:,.0f} GFLOP/s x {r['n_devices']} {r['device']}",
        f"time            {r['wall_s'] / 60:.1f} min wall ({r['train_s'] / 60:.1f} min in training steps)",
        f"energy          {r['energy_kwh']:.4f} kWh ({r['power_w_per_device']:g} W x {r['n_devices']} x PUE {r['pue']:g})",
        f"carbon          {r['tco2eq'] * 1e6:.1f} gCO2eq ({r['kg_co2_per_kwh']:g} kg/kWh)",
    ]
    return "\n".join(lines)


def write_report(path: str | Path, report: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


# ---- CLI ----
