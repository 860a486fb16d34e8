"""Native CPU kernels (kernels.cpp): dot products over GGUF Q4_0 / Q4_1 / Q8_0 blocks as stored, with
8-bit activations (AVX-512 VNNI, AVX2 or plain C, picked at run time), and a fused one-token decode step
for the whole model, as llama.cpp's ggml-cpu does.

The extension is compiled once with `torch.utils.cpp_extension` (g++ and ninja) and cached under
~/.cache/llamaforge/native/<key>, key = source hash + torch version + machine, so a torch upgrade or a
changed source rebuilds it. `make install` builds it (`python -m llamaforge.native build`); if a process
finds no build, it starts one in the background (about a minute) and runs the portable PyTorch path
until a later process finds the build. LLAMAFORGE_NATIVE=0 turns the native path off.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
NAME = "llamaforge_native"
QTYPES = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # ggml type ids, as kernels.cpp numbers them
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}

_lock = threading.Lock()
_module = None
_tried = False


def enabled() -> bool:
    return os.environ.get("LLAMAFORGE_NATIVE", "1").lower() not in ("0", "false", "no", "off")


# -fopenmp: at::parallel_for is an OpenMP region compiled into the extension (without it, one thread runs it all);
# the libgomp.so.1 it needs is the one torch has already loaded (the same soname), so there is one thread pool.
CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def build_dir() -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(CFLAGS + LDFLAGS).encode() + torch.__version__.encode() +
                         platform.machine().encode() + sys.version.encode()).hexdigest()[:16]
    root = Path(os.environ.get("LLAMAFORGE_CACHE", Path.home() / ".cache" / "llamaforge"))
    return root / "native" / key


def _so_path() -> Path:
    return build_dir() / f"{NAME}.so"


def _import(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def build(verbose: bool = True):
    """Compile the extension into the cache (about a minute on 2 cores) and return it."""
    from torch.utils.cpp_extension import load
    try:  # the pip `ninja` package's binary, also when the venv's bin is not on PATH
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"building llamaforge native kernels in {d} (once, about a minute)...", file=sys.stderr, flush=True)
    return load(NAME, [str(SOURCE)], build_directory=str(d), verbose=False,
                extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS))


def _start_background_build() -> None:
    """Build in a detached process (this one keeps serving on the portable path); one build at a time."""
    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    lock = d / "building"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    with open(d / "build.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "llamaforge.native", "build", "--unlock", str(lock)],
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    print("llamaforge: building the native CPU kernels in the background (once, ~1 min); this run uses the portable path",
          file=sys.stderr)


def kernels():
    """The loaded extension, or None (turned off, not a CPU we build for, or not built yet: then a
    background build starts)."""
    global _module, _tried
    if _module is not None or _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if not enabled() or platform.machine() not in ("x86_64", "AMD64"):
            return None
        so = _so_path()
        if so.exists():
            try:
                _module = _import(so)
            except (ImportError, OSError) as e:
                print(f"llamaforge: native kernels at {so} do not load ({e}); using the portable path", file=sys.stderr)
        elif os.environ.get("LLAMAFORGE_NATIVE_BUILD", "background") == "background":
            try:
                _start_background_build()
            except OSError:
                pass
        return _module


def available() -> bool:
    return kernels() is not None


def reset() -> None:
    """Forget the loaded state (tests switch LLAMAFORGE_NATIVE)."""
    global _module, _tried
    _module, _tried = None, False


def cpu_has_fast_bf16() -> bool:
    """True where bf16 GEMMs run in hardware (AMX or AVX512_BF16); elsewhere oneDNN emulates them, 4-5x
    slower than fp32 (Ice Lake, shared/PERF-NOTES.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags
