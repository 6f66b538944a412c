"""refcache itself as a conformance target (the reference the other engines are compared with)."""

from __future__ import annotations

from .. import TargetSpec

_A = "conformance.targets.refcache.adapter"
TARGETS: dict[str, TargetSpec] = {
    "refcache": TargetSpec(f"{_A}:refcache_full", None, "refcache, full only, device-only usage, page 2"),
    "refcache-mamba": TargetSpec(f"{_A}:refcache_mamba", None, "refcache, full+mamba, device-only, page 1", 1),
    "refcache-hicache": TargetSpec(f"{_A}:refcache_hicache", None, "refcache HiCache, write-through, page 2"),
    "refcache-himamba": TargetSpec(f"{_A}:refcache_himamba", None,
                                   "refcache HiCache full+mamba, write-through, page 1", 1),
}
