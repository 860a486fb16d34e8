"""Cost accounting: FLOPs, MFU, energy and carbon (LLaMA section 6), and compute planning; the one
home of the FLOPs formulas (training, fine-tuning, inference).

- `flops_per_token`: 6N plus attention, as PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT
  `estimate_mfu`; MFU is measured against the device's *measured* matmul peak.
- `energy_kwh` / `co2_tonnes`: the LLaMA paper's formula (Touvron et al. 2023, section 6.1):
  Wh = GPU-h x (GPU power) x PUE, tCO2eq = MWh x 0.385; `LLAMA_TABLE15` holds the paper's rows.
- `cost_row` / `cost_per_million_tokens`: the same energy in money, electricity at a tariff per kWh
  plus, optionally, the devices' price amortized over their lifetime; `llama_cost_table` puts
  Table 15 next to the tokens and parameters of each LLaMA size (MWh per token per parameter, the
  MFU the GPU-hours imply, cost at a stated tariff).
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


# ---- cost in money ----

# A stated tariff, not a market price: the US industrial average for 2023 (EIA Electric Power Monthly,
# table 5.3: 8.0 cents/kWh). Pass your own with --price-per-kwh and --currency.
PRICE_PER_KWH = 0.08
CURRENCY = "USD"
LIFETIME_YEARS = 4.0  # a device's useful life for amortization (a common depreciation period for servers)
HOURS_PER_YEAR = 8766.0  # 365.25 x 24
A100_BF16_FLOPS = 312e12  # A100 dense bf16 tensor-core peak (NVIDIA datasheet)
# DGX A100 launch list price, 8 GPUs (NVIDIA, May 2020): LLaMA-65B trained on 2048 A100s = 256 DGX.
DGX_A100_PRICE_USD = 199_000.0
# Parameters and training tokens of the Table 15 rows: LLaMA (Touvron et al. 2023, table 2), OPT-175B
# (Zhang et al. 2022: 180B tokens), BLOOM (Le Scao et al. 2022: 176B parameters, 366B tokens).
TABLE15_SIZES = {"OPT-175B": (175e9, 180e9), "BLOOM-175B": (176e9, 366e9),
                 "LLaMA-7B": (6.7e9, 1.0e12), "LLaMA-13B": (13.0e9, 1.0e12),
                 "LLaMA-33B": (32.5e9, 1.4e12), "LLaMA-65B": (65.2e9, 1.4e12)}


def electricity_cost(kwh: float, price_per_kwh: float = PRICE_PER_KWH) -> float:
    return kwh * price_per_kwh


def hardware_cost(device_hours: float, device_price: float, lifetime_years: float = LIFETIME_YEARS) -> float:
    """The devices' price amortized over their life: each device-hour costs price / lifetime hours.

    n devices for h wall hours: n x price x h / (lifetime x 8766) = price x device-hours / lifetime hours,
    so the number of devices cancels (256 DGX A100 for 21 days or 1 for 15 years cost the same share).
    """
    if lifetime_years <= 0:
        raise LlamaforgeError(f"--lifetime-years must be > 0, got {lifetime_years}")
    return device_price * device_hours / (lifetime_years * HOURS_PER_YEAR)


def cost_per_million_tokens(j_per_token: float, price_per_kwh: float = PRICE_PER_KWH, pue: float = 1.0) -> float:
    """Electricity for a million tokens at `j_per_token` joules each (1 kWh = 3.6e6 J), times PUE."""
    return j_per_token * 1e6 / 3.6e6 * pue * price_per_kwh


def cost_row(kwh: float, device_hours: float, price_per_kwh: float = PRICE_PER_KWH, currency: str = CURRENCY,
             device_price: float = 0.0, lifetime_years: float = LIFETIME_YEARS, tokens: float | None = None) -> dict:
    """Electricity (kWh x price), amortized hardware (optional: `device_price` per device) and their sum
    per million tokens trained (when `tokens` is given)."""
    if price_per_kwh < 0 or device_price < 0:
        raise LlamaforgeError(f"prices must be >= 0, got --price-per-kwh {price_per_kwh} and --device-price {device_price}")
    elec = electricity_cost(kwh, price_per_kwh)
    hw = hardware_cost(device_hours, device_price, lifetime_years) if device_price else 0.0
    return {"currency": currency, "price_per_kwh": price_per_kwh, "electricity": elec,
            "device_price": device_price, "lifetime_years": lifetime_years, "hardware_amortized": hw,
            "total": elec + hw, "per_million_tokens": (elec + hw) / tokens * 1e6 if tokens else None}


def compute_cost(flops: float, device_flops: float = A100_BF16_FLOPS, mfu: float = 0.4, power_w: float = GPU_POWER_W,
                 pue: float = PUE, intensity: float = CARBON_INTENSITY, price_per_kwh: float = PRICE_PER_KWH,
                 currency: str = CURRENCY, device_price: float = 0.0, lifetime_years: float = LIFETIME_YEARS,
                 tokens: float | None = None) -> dict:
    """What `flops` of training cost on devices of `device_flops` peak run at `mfu`: device-hours =
    FLOPs / (peak x MFU) / 3600, then energy, carbon and money as above."""
    if not (device_flops > 0 and 0 < mfu <= 1 and power_w > 0):
        raise LlamaforgeError(f"need --device-flops > 0, 0 < --mfu <= 1 and --device-power > 0; got {device_flops}, {mfu}, {power_w}")
    hours = flops / (device_flops * mfu) / 3600
    r = carbon_row(hours, power_w, pue, intensity)
    return {**r, "device_hours": hours, "cost": cost_row(r["mwh"] * 1000, hours, price_per_kwh, currency, device_price,
                                                           lifetime_years, tokens)}


def device_power(given: float | None, device_type: str) -> float:
    """W per device: the given figure, else 400 W for a GPU (LLaMA's A100) or 10 W per CPU thread (a guess)."""
    if given is not None:
        return given
    if device_type == "cuda":
        return GPU_POWER_W
    import torch
    return CPU_POWER_PER_THREAD_W * torch.get_num_threads()


def cost_kwargs(tc) -> dict:
    """The cost settings of a training job's config (`LoopConfig`), as `run_report` / `cost_row` take them."""
    return {k: getattr(tc, k) for k in ("price_per_kwh", "currency", "device_price", "lifetime_years")}


def llama_cost_table(price_per_kwh: float = PRICE_PER_KWH, currency: str = CURRENCY, power_w: float = GPU_POWER_W,
                     pue: float = PUE, intensity: float = CARBON_INTENSITY, device_price: float = 0.0,
                     lifetime_years: float = LIFETIME_YEARS, llama_only: bool = True) -> list[dict]:
    """Table 15's LLaMA rows (and OPT/BLOOM unless `llama_only`) with parameters and tokens: MWh, tCO2eq, MWh per token per parameter (about
    constant if energy follows 6 N D), the MFU the GPU-hours imply (6 N D over the A100's bf16 peak) and cost."""
    rows = []
    for name, hours, paper_mwh, paper_t in LLAMA_TABLE15:
        if llama_only and not name.startswith("LLaMA"):
            continue
        n, d = TABLE15_SIZES[name]
        r = carbon_row(hours, power_w, pue, intensity)
        rows.append({"model": name, "params": n, "tokens": d, **r, "paper_mwh": paper_mwh, "paper_tco2eq": paper_t,
                     "mwh_per_token_param": r["mwh"] / (n * d),
                     "implied_mfu": 6 * n * d / (hours * 3600 * A100_BF16_FLOPS),
                     "cost": cost_row(r["mwh"] * 1000, hours, price_per_kwh, currency, device_price, lifetime_years, d)})
    return rows


def plot_cost_table(rows: list[dict], path: str | Path) -> bool:
    """MWh per token per parameter and cost per LLaMA size, as a PNG; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["model"] for r in rows]
    cur = rows[0]["cost"]["currency"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [r["mwh_per_token_param"] * 1e21 for r in rows], color="tab:green")
    a.set_ylabel("MWh per token per parameter (x 1e-21)")
    a.set_title("training energy per token per parameter (Table 15)")
    a.tick_params(axis="x", labelsize=8)
    b.tick_params(axis="x", labelsize=8)
    for i, r in enumerate(rows):
        a.annotate(f"{r['mwh']:.0f} MWh", (i, r["mwh_per_token_param"] * 1e21), ha="center", va="bottom", fontsize=8)
    elec = [r["cost"]["electricity"] for r in rows]
    hw = [r["cost"]["hardware_amortized"] for r in rows]
    x = range(len(rows))
    w = 0.4 if any(hw) else 0.8
    b.bar([i - w / 2 * bool(any(hw)) for i in x], elec, w, label=f"electricity at {rows[0]['cost']['price_per_kwh']:g} {cur}/kWh")
    if any(hw):  # side by side on a log axis: hardware is ~20x electricity at LLaMA's figures
        b.bar([i + w / 2 for i in x], hw, w, label=f"hardware, amortized over {rows[0]['cost']['lifetime_years']:g} years")
        b.set_yscale("log")
    b.set_xticks(list(x), names)
    b.set_ylabel(f"cost ({cur})")
    b.set_title("training cost")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
               intensity: float = CARBON_INTENSITY, peak_measured: bool = True, extra: dict | None = None,
               price_per_kwh: float = PRICE_PER_KWH, currency: str = CURRENCY, device_price: float = 0.0,
               lifetime_years: float = LIFETIME_YEARS) -> dict:
    """Everything `run/report.json` holds: size, tokens, FLOPs, MFU, time, energy, carbon, cost."""
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
        "cost": cost_row(kwh, device_hours, price_per_kwh, currency, device_price, lifetime_years, tokens),
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
    if r.get("cost"):
        lines.append("cost            " + format_cost(r["cost"]))
    return "\n".join(lines)


def money(x: float) -> str:
    """12,345 | 12.35 | 0.01235: whole units when large, three significant digits when small."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:,.2f}" if abs(x) >= 1 else f"{x:.3g}"


def format_cost(c: dict) -> str:
    """'12.35 USD electricity at 0.08 USD/kWh + 45.60 USD hardware (...) = 57.95 USD; 0.58 USD per million tokens trained'."""
    cur = c["currency"]
    out = f"{money(c['electricity'])} {cur} electricity at {c['price_per_kwh']:g} {cur}/kWh"
    if c["device_price"]:
        out += (f" + {money(c['hardware_amortized'])} {cur} hardware ({c['device_price']:,.0f} {cur} per device over "
                f"{c['lifetime_years']:g} years) = {money(c['total'])} {cur}")
    if c.get("per_million_tokens") is not None:
        out += f"; {money(c['per_million_tokens'])} {cur} per million tokens trained"
    return out


def write_report(path: str | Path, report: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


# ---- CLI ----
