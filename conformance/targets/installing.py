"""What every engine's installer shares: where its versions live, and `pip --target` into there.

Engines (SGLang, vLLM) cannot share one environment with us or each other, and their own
dependencies are CUDA-only, so each version goes to `<home>/<version>` with `--no-deps` and the
few small pure packages its cache modules import go to `<home>/deps`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path


def engine_home(env_var: str, engine: str) -> Path:
    """`$env_var`, else the user's cache folder's `refcache/<engine>`."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refcache" / engine


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args], check=True)


def install_deps(home: Path, deps: dict[str, str]) -> float:
    """Install into `<home>/deps` each pinned spec (module -> spec) that neither the environment nor
    that folder has yet; returns the seconds spent."""
    t = time.monotonic()
    missing = [spec for mod, spec in deps.items()
               if importlib.util.find_spec(mod) is None and not (home / "deps" / mod).exists()]
    if missing:
        pip("--no-deps", "--upgrade", "--target", str(home / "deps"), *missing)
    return round(time.monotonic() - t, 1)
