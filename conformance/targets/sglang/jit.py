"""Build SGLang 0.5.23's JIT HiCache kernels the way its `load_jit` does, without importing
`sglang.srt`: used by the SGLang HiCache targets on a GPU (`serve`) and by the transfer benchmark.

SGLang compiles each op at first use through tvm-ffi and nvcc (`sglang.kernels.jit.utils.load_jit`).
`load_jit` below writes the same wrapper translation unit SGLang generates
(`TVM_FFI_DLL_EXPORT_TYPED_FUNC` per export, in `namespace sglang`) and compiles it with the flags
SGLang's ninja file uses on CUDA (`jit/utils/compile/{toolchain,ninja}.py`, `jit/utils/arch.py`):
`-Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a -DSGL_CUDA_ARCH=900 -std=c++20 -O3
--expt-relaxed-constexpr`, linked with `-shared -ltvm_ffi -lcudart`, loaded with
`tvm_ffi.load_module`. The kernels are SGLang's own sources, unchanged, read from `root_dir()`
(`root_dir()/sglang/kernels/jit/...`). Needs `apache-tvm-ffi==0.1.11` (what sglang 0.5.23 pins),
nvcc and a GPU (or `REFCACHE_SGLANG_ARCH=90 REFCACHE_SGLANG_BUILD_ONLY=1` to compile only).
Modules are cached by content under `REFCACHE_SGLANG_BUILD` (default /tmp/refcache_sglang_jit).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import shutil
import subprocess

DEFAULT_ROOT = pathlib.Path(__file__).resolve().parents[3] / ".sgl"
JIT_REL = "sglang/kernels/jit"
ROOT: pathlib.Path | None = None  # set by serve(): the folder holding the loaded sglang package

_FFI_INCLUDES = (
    "#include <tvm/ffi/container/tensor.h>",
    "#include <tvm/ffi/dtype.h>",
    "#include <tvm/ffi/error.h>",
    "#include <tvm/ffi/extra/c_env_api.h>",
    "#include <tvm/ffi/function.h>",
)


class SGLangUnavailable(RuntimeError):
    """SGLang's sources, tvm-ffi or nvcc are missing, or the build failed."""


def root_dir() -> pathlib.Path:
    """The folder holding SGLang's sources (`sglang/kernels/...`): serve()'s, else
    $REFCACHE_SGLANG_SRC, else `.sgl` in the repository root."""
    if ROOT is not None:
        return ROOT
    return pathlib.Path(os.environ.get("REFCACHE_SGLANG_SRC", DEFAULT_ROOT)).resolve()


def tvm_ffi_dir() -> pathlib.Path:
    """tvm_ffi's package folder, found without importing it (the build only needs its files)."""
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        raise SGLangUnavailable("apache-tvm-ffi is not importable (sglang 0.5.23 pins 0.1.11)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]).resolve()


def cuda_home() -> str:
    """Resolved the way SGLang's toolchain.cuda_home does (CUDA_HOME, CUDA_PATH, nvcc on PATH,
    /usr/local/cuda), skipping a candidate with no lib64/libcudart.so (an nvcc wrapper script)."""
    nvcc = shutil.which("nvcc")
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
              os.path.dirname(os.path.dirname(nvcc)) if nvcc else None, "/usr/local/cuda"):
        if c and os.path.exists(os.path.join(c, "lib64", "libcudart.so")):
            return c
    return "/usr/local/cuda"


def _arch() -> tuple[int, int]:
    env = os.environ.get("REFCACHE_SGLANG_ARCH")  # e.g. "90", to compile without a GPU
    if env:
        return int(env[:-1]), int(env[-1])
    import torch

    return torch.cuda.get_device_capability()


def _suffix(major: int) -> str:
    return "a" if major >= 9 else ""  # SGLang's _cuda_arch_suffix for 9.x/10.x+ (12.0 aside)


def build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("REFCACHE_SGLANG_BUILD", "/tmp/refcache_sglang_jit"))


