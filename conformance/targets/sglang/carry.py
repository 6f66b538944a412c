"""Pack an installed sglang for a GPU machine that has no package index (and little room to carry).

    python -m conformance.targets.sglang.carry --out .sgl [--version 0.5.23] [--python 3.12]

Writes `<out>/home/<version>/` (a `REFCACHE_SGLANG_HOME` for the shim) and `<out>/wheels/`:
- the sglang package's Python files (and the C++ it compiles at run time), without the folders
  the cache targets never import (models, layers, serving, the multimodal generator, tests: the
  shim stands in for them), and all of `sglang/kernels/jit/include` and `csrc/kvcacheio` (the
  HiCache JIT kernels' CUDA sources, which the GPU targets compile there);
  its compiled extensions are left out (built for this machine's Python);
- wheels of the few real packages the targets need there: msgspec and dill (the `sglang` extra)
  and apache-tvm-ffi (loads the JIT kernels), for `--python`.
On the other machine: `pip install --no-index --no-deps --target DIR <out>/wheels/*.whl`, then
`PYTHONPATH=DIR REFCACHE_SGLANG_HOME=<out>/home REFCACHE_SGLANG_TRIMMED=1` (the shim then stands in
for any sglang module left out, as it does for the folders above).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from . import shim

# sglang folders the cache targets never import for real (the shim stands in for the srt ones).
SKIP = ("multimodal_gen", "test", "benchmark", "srt/models", "srt/layers", "srt/multimodal", "srt/entrypoints",
        "srt/speculative", "srt/lora", "srt/model_executor", "srt/function_call", "srt/parser",
        "srt/grpc", "srt/debug_utils", "srt/model_loader")
SOURCES = (".py", ".cpp", ".h")  # Python, and C++ that sglang compiles at run time (the native page hash)
WHOLE = ("kernels/jit/include", "kernels/jit/csrc/kvcacheio")  # every file (the JIT kernels' CUDA sources)
WHEELS = {"0.5.23": ("msgspec==0.22.0", "dill==0.4.1", "apache-tvm-ffi==0.1.11")}


def pack(version: str, out: Path) -> int:
    """Copy the installed `version` under `out/home/<version>`; returns the bytes copied."""
    src = shim.locate(version)
    if src is None:
        raise SystemExit(shim.missing_reason(version))
    dst = out / "home" / version
    if dst.exists():
        shutil.rmtree(dst)
    total = 0
    pkg = src / "sglang"
    for f in sorted(pkg.rglob("*")):
        rel = f.relative_to(pkg).as_posix()
        if not f.is_file() or "__pycache__" in rel or any(rel == s or rel.startswith(s + "/") for s in SKIP):
            continue
        if f.suffix not in SOURCES and not any(rel.startswith(w + "/") for w in WHOLE):
            continue
        t = dst / "sglang" / rel
        t.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, t)
        total += f.stat().st_size
    for info in src.glob(f"sglang-{version}.dist-info"):
        shutil.copytree(info, dst / info.name)
    return total


def wheels(version: str, out: Path, python: str) -> list[str]:
    """Download the wheels the targets need on a CPython `python` x86-64 Linux machine."""
    d = out / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", "-d", str(d)]
    for n in (17, 24, 28):
        cmd += ["--platform", f"manylinux_2_{n}_x86_64"]
    subprocess.run(cmd + ["--platform", "manylinux2014_x86_64", *WHEELS[version]], check=True)
    return sorted(p.name for p in d.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.targets.sglang.carry", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--version", default="0.5.23", choices=sorted(WHEELS))
    ap.add_argument("--python", default="3.12", help="the other machine's Python (for the wheels)")
    ap.add_argument("--no-wheels", action="store_true")
    a = ap.parse_args(argv)
    n = pack(a.version, a.out)
    print(f"sglang {a.version}: {n / 1e6:.1f} MB of sources under {a.out / 'home' / a.version}")
    if not a.no_wheels:
        for w in wheels(a.version, a.out, a.python):
            print(f"wheel {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
