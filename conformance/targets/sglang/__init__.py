"""SGLang's prefix caches as conformance targets, per pinned version.

`shim` imports one sglang version's cache modules on a plain CPU machine, `install` puts the
pinned versions in place, `v0_5_23` / `v0_5_17` hold the adapters (their APIs drift between
versions), `common` what they share, `kernels` CPU stand-ins for the host tier's copy kernels.
"""

from __future__ import annotations

import sysconfig

from .. import TargetSpec

_N, _O = "conformance.targets.sglang.v0_5_23", "conformance.targets.sglang.v0_5_17"
_H = "conformance.targets.sglang.v0_5_23_hicache"
V_NEW, V_OLD = "0.5.23", "0.5.17"
_RUST = f"{__name__}:rust_core_reason"


def rust_core_reason() -> str:
    """'' when sglang 0.5.23 loads here with its compiled Rust tree core built for this Python (a
    copy packed by `carry` for another machine leaves the extension out), else why not."""
    from . import shim

    why = shim.missing_reason(V_NEW)
    if why:
        return why
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if not (shim.locate(V_NEW) / "sglang/srt/mem_cache/rust_tree_core" / f"mem_cache{suffix}").exists():
        return f"sglang {V_NEW}'s compiled Rust tree core is not built for this Python (no mem_cache{suffix})"
    return ""


TARGETS: dict[str, TargetSpec] = {
    "sglang-radix": TargetSpec(f"{_N}:SGLangRadix", V_NEW, "SGLang RadixCache 0.5.23, page 2"),
    "sglang-unified-python": TargetSpec(f"{_N}:SGLangUnified", V_NEW,
                                        "SGLang UnifiedRadixCache 0.5.23 (FULL), Python tree core, page 2",
                                        args=("python",)),
    "sglang-unified-rust": TargetSpec(f"{_N}:SGLangUnified", V_NEW,
                                      "SGLang UnifiedRadixCache 0.5.23 (FULL), compiled Rust tree core, page 2",
                                      args=("rust",), requires=_RUST),
    "sglang-mamba": TargetSpec(f"{_O}:SGLangMamba", V_OLD, "SGLang MambaRadixCache 0.5.17, page 1", 1),
    "sglang-hiradix": TargetSpec(f"{_O}:SGLangHiRadix", V_OLD,
                                 "SGLang HiRadixCache 0.5.17 (HiCache: write-through, direct IO), page 2; "
                                 "a GPU, or CPU stand-ins for pinning and copies"),
    "sglang-hiradix-selective": TargetSpec(f"{_O}:SGLangHiRadix", V_OLD,
                                           "the same, write-through-selective (backup on the second hit)",
                                           args=("write_through_selective",)),
    "sglang-hiradix-write-back": TargetSpec(f"{_O}:SGLangHiRadix", V_OLD,
                                            "the same, write-back (backup when evicted from the device)",
                                            args=("write_back",)),
    "sglang-himamba": TargetSpec(f"{_O}:SGLangHiMamba", V_OLD,
                                 "SGLang HiMambaRadixCache 0.5.17 (write-through, direct IO), page 1; "
                                 "a GPU, or CPU stand-ins for pinning and copies", 1),
}

_POLICIES = {"write_through": "", "write_through_selective": "-selective", "write_back": "-write-back"}
_CORES = {"python": "Python", "rust": "compiled Rust"}
# SGLang 0.5.23's HiCache: UnifiedRadixCache + init_hicache (host tier, HybridCacheController), FULL only.
TARGETS.update({
    f"sglang-hicache-{core}{suffix}": TargetSpec(
        f"{_H}:SGLangUniHiCache", V_NEW,
        f"SGLang 0.5.23 HiCache (UnifiedRadixCache + init_hicache, FULL), {label} tree core, {policy}, "
        "page 2; on a GPU SGLang's JIT HiCache kernels (kernel IO), else direct IO with CPU stand-ins for "
        "pinning and copies", args=(core, policy), requires=_RUST if core == "rust" else None)
    for core, label in _CORES.items() for policy, suffix in _POLICIES.items()
})
# Under write_back an eviction backs the mamba state up with the KV: host targets may gain a host
# sidecar state on any step, as they may gain host KV (the model's gap found here, closed).
TARGETS.update({
    f"sglang-hicache-mamba{suffix}": TargetSpec(
        f"{_H}:SGLangUniHiMamba", V_NEW,
        f"SGLang 0.5.23 HiCache (UnifiedRadixCache + init_hicache, FULL+MAMBA), Python tree core, {policy}, "
        "direct IO, page 1; CPU stand-ins for the copies (and, without a GPU, for pinning)", 1, args=(policy,))
    for policy, suffix in _POLICIES.items()
})
# With SGLang's file storage backend (L3) and each prefetch stop policy; the machine adds a prefetch rule.
_STOP = {"wait_complete": "", "best_effort": "-best-effort", "timeout": "-timeout"}
TARGETS.update({
    f"sglang-hicache-{core}-storage{suffix}": TargetSpec(
        f"{_H}:SGLangUniHiCache", V_NEW,
        f"SGLang 0.5.23 HiCache (FULL), {label} tree core, write_through, file storage backend (L3), "
        f"prefetch stop policy {stop}, page 2", args=(core, "write_through", stop),
        machine="conformance.machine_storage:StorageMachine", requires=_RUST if core == "rust" else None)
    for core, label in _CORES.items() for stop, suffix in _STOP.items()
})
# Write-back with storage: a prefetch's anchor may be a device-only node (nothing is backed up before
# eviction), which an eviction under L2 pressure may try to drop while the prefetch is in flight.
TARGETS["sglang-hicache-python-write-back-storage"] = TargetSpec(
    f"{_H}:SGLangUniHiCache", V_NEW,
    "SGLang 0.5.23 HiCache (FULL), Python tree core, write_back, file storage backend (L3), "
    "prefetch stop policy wait_complete, page 2", args=("python", "write_back", "wait_complete"),
    machine="conformance.machine_storage:StorageMachine")