def commands(name: str, args: tuple[str, ...], cuda_files: list[str], cuda_wrappers: list[tuple[str, str]],
             out: pathlib.Path) -> tuple[str, list[str], list[str]]:
    """(wrapper source, nvcc command, link command) of one module, as SGLang's ninja file has them."""
    root = root_dir()
    jit = root / JIT_REL
    srcs = [str((jit / "csrc" / f).resolve()) for f in cuda_files]
    for s in srcs:
        if not os.path.exists(s):
            raise SGLangUnavailable(f"SGLang source missing: {s}")
    lines = list(_FFI_INCLUDES) + [f'#include "{s}"' for s in srcs] + ["namespace sglang {"]
    lines += [f"TVM_FFI_DLL_EXPORT_TYPED_FUNC({e}, ({k}));" for e, k in cuda_wrappers]
    lines.append("}  // namespace sglang")
    source = "\n".join(lines) + "\n"
    tvm = tvm_ffi_dir()
    includes = [str(tvm / "include"), str(tvm / "include"), str(jit / "include")]
    includes = list(dict.fromkeys(includes))
    major, minor = _arch()
    target = f"{major}{minor}{_suffix(major)}"
    nvcc = os.path.join(cuda_home(), "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc") or nvcc
    cc = ([nvcc, "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{target},code=sm_{target}",
           f"-DSGL_CUDA_ARCH={major * 100 + minor * 10}", "-std=c++20", "-O3", "--expt-relaxed-constexpr"]
          + [f"-I{i}" for i in includes] + ["-c", str(out / "cuda.cu"), "-o", str(out / "cuda_0.o")])
    lib = tvm / "lib"
    link = [os.environ.get("CXX", "c++"), str(out / "cuda_0.o"), "-shared", f"-L{lib}", "-ltvm_ffi",
            f"-L{cuda_home()}/lib64", "-lcudart", "-o", str(out / "module.so")]
    return source, cc, link


def module_key(name: str, args: tuple[str, ...], cuda_files: list[str],
               cuda_wrappers: list[tuple[str, str]]) -> str:
    """SGLang's module name plus a digest of what is compiled (sources, exports, target)."""
    digest = hashlib.sha256(repr((name, args, cuda_wrappers, _arch())).encode())
    for f in cuda_files:
        digest.update((root_dir() / JIT_REL / "csrc" / f).read_bytes())
    inc = root_dir() / JIT_REL / "include"
    for h in sorted(inc.rglob("*")):
        if h.is_file():
            digest.update(h.read_bytes())
    return f"sgl_kernel_jit_{'_'.join((name,) + args)}-{digest.hexdigest()[:12]}"


def target_tag() -> str:
    major, minor = _arch()
    return f"sm{major}{minor}{_suffix(major)}"


def build(name: str, *args: str, cuda_files: list[str], cuda_wrappers: list[tuple[str, str]],
          prebuilt_ok: bool = True) -> pathlib.Path:
    """Compile one module (cached by content under build_dir()); the .so's path. A copy built
    elsewhere under `root/prebuilt/<target>/` is used first when `prebuilt_ok`."""
    args = tuple(str(a) for a in args)
    key = module_key(name, args, cuda_files, cuda_wrappers)
    pre = root_dir() / "prebuilt" / target_tag() / f"{key}.so"
    if prebuilt_ok and pre.exists():
        return pre
    out = build_dir() / key
    so = out / f"{key}.so"
    if so.exists():
        return so
    out.mkdir(parents=True, exist_ok=True)
    source, cc, link = commands(name, args, cuda_files, cuda_wrappers, out)
    link[-1] = str(so)
    (out / "cuda.cu").write_text(source)
    for cmd in (cc, link):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SGLangUnavailable(f"building SGLang JIT module {name} failed:\n$ {' '.join(cmd)}\n"
                                    f"{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
    return so


def load_jit(*args, cuda_files=None, cuda_wrappers=None, **kw):
    if kw.get("cpp_files") or kw.get("extra_cuda_cflags") or kw.get("extra_dependencies"):
        raise SGLangUnavailable(f"load_jit options this stand-in does not implement: {sorted(kw)}")
    name, rest = args[0], args[1:]
    files, wrappers = list(cuda_files or []), list(cuda_wrappers or [])
    so = build(name, *rest, cuda_files=files, cuda_wrappers=wrappers)
    if os.environ.get("REFCACHE_SGLANG_BUILD_ONLY"):  # compile-check without a GPU or tvm_ffi's runtime
        LOG.append(f"{name}: {so}")
        return so
    import tvm_ffi

    try:
        mod = tvm_ffi.load_module(str(so))
    except Exception as e:  # noqa: BLE001 - a copy built elsewhere may not load here: build here
        if "prebuilt" not in str(so):
            raise
        LOG.append(f"prebuilt {so.name} did not load ({type(e).__name__}: {e}); building here")
        mod = tvm_ffi.load_module(str(build(name, *rest, cuda_files=files, cuda_wrappers=wrappers,
                                            prebuilt_ok=False)))
    LOG.append(f"{name}: {so}")
    return mod


LOG: list[str] = []


def serve(root: pathlib.Path) -> None:
    """Make the loaded sglang's HiCache ops (`sglang.kernels.ops.kvcache.hicache`, imported through
    the conformance shim) compile their kernels through `load_jit` above, from the sources of the
    sglang package under `root`: SGLang's own loader imports much of the server."""
    global ROOT
    ROOT = pathlib.Path(root).resolve()
    import sglang.kernels.ops.kvcache.hicache as ops

    ops.load_jit = load_jit
