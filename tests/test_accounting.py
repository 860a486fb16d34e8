"""Accounting: FLOPs against torch's FLOP counter, the LLaMA paper's Table 15, and Chinchilla planning."""
import json
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


# ---- cost in money (hand-computed rows) ----

def test_cost_rows_by_hand():
    from llamaforge.accounting import cost_per_million_tokens, cost_row, hardware_cost
    # LLaMA-7B: 82,432 GPU-h x 400 W x PUE 1.1 = 36,270.08 kWh; at 0.08 USD/kWh = 2,901.6064 USD over 1T tokens
    c = cost_row(36_270.08, 82_432, 0.08, "USD", tokens=1e12)
    assert c["electricity"] == pytest.approx(2901.6064) and c["hardware_amortized"] == 0
    assert c["per_million_tokens"] == pytest.approx(0.0029016064)
    # LLaMA-65B's GPUs at 24,875 USD each (a 199,000 USD DGX A100 / 8), 4 years = 35,064 hours:
    # 24,875 x 1,022,362 / 35,064 = 725,281.05 USD for the run
    assert hardware_cost(1_022_362, 24_875, 4) == pytest.approx(725_281.05, abs=0.01)
    # the number of devices cancels: one device for 35,064 hours pays for itself exactly once
    assert hardware_cost(4 * 8766, 24_875, 4) == pytest.approx(24_875)
    c = cost_row(449_839.28, 1_022_362, 0.08, "USD", device_price=24_875, lifetime_years=4, tokens=1.4e12)
    assert c["electricity"] == pytest.approx(35_987.1424) and c["total"] == pytest.approx(35_987.14 + 725_281.05, abs=0.01)
    # generation: 0.5 J/token, PUE 1.1: 1e6 tokens = 0.5e6 J = 0.138889 kWh x 1.1 x 0.08 = 0.0122222 USD
    assert cost_per_million_tokens(0.5, 0.08, 1.1) == pytest.approx(0.0122222, rel=1e-5)
    # a tariff in won: 180 KRW/kWh for 449.8 MWh = 80,971,070 KRW
    assert cost_row(449_839.28, 0, 180, "KRW")["electricity"] == pytest.approx(80_971_070.4)
    with pytest.raises(LlamaforgeError):
        cost_row(1, 1, -0.1)
    with pytest.raises(LlamaforgeError):
        hardware_cost(1, 100, 0)


def test_llama_cost_table_rows():
    from llamaforge.accounting import llama_cost_table
    rows = {r["model"]: r for r in llama_cost_table(0.08, "USD")}
    assert list(rows) == ["LLaMA-7B", "LLaMA-13B", "LLaMA-33B", "LLaMA-65B"]
    r7 = rows["LLaMA-7B"]
    assert r7["mwh"] == pytest.approx(36.27008) and r7["cost"]["electricity"] == pytest.approx(2901.6064)
    assert r7["mwh_per_token_param"] == pytest.approx(36.27008 / (6.7e9 * 1e12))  # 5.413e-21
    assert r7["implied_mfu"] == pytest.approx(0.43419, abs=1e-4)  # 6 N D / (GPU-h x 3600 x 312e12)
    # energy tracks 6 N D: MWh per token per parameter stays within 4.5-5.5e-21 across a 10x range of sizes
    assert all(4.5e-21 < r["mwh_per_token_param"] < 5.5e-21 for r in rows.values())
    assert rows["LLaMA-65B"]["cost"]["per_million_tokens"] == pytest.approx(35_987.1424 / 1.4e6)
    assert len(llama_cost_table(llama_only=False)) == 6


def test_run_report_cost():
    cfg = ModelConfig.from_name("tiny")
    r = run_report(cfg, 128, tokens=10_000, steps=5, wall_s=3600, train_s=3000, peak_flops=1e11, n_devices=2,
                   device="cpu", power_w=100, price_per_kwh=0.5, currency="EUR", device_price=8766, lifetime_years=1)
    # 2 device-hours x 100 W x 1.1 = 0.22 kWh x 0.5 = 0.11 EUR; hardware 8,766 EUR / 8,766 h x 2 h = 2 EUR
    assert r["cost"]["electricity"] == pytest.approx(0.11) and r["cost"]["hardware_amortized"] == pytest.approx(2.0)
    assert r["cost"]["per_million_tokens"] == pytest.approx(2.11 / 10_000 * 1e6)
    from llamaforge.accounting import format_report
    assert "0.11 EUR electricity at 0.5 EUR/kWh + 2.00 EUR hardware" in format_report(r)


def test_cost_cli(capsys, tmp_path):
    assert main(["carbon", "--gpu-hours", "1022362", "--tokens", "1.4e12", "--device-price", "24875"]) == 0
    out = capsys.readouterr().out
    assert "35,987 USD electricity at 0.08 USD/kWh + 725,281 USD hardware" in out and "761,268 USD" in out
    png = tmp_path / "t15.png"
    assert main(["carbon", "--table", "--price-per-kwh", "180", "--currency", "KRW", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "LLaMA-65B" in out and "80,971,070" in out and "5.413e-21" in out
    assert png.stat().st_size > 10_000
    eff = tmp_path / "efficiency.json"
    eff.write_text(json.dumps({"model": "m", "watts": 20, "variants": [
        {"variant": "int4", "status": "ok", "decode_energy_per_token_j": 0.5, "energy_per_token_j": 0.05}]}))
    assert main(["carbon", "--efficiency", str(tmp_path), "--pue", "1"]) == 0
    assert "generated 0.0111 USD/Mtok" in capsys.readouterr().out  # 0.5e6 J / 3.6e6 x 0.08
    assert main(["plan", "--flops", "5.76e23"]) == 0  # 1.28M device-hours x 400 W x 1.1 = 564.1 MWh
    out = capsys.readouterr().out
    assert "564.1 MWh" in out and "45,128 USD electricity" in out  # x 0.08 USD/kWh
    assert main(["carbon", "--gpu-hours", "10", "--price-per-kwh", "-1"]) == 2
    assert main(["carbon", "--efficiency", str(png)]) == 2
