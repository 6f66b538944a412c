"""Install vLLM 0.33.0 for the conformance targets, in its own directory.

    python -m conformance.targets.vllm.install [--home DIR]

The wheel pins CUDA builds of torch and dozens of serving packages, none of which the cache
modules use, so it goes to `<home>/0.33.0` with `pip install --no-deps --target` and the shim
(`conformance.targets.vllm.shim`) imports the cache modules from there. Its real dependencies
beyond torch and numpy (msgspec, typing_extensions) go to `<home>/deps` unless the environment
has them. Home: --home, else $REFCACHE_VLLM_HOME, else ~/.cache/refcache/vllm.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..installing import install_deps, pip
from . import shim

DEPS = {"msgspec": "msgspec==0.22.0", "typing_extensions": "typing_extensions==4.16.0"}


def install(home: Path) -> dict[str, float]:
    """Install what is missing; returns seconds spent per item (0 when already there)."""
    os.environ[shim.HOME_ENV] = str(home)
    spent: dict[str, float] = {}
    t = time.monotonic()
    if shim.locate() is None:
        pip("--no-deps", "--upgrade", "--target", str(home / shim.VERSION), f"vllm=={shim.VERSION}")
    spent[f"vllm=={shim.VERSION}"] = round(time.monotonic() - t, 1)
    spent["deps"] = install_deps(home, DEPS)
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.targets.vllm.install", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None)
    a = ap.parse_args(argv)
    home = a.home or shim.home()
    for what, s in install(home).items():
        print(f"{what:20} {s:6.1f} s")
    print(f"installed under {home}; export {shim.HOME_ENV}={home} if that is not the default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
