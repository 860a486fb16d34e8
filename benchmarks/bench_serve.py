"""Serving benchmark: `llamaforge serve` vs llama-cpp-python's OpenAI server, 1..16 concurrent clients.

Both servers run in their own process on the same GGUF file with the same thread count and
context size, and take the same requests: each client sends --requests chat completions one
after another (greedy, --max-tokens new tokens, prompts asking for long answers, non-streaming so
`usage` counts the tokens). Figures per concurrency level: aggregate generated tokens/s (all
completion tokens / wall time) and p50 / p95 request latency.

    python benchmarks/bench_serve.py                                  # the default model
    python benchmarks/bench_serve.py --llama-cpp-python /root/peer/bin/python --clients 1,8

llama.cpp is skipped when its interpreter cannot import `llama_cpp.server` (pip install
'llama-cpp-python[server]'). Writes JSON, a markdown table and a PNG to --out. Only loopback.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a lighthouse keeper", "the history of bread", "how rivers form", "a robot learning to paint", "the first trip to Mars",
          "why the sky is blue", "a day in ancient Rome", "how vaccines work", "a cat who runs a bakery", "the water cycle",
          "a chess tournament", "how bridges stay up", "the life of a honeybee", "a storm at sea", "how computers add numbers",
          "a library at midnight"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f}s")


def start_llamaforge(a, gguf: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llamaforge", "serve", "--model", str(gguf), "--port", str(port), "--threads", str(a.threads),
           "--max-batch", str(max(a.clients)), "--ctx-size", str(a.ctx), "--log-level", "warning", "--no-embeddings",
           "--model-name", "bench"] + a.llamaforge_args.split()
    return subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def start_llamacpp(a, gguf: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [a.llama_cpp_python, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(a.threads),
           "--n_threads_batch", str(a.threads), "--n_ctx", str(a.ctx), "--host", "127.0.0.1", "--port", str(port), "--model_alias", "bench"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def request(http, i: int, max_tokens: int) -> tuple[float, int]:
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "seed": 1,
            "messages": [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}]}
    t = time.perf_counter()
    r = http.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx
    lat, toks, errors = [], [], []

    def client(c: int):
        with httpx.Client(base_url=url, timeout=600) as http:
            for j in range(requests):
                try:
                    dt, n = request(http, c * requests + j, max_tokens)
                    lat.append(dt)
                    toks.append(n)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    errors.append(repr(e)[:200])
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "tokens": sum(toks), "wall_s": round(wall, 2),
            "tok_s": round(sum(toks) / wall, 2), "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(q[18], 3) if lat else None, "error_sample": errors[:2]}


def bench_server(name: str, start, a, gguf: Path) -> list[dict]:
    proc, url = start(a, gguf)
    try:
        wait_ready(url, proc, a.startup_timeout)
        import httpx
        with httpx.Client(base_url=url, timeout=600) as http:
            request(http, 0, 8)  # warm up
        rows = []
        for c in a.clients:
            row = run_level(url, c, a.requests, a.max_tokens)
            row["load_avg"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(f"  {name:<10} {c:>2} clients  {row['tok_s']:>7.1f} tok/s  p50 {row['p50_s']:>6.2f} s  p95 {row['p95_s']:>6.2f} s  "
                  f"({row['tokens']} tokens, {row['errors']} errors, load {row['load_avg']})", file=sys.stderr, flush=True)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def markdown(results: dict, machine: dict) -> str:
    lines = [f"Machine: {machine['cpus']} CPUs, load average at start {machine['load_avg_start']}; threads {machine['threads']}; "
             f"{machine['requests']} requests per client, {machine['max_tokens']} new tokens each, greedy.", "",
             "| clients | " + " | ".join(f"{e} tok/s | {e} p50 s | {e} p95 s" for e in results) + " |",
             "|---:|" + "---:|---:|---:|" * len(results)]
    levels = sorted({r["clients"] for rows in results.values() for r in rows})
    for c in levels:
        cells = []
        for rows in results.values():
            r = next((r for r in rows if r["clients"] == c), None)
            cells += [f"{r['tok_s']:.1f}", f"{r['p50_s']:.2f}", f"{r['p95_s']:.2f}"] if r else ["-"] * 3
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    ours = {r["clients"]: r["tok_s"] for r in results.get("llamaforge", [])}
    if 1 in ours and 8 in ours:
        lines += ["", f"llamaforge at 8 clients: {ours[8] / ours[1]:.2f}x its single-client tokens/s (target >= 3x)."]
        peer = {r["clients"]: r["tok_s"] for r in results.get("llama.cpp", [])}
        if 8 in peer:
            lines.append(f"llamaforge / llama.cpp server at 8 clients: {ours[8] / peer[8]:.2f}x (target >= 1x).")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (engine, rows), color in zip(results.items(), ["#c44", "#48c"]):
        cs = [r["clients"] for r in rows]
        axes[0].plot(cs, [r["tok_s"] for r in rows], "o-", color=color, label=engine)
        axes[1].plot(cs, [r["p50_s"] for r in rows], "o-", color=color, label=f"{engine} p50")
        axes[1].plot(cs, [r["p95_s"] for r in rows], "o--", color=color, label=f"{engine} p95", alpha=0.6)
    axes[0].set(title="aggregate generated tokens/s", xlabel="concurrent clients", xscale="log", ylim=(0, None))
    axes[1].set(title="request latency (s)", xlabel="concurrent clients", xscale="log", ylim=(0, None))
    for ax in axes:
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="GGUF file or a packaged model name")
    p.add_argument("--clients", default="1,2,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--engines", default="llamaforge,llama.cpp")
    p.add_argument("--llama-cpp-python", default=os.environ.get("LLAMA_CPP_PYTHON", "/root/peer/bin/python"),
                   help="a Python whose environment has llama-cpp-python[server]")
    p.add_argument("--llamaforge-args", default="", help="extra flags for llamaforge serve, e.g. '--quantize none'")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--out", default="benchmarks/results/serve")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from llamaforge.llm import resolve
    _, gguf = resolve(a.model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "load_avg_start": round(os.getloadavg()[0], 2), "threads": a.threads,
               "requests": a.requests, "max_tokens": a.max_tokens, "model": str(gguf.name)}
    results = {}
    engines = a.engines.split(",")
    if "llamaforge" in engines:
        results["llamaforge"] = bench_server("llamaforge", start_llamaforge, a, gguf)
    if "llama.cpp" in engines:
        ok = Path(a.llama_cpp_python).exists() and subprocess.run(
            [a.llama_cpp_python, "-c", "import llama_cpp.server.app"], capture_output=True).returncode == 0
        if ok:
            results["llama.cpp"] = bench_server("llama.cpp", start_llamacpp, a, gguf)
        else:
            print(f"  llama.cpp  skipped: {a.llama_cpp_python} cannot import llama_cpp.server "
                  "(pip install 'llama-cpp-python[server]')", file=sys.stderr)
    (out / "bench_serve.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    (out / "bench_serve.md").write_text(markdown(results, machine) + "\n")
    plot(results, out / "bench_serve.png")
    print(markdown(results, machine))


if __name__ == "__main__":
    main()
