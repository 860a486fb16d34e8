"""`llamaforge carbon | plan`: energy, carbon and cost of a training run (LLaMA section 6.1), compute-optimal planning."""
from __future__ import annotations

import json
from pathlib import Path

from ..accounting import (A100_BF16_FLOPS, CARBON_INTENSITY, CURRENCY, GPU_POWER_W, LIFETIME_YEARS, PRICE_PER_KWH, PUE,
                          carbon_row, chinchilla_optimal, compute_cost, cost_per_million_tokens, cost_row, format_cost,
                          llama_cost_table, money, overtrained, plot_cost_table)
from ..errors import LlamaforgeError


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _check_prices(args) -> None:
    if args.price_per_kwh < 0 or args.device_price < 0 or args.lifetime_years <= 0:
        raise LlamaforgeError("--price-per-kwh and --device-price must be >= 0 and --lifetime-years > 0")


def _print_table(args) -> None:
    rows = llama_cost_table(args.price_per_kwh, args.currency, args.gpu_power, args.pue, args.intensity,
                            args.device_price, args.lifetime_years, llama_only=not args.all_rows)
    cur = args.currency
    hw = args.device_price > 0
    print(f"{'model':<11} {'params':>6} {'tokens':>6} {'GPU-hours':>10} {'MWh':>6} {'tCO2eq':>6} {'MWh/tok/param':>13} "
          f"{'MFU*':>5} {'electricity':>11}" + (f" {'hardware':>10} {'total':>10}" if hw else "")
          + f" {'per Mtok':>8}   paper: MWh tCO2eq")
    for r in rows:
        c = r["cost"]
        print(f"{r['model']:<11} {_si(r['params']):>6} {_si(r['tokens']):>6} {r['gpu_hours']:>10,} {r['mwh']:>6.1f} "
              f"{r['tco2eq']:>6.1f} {r['mwh_per_token_param']:>13.3e} {100 * r['implied_mfu']:>4.0f}% "
              f"{c['electricity']:>11,.0f}" + (f" {c['hardware_amortized']:>10,.0f} {c['total']:>10,.0f}" if hw else "")
              + f" {c['per_million_tokens']:>8.4f}   {r['paper_mwh']:>10} {r['paper_tco2eq']:>6}")
    print(f"cost in {cur}: electricity at {args.price_per_kwh:g} {cur}/kWh"
          + (f", hardware {args.device_price:,.0f} {cur} per GPU amortized over {args.lifetime_years:g} years" if hw else "")
          + f"; {args.gpu_power:g} W per GPU, PUE {args.pue:g}, {args.intensity:g} kgCO2eq/kWh\n"
          f"* MFU the GPU-hours imply: 6 x params x tokens / (GPU-hours x {A100_BF16_FLOPS / 1e12:.0f} TFLOP/s, A100 bf16)")
    if args.plot:
        if plot_cost_table(rows, args.plot):
            print(f"wrote {args.plot}")
        else:
            raise LlamaforgeError("--plot needs matplotlib (pip install matplotlib)")


def _generation_costs(args) -> list[str]:
    out = []
    if args.j_per_token is not None:
        if args.j_per_token <= 0:
            raise LlamaforgeError(f"--j-per-token must be > 0, got {args.j_per_token}")
        c = cost_per_million_tokens(args.j_per_token, args.price_per_kwh, args.pue)
        out.append(f"generation: {args.j_per_token:g} J/token x PUE {args.pue:g} -> {money(c)} {args.currency} per million tokens generated")
    if args.efficiency:
        path = Path(args.efficiency)
        path = path / "efficiency.json" if path.is_dir() else path
        try:
            rep = json.loads(path.read_text())
            rows = [r for r in rep["variants"] if r.get("status") == "ok"]
        except (ValueError, KeyError, TypeError):
            raise LlamaforgeError(f"{path} is not an efficiency.json (`llamaforge efficiency` writes one)") from None
        for r in rows:
            parts = [f"{what} {money(cost_per_million_tokens(r[k], args.price_per_kwh, args.pue))} {args.currency}/Mtok "
                     f"({r[k]:.3g} J/token)" for what, k in (("generated", "decode_energy_per_token_j"),
                                                             ("scored", "energy_per_token_j")) if r.get(k)]
            out.append(f"{rep.get('model', '?')} {r['variant']}: " + ", ".join(parts) + f" at {rep.get('watts', 0):g} W")
    return out


def cmd_carbon(args) -> None:
    _check_prices(args)
    if args.table:
        _print_table(args)
        return
    gen = _generation_costs(args)
    if args.gpu_hours is None and gen:
        print("\n".join(gen))
        return
    if args.gpu_hours is None or args.gpu_hours < 0 or args.gpu_power <= 0:
        raise LlamaforgeError("pass --gpu-hours H (>= 0) and --gpu-power W (> 0), --j-per-token / --efficiency for "
                              "generation, or --table for LLaMA's Table 15")
    if args.tokens is not None and args.tokens <= 0:
        raise LlamaforgeError(f"--tokens must be > 0, got {args.tokens}")
    r = carbon_row(args.gpu_hours, args.gpu_power, args.pue, args.intensity)
    print(f"{args.gpu_hours:,.0f} GPU-hours x {args.gpu_power:g} W x PUE {args.pue:g} = {r['mwh']:,.1f} MWh "
          f"-> {r['tco2eq']:,.1f} tCO2eq at {args.intensity:g} kg/kWh")
    c = cost_row(r["mwh"] * 1000, args.gpu_hours, args.price_per_kwh, args.currency, args.device_price,
                 args.lifetime_years, args.tokens)
    print("cost: " + format_cost(c))
    if gen:
        print("\n".join(gen))


