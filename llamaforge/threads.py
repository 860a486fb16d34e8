"""How many CPU threads to use when nobody said: the cores this process may run on that other work
is not already using, capped.

torch's own default is every physical core. On a machine with other load that is the worst choice:
OpenMP threads wait at each barrier for the one the OS descheduled (LoRA fine-tuning measured 18
tokens/s with the default against 143 with one thread on a shared 2-core machine). So the default
is the allowed cores (`os.sched_getaffinity`, which honours taskset and cgroup cpusets) minus the
1-minute load average, at least 1 and at most `CAP` (decode is memory-bound: more threads than
that rarely help). `OMP_NUM_THREADS` or an explicit `--threads` / `threads=` win.
"""
from __future__ import annotations

import os

from .errors import LlamaforgeError

CAP = 8
_chosen: tuple[int, str] | None = None  # what `use` applied in this process, for progress lines


def allowed_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> tuple[int, str]:
    """-> (threads, why): the number to use and the reason, for the progress line."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cpus = allowed_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    free = int(cpus - load + 0.5)
    n = max(1, min(free, cpus, CAP))
    return n, f"{cpus} CPUs, load {load:.1f}" + (f", capped at {CAP}" if free > CAP else "")


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
