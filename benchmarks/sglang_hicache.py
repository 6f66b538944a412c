"""SGLang 0.5.23's HiCache transfer ops (its JIT kernels), built here for side-by-side timing.

SGLang builds these at run time through tvm-ffi and nvcc (`sglang.kernels.jit.utils.load_jit`),
a loader that imports much of `sglang.srt`. This module stands in for that loader and nothing else:

- the kernels are SGLang's own sources, unchanged: `kernels/jit/csrc/kvcacheio/{hicache,
  hicache_tma,staged_write_back,relayout}.cuh` and `kernels/jit/include/sgl_kernel/*`;
- the Python dispatch is SGLang's own `kernels/ops/kvcache/hicache.py`, executed unchanged with
  its imports bound to stand-ins: `load_jit` (jit.py), `make_cpp_args`/`cache_once` (same behaviour
  as SGLang's), `is_hip_runtime() -> False`, `debug_kernel_api` = identity, and
  `envs.SGLANG_HICACHE_TMA_TRANSFER` = True (SGLang's default). So SGLang's choices of kernel
  (TMA bulk-copy kernel when the page tiles its 16-row chunk, register kernel otherwise),
  unroll, block quota and threads are the ones a server makes;
- `load_jit` (`conformance/targets/sglang/jit.py`, shared with the GPU conformance targets)
  compiles SGLang's sources with SGLang's own nvcc flags and loads them with tvm-ffi.

Needs `apache-tvm-ffi==0.1.11` (what sglang 0.5.23 pins) importable, nvcc, and a copy of those
SGLang files under `root` (`REFCACHE_SGLANG_SRC`, default `.sgl` in the repository root, ignored
by git) laid out as in the sglang package: `root/sglang/kernels/...` (`--populate SITE` copies
them from an installed sglang). Modules are built on first use and cached under
`REFCACHE_SGLANG_BUILD` (default /tmp/refcache_sglang_jit); `--publish` copies them to
`root/prebuilt/<target>/`, which is tried first (a copy that does not load is rebuilt), so a
GPU machine without time to compile can carry them: on the H200 runs of benchmarks/RESULTS.md
the modules were compiled on the development machine (nvcc 13.0, as on the GPU machine) with
`REFCACHE_SGLANG_ARCH=90 REFCACHE_SGLANG_BUILD_ONLY=1 python -m benchmarks.sglang_hicache --publish`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import os
import pathlib
import shutil
import sys
import types

from conformance.targets.sglang.jit import LOG, SGLangUnavailable, root_dir, target_tag, tvm_ffi_dir
from conformance.targets.sglang.jit import load_jit as _load_jit

OPS_REL = "sglang/kernels/ops/kvcache/hicache.py"


def _cache_once(fn):
    """SGLang's cache_once: memoize on (args, sorted kwargs)."""
    result_map: dict = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in result_map:
            result_map[key] = fn(*args, **kwargs)
        return result_map[key]

    return wrapper


class _CPPArgList(list):
    def __str__(self) -> str:
        return ", ".join(self)


def _make_cpp_args(*args):
    def conv(a):
        if isinstance(a, bool):
            return "true" if a else "false"
        if isinstance(a, (int, str, float)):
            return str(a)
        raise TypeError(f"unsupported template argument {a!r}")

    return _CPPArgList(conv(a) for a in args)