def cmd_plan(args) -> None:
    _check_prices(args)
    c = chinchilla_optimal(args.flops)
    r20, a3 = c["rule_20"], c["approach3"]
    cost = lambda flops, tokens: compute_cost(flops, args.device_flops, args.mfu, args.device_power, args.pue,  # noqa: E731
                                              args.intensity, args.price_per_kwh, args.currency, args.device_price,
                                              args.lifetime_years, tokens)
    k = cost(args.flops, a3["tokens"])
    print(f"compute budget {args.flops:.3e} FLOPs (C = 6 N D)")
    print(f"  Chinchilla D = 20 N:      {_si(r20['params'])} parameters, {_si(r20['tokens'])} tokens")
    print(f"  Chinchilla approach 3:    {_si(a3['params'])} parameters, {_si(a3['tokens'])} tokens, predicted loss {a3['loss']:.3f}")
    print(f"  on devices of {args.device_flops / 1e12:g} TFLOP/s at MFU {100 * args.mfu:g}% drawing {args.device_power:g} W: "
          f"{_si(k['device_hours'])} device-hours, {k['mwh']:,.1f} MWh, {k['tco2eq']:,.1f} tCO2eq; "
          + format_cost(k["cost"]).replace("per million tokens trained", "per million tokens trained (approach 3)"))
    if args.inference_tokens:
        o = overtrained(args.flops, args.inference_tokens)
        saved = 1 - o["total_flops"] / o["optimal_total_flops"]
        print(f"  with {_si(args.inference_tokens)} inference tokens, the same loss for less: {_si(o['params'])} parameters "
              f"trained on {_si(o['tokens'])} tokens ({o['tokens'] / o['params']:.0f} per parameter), "
              f"train {o['train_flops']:.2e} + inference {o['inference_flops']:.2e} FLOPs, {100 * saved:.0f}% below "
              "the compute-optimal model's lifetime cost")
        t = cost(o["train_flops"], o["tokens"])["cost"]
        i = cost(o["inference_flops"], None)["cost"]
        print(f"    its training: {format_cost(t)}\n    its inference at the same MFU: {money(i['total'])} {args.currency}, "
              f"{money(i['total'] / args.inference_tokens * 1e6)} {args.currency} per million tokens generated")


def _add_cost_flags(p) -> None:
    p.add_argument("--price-per-kwh", type=float, default=PRICE_PER_KWH,
                   help=f"electricity price per kWh (default {PRICE_PER_KWH:g}: US industrial average 2023, EIA)")
    p.add_argument("--currency", default=CURRENCY, help=f"currency of the prices (default {CURRENCY})")
    p.add_argument("--device-price", type=float, default=0.0, help="price of one device, amortized over --lifetime-years (0: electricity only)")
    p.add_argument("--lifetime-years", type=float, default=LIFETIME_YEARS, help=f"device lifetime for amortization (default {LIFETIME_YEARS:g})")
    p.add_argument("--pue", type=float, default=PUE, help=f"datacenter power usage effectiveness (default {PUE})")
    p.add_argument("--intensity", type=float, default=CARBON_INTENSITY, help=f"kg CO2eq per kWh (default {CARBON_INTENSITY}, US average)")


def add_commands(sub) -> None:
    c = sub.add_parser("carbon", help="energy, tCO2eq and cost of a training run or of generation (LLaMA paper section 6.1)")
    c.add_argument("--gpu-hours", type=float, default=None, help="device-hours of training")
    c.add_argument("--gpu-power", type=float, default=GPU_POWER_W, help=f"power per device in W (default {GPU_POWER_W:g}, A100)")
    c.add_argument("--tokens", type=float, default=None, help="tokens trained, for the cost per million tokens")
    c.add_argument("--j-per-token", type=float, default=None, help="measured energy per generated token (J), for its cost")
    c.add_argument("--efficiency", default=None, metavar="FILE", help="efficiency.json of `llamaforge efficiency`: cost per million tokens of each variant")
    _add_cost_flags(c)
    c.add_argument("--table", action="store_true", help="reproduce LLaMA Table 15 with tokens, MWh per token per parameter and cost")
    c.add_argument("--all-rows", action="store_true", help="with --table: OPT-175B and BLOOM too")
    c.add_argument("--plot", default=None, metavar="PNG", help="with --table: draw MWh/token/parameter and cost per size")
    c.set_defaults(func=cmd_carbon)
    p = sub.add_parser("plan", help="Chinchilla compute-optimal size and tokens for a FLOPs budget, and what it costs")
    p.add_argument("--flops", type=float, required=True, help="training compute in FLOPs, e.g. 1e21")
    p.add_argument("--inference-tokens", type=float, default=0, help="expected tokens served over the model's life")
    p.add_argument("--device-flops", type=float, default=A100_BF16_FLOPS, help="peak FLOP/s per device (default 312e12, A100 bf16)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization to expect (default 0.4; LLaMA-65B's GPU-hours imply ~0.48)")
    p.add_argument("--device-power", type=float, default=GPU_POWER_W, help=f"W per device (default {GPU_POWER_W:g})")
    _add_cost_flags(p)
    p.set_defaults(func=cmd_plan)
