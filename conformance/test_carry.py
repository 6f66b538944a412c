"""The packed sglang a GPU machine without a package index runs the HiCache targets from
(`conformance.targets.sglang.carry`), and the JIT build's commands (`jit.py`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conformance import runner
from conformance.test_hicache import ROOT, run_fresh

pytestmark = pytest.mark.conformance


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    why = runner.unavailable_reason("sglang-hicache-python")
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("carry")
    p = subprocess.run([sys.executable, "-m", "conformance.targets.sglang.carry", "--out", str(out), "--no-wheels"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_pack_keeps_sources_and_leaves_out_extensions_and_unused_folders(packed):
    pkg = packed / "home" / "0.5.23" / "sglang"
    assert (pkg / "srt/mem_cache/unified_radix_cache.py").is_file()
    assert (pkg / "srt/mem_cache/cpp_utils/hash_binding.cpp").is_file()  # compiled at run time by the L3 path
    assert (pkg / "kernels/jit/csrc/kvcacheio/hicache.cuh").is_file()  # the JIT HiCache kernels
    assert next(pkg.parent.glob("sglang-0.5.23.dist-info"), None) is not None
    assert not list(pkg.rglob("*.so")), "compiled extensions are built for this machine's Python"
    assert not (pkg / "srt/models").exists() and not (pkg / "multimodal_gen").exists()
    assert sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file()) < 40e6  # fits a 64 MiB carry


def test_packed_copy_runs_the_python_core_and_refuses_the_rust_one(packed, monkeypatch):
    """With the packed home the Python-core target runs clean for a few seconds; the Rust-core
    targets say why they cannot run (no extension for this Python) instead of failing inside."""
    monkeypatch.setenv("REFCACHE_SGLANG_HOME", str(packed / "home"))  # seen by the fresh interpreter
    monkeypatch.setenv("REFCACHE_SGLANG_TRIMMED", "1")
    r = run_fresh("""
import json
from conformance.runner import run_target, unavailable_reason
r = run_target("sglang-hicache-python-storage", 3, seed=0)
print(json.dumps({"steps": r["steps"], "violations": r["violations"], "report": r["failure_report"],
                  "rust": unavailable_reason("sglang-hicache-rust"), "py": unavailable_reason("sglang-hicache-python")}))
""")
    assert r["violations"] == 0 and r["steps"] > 0, r["report"]
    assert r["py"] == ""
    assert "Rust tree core is not built for this Python" in r["rust"], r["rust"]


def test_jit_commands_follow_sglangs_flags(tmp_path, monkeypatch):
    """The wrapper unit exports each op in namespace sglang, and nvcc gets SGLang's flags for the arch."""
    pytest.importorskip("tvm_ffi")
    from conformance.targets.sglang import jit, shim

    root = shim.locate("0.5.23")
    if root is None:
        pytest.skip(shim.missing_reason("0.5.23"))
    monkeypatch.setattr(jit, "ROOT", root)
    monkeypatch.setenv("REFCACHE_SGLANG_ARCH", "90")
    src, cc, link = jit.commands("hicache", ("256",), ["kvcacheio/hicache.cuh"],
                                 [("launch_one", "HiCacheKernel<256>::run_one")], tmp_path)
    assert "TVM_FFI_DLL_EXPORT_TYPED_FUNC(launch_one, (HiCacheKernel<256>::run_one));" in src
    assert "namespace sglang {" in src
    assert "-gencode=arch=compute_90a,code=sm_90a" in cc and "-DSGL_CUDA_ARCH=900" in cc and "-std=c++20" in cc
    assert "-ltvm_ffi" in link and "-lcudart" in link and "-shared" in link
