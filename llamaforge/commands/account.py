"""`llamaforge carbon | plan`: energy and carbon of a training run (LLaMA section 6.1), compute-optimal planning."""
from __future__ import annotations

from ..accounting import (CARBON_INTENSITY, GPU_POWER_W, LLAMA_TABLE15, PUE, carbon_row, chinchilla_optimal,
                          overtrained)
from ..errors import LlamaforgeError


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def cmd_carbon(args) -> None:
    if args.table:
        print(f"{'model':<12} {'GPU-hours':>11} {'MWh':>7} {'tCO2eq':>7}   paper: MWh tCO2eq")
        for name, hours, mwh, t in LLAMA_TABLE15:
            r = carbon_row(hours, args.gpu_power, args.pue, args.intensity)
            print(f"{name:<12} {hours:>11,} {r['mwh']:>7.1f} {r['tco2eq']:>7.1f}   {mwh:>10} {t:>6}")
        return
    if args.gpu_hours is None or args.gpu_hours < 0 or args.gpu_power <= 0:
        raise LlamaforgeError("pass --gpu-hours H (>= 0) and --gpu-power W (> 0), or --table for LLaMA's Table 15")
    r = carbon_row(args.gpu_hours, args.gpu_power, args.pue, args.intensity)
    print(f"{args.gpu_hours:,.0f} GPU-hours x {args.gpu_power:g} W x PUE {args.pue:g} = {r['mwh']:,.1f} MWh "
          f"-> {r['tco2eq']:,.1f} tCO2eq at {args.intensity:g} kg/kWh")


def cmd_plan(args) -> None:
    c = chinchilla_optimal(args.flops)
    r20, a3 = c["rule_20"], c["approach3"]
    print(f"compute budget {args.flops:.3e} FLOPs (C = 6 N D)")
    print(f"  Chinchilla D = 20 N:      {_si(r20['params'])} parameters, {_si(r20['tokens'])} tokens")
    print(f"  Chinchilla approach 3:    {_si(a3['params'])} parameters, {_si(a3['tokens'])} tokens, predicted loss {a3['loss']:.3f}")
    if args.inference_tokens:
        o = overtrained(args.flops, args.inference_tokens)
        saved = 1 - o["total_flops"] / o["optimal_total_flops"]
        print(f"  with {_si(args.inference_tokens)} inference tokens, the same loss for less: {_si(o['params'])} parameters "
              f"trained on {_si(o['tokens'])} tokens ({o['tokens'] / o['params']:.0f} per parameter), "
              f"train {o['train_flops']:.2e} + inference {o['inference_flops']:.2e} FLOPs, {100 * saved:.0f}% below "
              "the compute-optimal model's lifetime cost")


def add_commands(sub) -> None:
    c = sub.add_parser("carbon", help="energy and tCO2eq of a training run (LLaMA paper section 6.1)")
    c.add_argument("--gpu-hours", type=float, default=None, help="device-hours of training")
    c.add_argument("--gpu-power", type=float, default=GPU_POWER_W, help=f"power per device in W (default {GPU_POWER_W:g}, A100)")
    c.add_argument("--pue", type=float, default=PUE, help=f"datacenter power usage effectiveness (default {PUE})")
    c.add_argument("--intensity", type=float, default=CARBON_INTENSITY, help=f"kg CO2eq per kWh (default {CARBON_INTENSITY}, US average)")
    c.add_argument("--table", action="store_true", help="reproduce LLaMA Table 15")
    c.set_defaults(func=cmd_carbon)
    p = sub.add_parser("plan", help="Chinchilla compute-optimal size and tokens for a FLOPs budget")
    p.add_argument("--flops", type=float, required=True, help="training compute in FLOPs, e.g. 1e21")
    p.add_argument("--inference-tokens", type=float, default=0, help="expected tokens served over the model's life")
    p.set_defaults(func=cmd_plan)

