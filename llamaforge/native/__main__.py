"""`python -m llamaforge.native build`: compile the native kernels into the cache (make install runs it)."""
import argparse
import os
import sys

from . import _so_path, build


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m llamaforge.native")
    p.add_argument("command", choices=["build", "path"])
    p.add_argument("--unlock", help=argparse.SUPPRESS)  # the background build's lock file, removed when done
    a = p.parse_args()
    if a.command == "path":
        print(_so_path())
        return 0
    try:
        mod = build()
        print(f"llamaforge native kernels ready ({mod.isa()}): {_so_path()}", file=sys.stderr)
        return 0
    except Exception as e:  # noqa: BLE001 -- no compiler, no ninja: the portable path serves
        print(f"llamaforge native kernels not built ({type(e).__name__}: {str(e)[-400:]}); the portable PyTorch path "
              "will serve. Install g++ and ninja (pip install ninja) and run: python -m llamaforge.native build", file=sys.stderr)
        return 1
    finally:
        if a.unlock:
            try:
                os.unlink(a.unlock)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