@functools.cache
def ops() -> types.ModuleType:
    """SGLang's kernels/ops/kvcache/hicache.py, executed with the stand-ins above."""
    path = root_dir() / OPS_REL
    if not path.exists():
        raise SGLangUnavailable(f"SGLang's hicache.py not found at {path} (set REFCACHE_SGLANG_SRC)")
    tvm_ffi_dir()
    import torch

    if not (hasattr(torch.Tensor, "__dlpack_c_exchange_api__") or hasattr(torch.Tensor, "__c_dlpack_exchange_api__")):
        # tvm-ffi would JIT a torch addon for fast DLPack (a minute of compiling); plain DLPack does
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
        LOG.append("torch has no DLPack exchange API: TVM_FFI_DISABLE_TORCH_C_DLPACK=1")
    env = types.SimpleNamespace(SGLANG_HICACHE_TMA_TRANSFER=types.SimpleNamespace(get=lambda: True))
    fakes = {
        "sglang": types.ModuleType("sglang"),
        "sglang.kernels": types.ModuleType("sglang.kernels"),
        "sglang.kernels.jit": types.ModuleType("sglang.kernels.jit"),
        "sglang.kernels.jit.utils": types.SimpleNamespace(
            cache_once=_cache_once, is_hip_runtime=lambda: False, load_jit=_load_jit, make_cpp_args=_make_cpp_args),
        "sglang.kernels.kernel_api_logging": types.SimpleNamespace(debug_kernel_api=lambda f: f),
        "sglang.srt": types.ModuleType("sglang.srt"),
        "sglang.srt.environ": types.SimpleNamespace(envs=env),
    }
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)  # type: ignore[arg-type]
    try:
        spec = importlib.util.spec_from_file_location("sglang_0_5_23_hicache_ops", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


def prebuild(element_size: int, jobs: int = 3) -> dict[str, str]:
    """Compile, concurrently, the three modules a page_first/layer_first MHA host pool of rows of
    `element_size` bytes uses on CUDA (register kernel, TMA kernel, staged write-back);
    {module: "ok" | error text}."""
    m = ops()
    unroll = m._default_unroll(element_size)
    tasks = {
        "hicache": lambda: m._jit_hicache_module(element_size=element_size, unroll=unroll,
                                                 block_quota=m.DEFAULT_BLOCK_QUOTA),
        "hicache_tma": lambda: m._jit_hicache_tma_module(block_quota=m.TMA_BLOCK_QUOTA),
        "hicache_staged": lambda: m._jit_hicache_staged_module(element_size=element_size, unroll=unroll,
                                                               block_quota=m.DEFAULT_BLOCK_QUOTA),
    }
    out = {}
    with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
        futs = {k: ex.submit(f) for k, f in tasks.items()}
        for k, f in futs.items():
            try:
                f.result()
                out[k] = "ok"
            except Exception as e:  # noqa: BLE001 - reported to the caller
                out[k] = f"{type(e).__name__}: {e}"
    return out


class SGLangHostPool:
    """SGLang's MHA device/host pools over given memory, and its two transfer calls.

    Device side (SGLang's MHATokenToKVPool): one [tokens, heads, dim] K and V buffer per layer,
    here `dev[l, 0]` / `dev[l, 1]` of a [L, 2, tokens, H, D] tensor (the same bytes), with uint64
    pointer tables. Host side (MHATokenToKVPoolHost), over the pinned `host_flat`:
    - "page_first" (SGLang's default --hicache-mem-layout): [2, tokens, L, H, D]; backup is
      `transfer_hicache_all_layer_staged_lf_pf` (gather into a 64-page device staging buffer, then
      copy-engine page copies), load is `transfer_hicache_one_layer` per layer over the
      transposed [tokens, H, D] views;
    - "layer_first": [2, L, tokens, H, D]; backup is `transfer_hicache_all_layer`, load
      `transfer_hicache_one_layer` per layer.
    Both with io_backend "kernel" (SGLang's default)."""

    STAGING_PAGES = 64  # sglang.srt.mem_cache.pool_host.base._WRITE_BACK_STAGING_PAGE_CHUNK

    def __init__(self, dev, host_flat, page_size: int, layout: str):
        import torch

        self.ops = ops()
        L, two, tokens, H, D = dev.shape
        assert two == 2
        self.L, self.tokens, self.H, self.D, self.ps, self.layout = L, tokens, H, D, page_size, layout
        self.dev = dev
        self.k_dev = [dev[layer, 0] for layer in range(L)]
        self.v_dev = [dev[layer, 1] for layer in range(L)]
        cuda = dev.device
        self.dk_ptrs = torch.tensor([t.data_ptr() for t in self.k_dev], dtype=torch.uint64, device=cuda)
        self.dv_ptrs = torch.tensor([t.data_ptr() for t in self.v_dev], dtype=torch.uint64, device=cuda)
        n = 2 * L * tokens * H * D
        if layout == "page_first":
            self.host = host_flat[:n].view(2, tokens, L, H, D)
            self.k_refs = [self.host[0].transpose(0, 1)[layer] for layer in range(L)]
            self.v_refs = [self.host[1].transpose(0, 1)[layer] for layer in range(L)]
            cap = self.STAGING_PAGES * page_size
            self.staging_k = torch.empty((cap, L, H, D), dtype=dev.dtype, device=cuda)
            self.staging_v = torch.empty((cap, L, H, D), dtype=dev.dtype, device=cuda)
        elif layout == "layer_first":
            self.host = host_flat[:n].view(2, L, tokens, H, D)
            self.k_refs = [self.host[0][layer] for layer in range(L)]
            self.v_refs = [self.host[1][layer] for layer in range(L)]
        else:
            raise ValueError(layout)
        self.hk_ptrs = torch.tensor([t.data_ptr() for t in self.k_refs], dtype=torch.uint64, device=cuda)
        self.hv_ptrs = torch.tensor([t.data_ptr() for t in self.v_refs], dtype=torch.uint64, device=cuda)
        self.row_bytes = H * D * dev.element_size()

    def kernel_names(self) -> dict[str, str]:
        """Which SGLang kernel each direction runs at this page size (SGLang's own dispatch)."""
        m = self.ops
        tma = m.use_hicache_tma_kernel(element_size=self.row_bytes, block_quota=m.TMA_BLOCK_QUOTA,
                                       page_size=self.ps)
        load = "tma" if tma else "register"
        backup = "staged+copy-engine" if self.layout == "page_first" else load
        return {"backup": backup, "load": f"{load} x{self.L} layers"}

    def backup(self, dev_tokens, host_tokens_cpu, host_tokens_gpu) -> None:
        """Device -> host: token indices (device ones on the GPU; host ones as the path wants)."""
        m = self.ops
        if self.layout == "page_first":
            m.transfer_hicache_all_layer_staged_lf_pf(
                k_ptr_src=self.dk_ptrs, v_ptr_src=self.dv_ptrs, src_indices=dev_tokens, dst_indices=host_tokens_cpu,
                staging_k=self.staging_k, staging_v=self.staging_v, dst_k=self.host[0], dst_v=self.host[1],
                page_size=self.ps)
        else:
            m.transfer_hicache_all_layer(
                page_size=self.ps, k_ptr_dst=self.hk_ptrs, v_ptr_dst=self.hv_ptrs, indices_dst=host_tokens_gpu,
                k_ptr_src=self.dk_ptrs, v_ptr_src=self.dv_ptrs, indices_src=dev_tokens,
                kv_cache_dst_stride_bytes=self.row_bytes, kv_cache_src_stride_bytes=self.row_bytes,
                element_size=self.row_bytes)

    def load(self, host_tokens_gpu, dev_tokens) -> None:
        """Host -> device, layer by layer as SGLang's load_to_device_per_layer does."""
        m = self.ops
        for i in range(self.L):
            m.transfer_hicache_one_layer(
                page_size=self.ps, k_cache_dst=self.k_dev[i], v_cache_dst=self.v_dev[i], indices_dst=dev_tokens,
                k_cache_src=self.k_refs[i], v_cache_src=self.v_refs[i], indices_src=host_tokens_gpu,
                element_dim=self.H * self.D)

    def host_page(self, host_tokens):
        """[L, 2, ps, H, D] copy of the host tokens (CPU), for checks."""
        if self.layout == "page_first":
            return self.host[:, host_tokens].permute(2, 0, 1, 3, 4).contiguous()
        return self.host[:, :, host_tokens].permute(1, 0, 2, 3, 4).contiguous()

    def poison_host(self, host_tokens) -> None:
        if self.layout == "page_first":
            self.host[:, host_tokens] = float("nan")
        else:
            self.host[:, :, host_tokens] = float("nan")


NEEDED = ["sglang/kernels/ops/kvcache/hicache.py", "sglang/kernels/jit/include"] + [
    f"sglang/kernels/jit/csrc/kvcacheio/{f}.cuh" for f in ("hicache", "hicache_tma", "staged_write_back", "relayout")]


def populate(site: pathlib.Path) -> None:
    """Copy what this module needs from an installed sglang (`pip install --no-deps sglang==0.5.23`
    into `site`) to root_dir(). The tvm-ffi wheel goes beside it by hand:
    `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
    -d <root> apache-tvm-ffi==0.1.11`."""
    root = root_dir()
    for rel in NEEDED:
        src, dst = site / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    print(f"copied {len(NEEDED)} SGLang paths from {site} to {root}")


def main(argv=None) -> int:
    """Compile the three modules without a GPU (REFCACHE_SGLANG_ARCH=90) or with one; report."""
    import argparse

    ap = argparse.ArgumentParser(description="build SGLang's HiCache JIT modules")
    ap.add_argument("--element-size", type=int, default=2048)
    ap.add_argument("--publish", action="store_true", help="copy the built modules to <root>/prebuilt/<target>/")
    ap.add_argument("--populate", metavar="SITE",
                    help="first copy the needed files from an installed sglang (the folder holding sglang/) to root")
    a = ap.parse_args(argv)
    if a.populate:
        populate(pathlib.Path(a.populate))
    res = prebuild(a.element_size)
    for k, v in res.items():
        print(f"{k}: {v}")
    if a.publish:
        dst = root_dir() / "prebuilt" / target_tag()
        dst.mkdir(parents=True, exist_ok=True)
        for line in LOG:
            so = pathlib.Path(line.split(": ", 1)[1])
            if so.exists() and "prebuilt" not in str(so):
                shutil.copy2(so, dst / so.name)
                print(f"published {dst / so.name}")
    return 0 if all(v == "ok" for v in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
