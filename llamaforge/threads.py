"""How many CPU threads to use when nobody said: the cores this process may run on that other work
is not using right now, capped.

torch's own default is every physical core. On a machine with other load that is the worst choice:
OpenMP threads wait at each barrier for the one the OS descheduled (LoRA fine-tuning measured 18
tokens/s with the default against 143 with one thread on a shared 2-core machine). So the default
is the allowed cores (`os.sched_getaffinity`, which honours taskset and cgroup cpusets) that are not
busy over a 50 ms look at /proc/stat, at least 1 and at most `CAP` (decode is memory-bound: more
threads than that rarely help). Not the load average: it remembers the last minute, so a command run
right after another (or after a build) took 1 thread on an idle 2-core machine and decoded at half
speed. Where /proc/stat is missing (macOS) the 1-minute load average stands in. `OMP_NUM_THREADS` or
an explicit `--threads` / `threads=` win.
"""
from __future__ import annotations

import os

from .errors import LlamaforgeError

CAP = 8
_chosen: tuple[int, str] | None = None  # what `use` applied in this process, for progress lines


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return set(range(os.cpu_count() or 1))


def busy_cpus(cpus: set[int], window: float = 0.05) -> float | None:
    """How many of `cpus` other work keeps busy: their non-idle share of a `window`-second look at
    /proc/stat (this process sleeps meanwhile, so it is not counted). None where /proc/stat is missing."""
    import time

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *vals = line.split()
                    v = [int(x) for x in vals[:8]]
                    idle = v[3] + v[4]  # idle + iowait
                    out[int(name[3:])] = (sum(v), idle)
        return out
    try:
        a = sample()
        time.sleep(window)
        b = sample()
    except (OSError, ValueError):
        return None
    busy = 0.0
    for c in cpus:
        if c in a and c in b:
            total, idle = b[c][0] - a[c][0], b[c][1] - a[c][1]
            busy += (total - idle) / total if total > 0 else 0.0
    return busy


def default_threads() -> tuple[int, str]:
    """-> (threads, why): the number to use and the reason, for the progress line."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cpu_set = allowed_cpus()
    cpus = len(cpu_set)
    busy = busy_cpus(cpu_set)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
        what = f"load {busy:.1f}"
    else:
        what = f"{busy:.1f} busy"
    free = int(cpus - busy + 0.5)
    n = max(1, min(free, cpus, CAP))
    return n, f"{cpus} CPUs, {what}" + (f", capped at {CAP}" if free > CAP else "")


def use(threads: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads: `threads` if given, else (once per process) the free cores.
    -> (threads, why). A later call without `threads` keeps what an earlier one set."""
    global _chosen
    import torch
    if threads is not None:
        if threads < 1:
            raise LlamaforgeError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        _chosen = (threads, "asked")
    elif _chosen is None:
        n, why = default_threads()
        torch.set_num_threads(n)
        _chosen = (n, why)
    return _chosen


def describe() -> str:
    """'2 threads (asked)' / '1 thread (2 CPUs, load 3.1)': what this process runs with."""
    import torch
    n, why = _chosen or (torch.get_num_threads(), "torch default")
    return f"{n} thread{'s' if n != 1 else ''} ({why})"
