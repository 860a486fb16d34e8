"""Tensor-parallel inference on the CPU: memory per rank and tokens/s for N = 1 and 2 (parallel.py).

A random-weight llama model (default: dim 1024, 12 layers, 16 heads / 4 KV heads, FFN 2816, vocab
32000: 201M parameters, 805 MB in fp32) is written once as an HF safetensors directory; then, each in
its own processes,
- N=1: `llamaforge.load(quantize='none')`, one process (1 thread, and 2 threads);
- N=2: `torchrun --nproc_per_node 2`, `load_parallel(..., 2)`, 1 thread per rank (gloo);
load the model, measure each rank's weight bytes, resident and peak resident memory, and on rank 0
the time to the first token of a 128-token prompt and the greedy decode rate over 64 tokens
(through the Leader, as `generate --tp` runs). Greedy tokens must agree across all runs.

    PYTHONPATH=. python benchmarks/bench_parallel.py [--format hf|meta] [--model DIR] [--new-tokens 64]

    PYTHONPATH=. python benchmarks/bench_parallel.py --model smollm2-135m-instruct --ranks 1,3 --quantize auto

Writes benchmarks/results/parallel/bench-{format or model}-{quantize}.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "parallel"
CONFIG = dict(name="bench-201m", dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, hidden_dim=2816, vocab_size=32000,
              max_seq_len=1024)


def memory() -> dict:
    """Resident and peak resident memory of this process (MB), from /proc."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(out["VmRSS"], 1), "anon_mb": round(out["RssAnon"], 1), "peak_rss_mb": round(out["VmHWM"], 1)}


def write_model(path: Path, fmt: str) -> None:
    import torch

    from llamaforge.config import ModelConfig
    from llamaforge.model import Transformer
    from llamaforge.weights import save_hf, save_meta
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIG)
    model = Transformer(cfg)
    model.init_weights(0.02)
    if fmt == "hf":
        save_hf(path, cfg, model.state_dict())
    else:  # two model-parallel shards, as Meta ships LLaMA-13B: rank r of 2 opens consolidated.0r.pth only
        save_meta(path, cfg, model.state_dict(), n_shards=2)
    print(f"wrote {path}: {cfg.n_params / 1e6:.0f}M parameters", file=sys.stderr)


def worker(args) -> None:
    """One run (one process, or one torchrun rank): load, measure, decode, write rank{r}.json."""
    import torch

    from llamaforge.generate import SamplingConfig, generate
    from llamaforge.quantize import weight_bytes
    import llamaforge
    import llamaforge.parallel  # noqa: F401  (imports counted in the baseline, not in the model's memory)
    torch.set_num_threads(args.threads)
    before = memory()["rss_mb"]
    t0 = time.perf_counter()
    if args.tp == 1:
        llm, rank = llamaforge.load(args.model, quantize=args.quantize, device="cpu"), 0
    else:
        from llamaforge.parallel import follow, load_parallel
        llm, rank = load_parallel(args.model, args.tp, device="cpu", quantize=args.quantize, follow_now=False), int(os.environ["RANK"])
    net = getattr(llm, "model", llm)
    net = getattr(net, "_model", net)  # the rank's own modules behind rank 0's Leader
    res = {"rank": rank, "load_s": round(time.perf_counter() - t0, 2), "weight_mb": round(weight_bytes(net) / 2**20, 1),
           "rss_before_load_mb": before, **memory()}
    if rank > 0:  # a follower: run rank 0's calls until it is done
        follow(net, "cpu")
        res.update({f"after_{k}": v for k, v in memory().items()})
    else:
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, llm.config.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0)
        list(generate(llm.model, prompt[:16], SamplingConfig(max_new_tokens=4, temperature=0)))  # warm up
        t0 = time.perf_counter()
        it = generate(llm.model, prompt, cfg)
        tokens = [next(it)]
        t1 = time.perf_counter()
        tokens += list(it)
        t2 = time.perf_counter()
        res.update(first_token_s=round(t1 - t0, 3), decode_tok_s=round((len(tokens) - 1) / (t2 - t1), 2), tokens=tokens,
                   **{f"after_{k}": v for k, v in memory().items()})
        if args.tp > 1:
            llm.model.close()
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(res))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, tp: int, threads: int, args) -> dict:
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        return _run(model, tp, threads, args, Path(out))


def _run(model: str, tp: int, threads: int, args, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    me = [str(Path(__file__).resolve()), "--worker", "--model", model, "--tp", str(tp), "--threads", str(threads),
          "--out", str(out), "--quantize", args.quantize, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    cmd = [sys.executable, *me] if tp == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--master_port", str(free_port()), *me]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(tp)]
    return {"tp": tp, "threads_per_rank": threads, "ranks": ranks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model directory or file (default: write the random 201M model to /tmp)")
    p.add_argument("--format", default="hf", choices=["hf", "meta"], help="the random model's format: HF safetensors or "
                   "a Meta 2-shard checkpoint")
    p.add_argument("--ranks", default="1,2", help="the N to run, comma-separated (N=1 runs with 1 and 2 threads)")
    p.add_argument("--quantize", default="none", help="as llamaforge.load: none, auto (GGUF blocks kept int4/int8), int8, int4")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    model = args.model
    if model is None:
        model = f"/tmp/llamaforge-bench-201m-{args.format}"
        if not (Path(model) / ("model.safetensors" if args.format == "hf" else "params.json")).exists():
            write_model(Path(model), args.format)
    runs = []
    for n in map(int, args.ranks.split(",")):
        runs += [run(model, 1, 1, args), run(model, 1, 2, args)] if n == 1 else [run(model, n, 1, args)]
    same = len({tuple(r["ranks"][0]["tokens"]) for r in runs}) == 1
    result = {"model": CONFIG if args.model is None else args.model, "format": args.format, "quantize": args.quantize, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "greedy_tokens_identical": same, "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "runs": runs}
    OUT.mkdir(parents=True, exist_ok=True)
    tag = args.format if args.model is None else Path(args.model).stem
    (OUT / f"bench-{tag}-{args.quantize}.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| N | threads/rank | rank | weights MB | RSS before load MB | peak RSS MB (load + decode) | load s | first token s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for k in r["ranks"]:
            print(f"| {r['tp']} | {r['threads_per_rank']} | {k['rank']} | {k['weight_mb']} | {k['rss_before_load_mb']} | "
                  f"{k['after_peak_rss_mb']} | {k['load_s']} | {k.get('first_token_s', '')} | {k.get('decode_tok_s', '')} |")
    print(f"greedy tokens identical across runs: {same}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