TARGETS["sglang-hicache-mamba-storage"] = TargetSpec(
    f"{_H}:SGLangUniHiMamba", V_NEW,
    "SGLang 0.5.23 HiCache (FULL+MAMBA), Python tree core, write_through, file storage backend (L3), "
    "prefetch stop policy wait_complete, page 1", 1, args=("write_through", "wait_complete"),
    machine="conformance.machine_storage:StorageMachine")
# The same with an L2 smaller than the device's pool (hicache_ratio 0.625, 12 host slots against 16):
# an eviction's write-back backup can fail for want of L2 that nodes held by host reference (an L3
# backup or a prefetch in flight) keep, so the subtree drop meets them (the tombstone seed, #23696).
TARGETS["sglang-hicache-python-write-back-storage-small-l2"] = TargetSpec(
    f"{_H}:SGLangUniHiCache", V_NEW,
    "SGLang 0.5.23 HiCache (FULL), Python tree core, write_back, hicache_ratio 0.625 (L2 smaller than the "
    "device), file storage backend (L3), prefetch stop policy wait_complete, page 2",
    args=("python", "write_back", "wait_complete", 0.625), machine="conformance.machine_storage:StorageMachine")
TARGETS["sglang-hicache-mamba-storage-timeout"] = TargetSpec(
    f"{_H}:SGLangUniHiMamba", V_NEW,
    "SGLang 0.5.23 HiCache (FULL+MAMBA), Python tree core, write_through, file storage backend (L3), "
    "prefetch stop policy timeout, page 1", 1, args=("write_through", "timeout"),
    machine="conformance.machine_storage:StorageMachine")
# Full + sliding-window attention (window 4 tokens): the SWA host-pool strategy, SWA tombstones; the Rust
# core is read through its public interface (which does not show an SWA host copy beside device SWA).
_SWA = "conformance.targets.sglang.v0_5_23_hicache_swa:SGLangUniHiSWA"
TARGETS.update({
    f"sglang-hicache-swa{'' if core == 'python' else '-rust'}{suffix}": TargetSpec(
        _SWA, V_NEW,
        f"SGLang 0.5.23 HiCache (UnifiedRadixCache + init_hicache, FULL+SWA, window 4), {label} tree core, {policy}, "
        "page 2; on a GPU SGLang's JIT HiCache kernels (kernel IO), else direct IO with CPU stand-ins",
        args=(policy, None, core), requires=_RUST if core == "rust" else None)
    for core, label in _CORES.items() for policy, suffix in _POLICIES.items()
})
TARGETS.update({
    f"sglang-hicache-swa{'' if core == 'python' else '-rust'}-storage{suffix}": TargetSpec(
        _SWA, V_NEW,
        f"SGLang 0.5.23 HiCache (FULL+SWA, window 4), {label} tree core, write_through, file storage backend (L3), "
        f"prefetch stop policy {stop}, page 2", args=("write_through", stop, core),
        machine="conformance.machine_storage:StorageMachine", requires=_RUST if core == "rust" else None)
    for core, label in _CORES.items() for stop, suffix in _STOP.items()
})
# FULL + MAMBA on the Rust tree core, read through its public interface like the Rust SWA targets.
TARGETS.update({
    f"sglang-hicache-mamba-rust{suffix}": TargetSpec(
        f"{_H}:SGLangUniHiMamba", V_NEW,
        f"SGLang 0.5.23 HiCache (UnifiedRadixCache + init_hicache, FULL+MAMBA), compiled Rust tree core, {policy}, "
        "direct IO, page 1; CPU stand-ins for the copies (and, without a GPU, for pinning)", 1,
        args=(policy, None, "rust"), requires=_RUST)
    for policy, suffix in _POLICIES.items()
})
TARGETS["sglang-hicache-mamba-rust-storage"] = TargetSpec(
    f"{_H}:SGLangUniHiMamba", V_NEW,
    "SGLang 0.5.23 HiCache (FULL+MAMBA), compiled Rust tree core, write_through, file storage backend (L3), "
    "prefetch stop policy wait_complete, page 1", 1, args=("write_through", "wait_complete", "rust"),
    machine="conformance.machine_storage:StorageMachine", requires=_RUST)
