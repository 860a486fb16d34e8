"""Accounting: FLOPs against torch's FLOP counter, the LLaMA paper's Table 15, and Chinchilla planning."""
import math

import pytest
import torch

from llamaforge import LlamaforgeError
from llamaforge.accounting import (LLAMA_TABLE15, carbon_row, chinchilla_loss, chinchilla_optimal, energy_kwh,
                                   flops_per_token, matmul_params, measure_peak_flops, mfu, overtrained, run_report)
from llamaforge.commands import main
from llamaforge.config import ModelConfig
from llamaforge.model import Transformer


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"n_kv_heads": 4}])
def test_flops_per_token_equals_torch_flop_counter(kw):
    """6N + 12 L T dim is exactly what torch counts for forward + backward (math attention: full T x T)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = ModelConfig.from_dict({**ModelConfig.from_name("tiny").to_dict(), **kw})
    model = Transformer(cfg)
    B, T = 2, 48
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    assert fc.get_total_flops() == flops_per_token(cfg, T) * B * T


def test_matmul_params_of_llama_7b():
    cfg = ModelConfig.from_name("llama-7b")
    assert cfg.n_params == 6_738_415_616  # Meta's 7B
    assert matmul_params(cfg) == cfg.n_params - 32000 * 4096 - 65 * 4096  # no lookup table, no norms
    # 2048-token context: attention adds ~6% to 6N
    assert flops_per_token(cfg, 2048) / (6 * matmul_params(cfg)) == pytest.approx(1 + 12 * 32 * 2048 * 4096 / (6 * matmul_params(cfg)))


def test_mfu_and_measured_peak():
    assert mfu(1e9, 100.0, 1e12) == pytest.approx(0.1)
    assert mfu(1e9, 100.0, 1e12, n_devices=2) == pytest.approx(0.05)
    peak = measure_peak_flops("cpu", n=256, reps=1)
    assert 1e8 < peak < 1e14


@pytest.mark.parametrize("name,hours,mwh,t", [r for r in LLAMA_TABLE15 if r[0].startswith("LLaMA") or r[0] == "OPT-175B"])
def test_llama_table_15(name, hours, mwh, t):
    """GPU-h x 400 W x PUE 1.1 -> MWh; x 0.385 kg/kWh -> tCO2eq (LLaMA section 6.1, Table 15)."""
    r = carbon_row(hours)
    assert abs(r["mwh"] - mwh) < 1  # the paper truncates (449.8 -> 449)
    assert round(r["tco2eq"]) == t


def test_carbon_cli_reproduces_the_7b_and_65b_rows(capsys):
    assert main(["carbon", "--gpu-hours", "82432", "--gpu-power", "400"]) == 0
    out = capsys.readouterr().out
    assert "36.3 MWh" in out and "14.0 tCO2eq" in out
    assert main(["carbon", "--gpu-hours", "1022362", "--gpu-power", "400"]) == 0
    out = capsys.readouterr().out
    assert "449.8 MWh" in out and "173.2 tCO2eq" in out
    assert main(["carbon", "--table"]) == 0
    assert "LLaMA-65B" in capsys.readouterr().out
    assert main(["carbon", "--gpu-hours", "10", "--gpu-power", "0"]) == 2


def test_energy_scales_with_devices_and_pue():
    assert energy_kwh(1000, 400, 1.0) == 400
    assert energy_kwh(1000, 400) == pytest.approx(440)


def test_chinchilla_optimal():
    c = chinchilla_optimal(5.76e23)  # Chinchilla's own budget: 70B parameters, 1.4T tokens
    assert c["rule_20"]["params"] == pytest.approx(69.3e9, rel=0.01)
    assert c["rule_20"]["tokens"] == pytest.approx(1.39e12, rel=0.01)
    a3 = c["approach3"]
    assert 6 * a3["params"] * a3["tokens"] == pytest.approx(5.76e23)
    for f in (0.5, 2.0):  # the optimum: other splits of the same compute predict a higher loss
        assert chinchilla_loss(a3["params"] * f, a3["tokens"] / f) > a3["loss"]
    with pytest.raises(LlamaforgeError):
        chinchilla_optimal(-1)


def test_overtrained_choice_is_smaller_and_cheaper_over_its_life():
    opt = chinchilla_optimal(1e23)["approach3"]
    o = overtrained(1e23, inference_tokens=2e13)
    assert o["params"] < 0.7 * opt["params"] and o["tokens"] > opt["tokens"]
    assert chinchilla_loss(o["params"], o["tokens"]) == pytest.approx(opt["loss"], rel=1e-9)  # the same quality
    assert o["total_flops"] < o["optimal_total_flops"]
    assert overtrained(1e23, 0)["params"] == pytest.approx(opt["params"], rel=0.01)  # no inference: compute-optimal
    assert overtrained(1e23, 1e14)["params"] < o["params"]  # more inference: smaller still


def test_plan_cli(capsys):
    assert main(["plan", "--flops", "5.76e23", "--inference-tokens", "1e13"]) == 0
    out = capsys.readouterr().out
    assert "69.3B parameters, 1.39T tokens" in out and "inference tokens" in out


def test_run_report_fields():
    cfg = ModelConfig.from_name("tiny")
    r = run_report(cfg, 128, tokens=10_000, steps=5, wall_s=3600, train_s=3000, peak_flops=1e11, n_devices=2,
                   device="cpu", power_w=100)
    assert r["train_flops"] == flops_per_token(cfg, 128) * 10_000
    assert r["energy_kwh"] == pytest.approx(2 * 100 * 1.1 / 1000)
    assert r["tco2eq"] == pytest.approx(r["energy_kwh"] * 0.385 / 1000)
    assert r["mfu"] == pytest.approx(flops_per_token(cfg, 128) * 10_000 / 3000 / 2e11)
    assert math.isclose(r["tokens_per_param"], 10_000 / cfg.n_params)
