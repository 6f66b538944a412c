"""Install the SGLang versions the conformance targets pin, each into its own directory.

    python -m conformance.install [--home DIR] [--version 0.5.23 --version 0.5.17]

Two sglang versions cannot live in one environment, and sglang's own dependencies are CUDA-only,
so each version goes to `<home>/<version>` with `pip install --no-deps --target` and the shim
(`conformance.shim`) puts the right one on sys.path. The few real packages the cache modules
need (the `sglang` extra: msgspec, dill, psutil) go to `<home>/deps` unless the environment
already has them. Home: --home, else $REFCACHE_SGLANG_HOME, else ~/.cache/refcache/sglang.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..installing import install_deps, pip
from . import shim

DEPS = {"msgspec": "msgspec==0.22.0", "dill": "dill==0.4.1", "psutil": "psutil==7.2.2"}  # = the `sglang` extra


def install(home: Path, versions: list[str]) -> dict[str, float]:
    """Install what is missing; returns seconds spent per item (0 when already there)."""
    os.environ[shim.HOME_ENV] = str(home)
    spent: dict[str, float] = {}
    for v in versions:
        if v not in shim.SUPPORTED:
            raise SystemExit(f"sglang {v} is not supported by the shim (supported: {', '.join(shim.SUPPORTED)})")
        t = time.monotonic()
        if shim.locate(v) is None:
            pip("--no-deps", "--upgrade", "--target", str(home / v), f"sglang=={v}")
        spent[f"sglang=={v}"] = round(time.monotonic() - t, 1)
    spent["deps"] = install_deps(home, DEPS)
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.install", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--version", action="append", choices=list(shim.SUPPORTED))
    a = ap.parse_args(argv)
    home = a.home or shim.home()
    spent = install(home, a.version or list(shim.SUPPORTED))
    for what, s in spent.items():
        print(f"{what:20} {s:6.1f} s")
    print(f"installed under {home}; export {shim.HOME_ENV}={home} if that is not the default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
