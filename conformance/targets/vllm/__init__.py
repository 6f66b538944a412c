"""vLLM 0.33.0's prefix cache and CPU offloading manager as conformance targets.

`shim` imports vLLM's scheduler-side cache modules on a plain CPU machine, `install` puts the
pinned wheel in place (`python -m conformance.targets.vllm.install`), `block_pool` adapts the
GPU prefix cache (`KVCacheManager` / `BlockPool`), `offload` the CPU offloading manager behind
`OffloadingConnector` (LRU and ARC policies), `mutants` patches known vLLM bug classes in to
show the machine catches them. README.md here: the mapping and the contract differences.
"""

from __future__ import annotations

from .. import TargetSpec

_B, _O = "conformance.targets.vllm.block_pool", "conformance.targets.vllm.offload"
_REQ = "conformance.targets.vllm.shim:missing_reason"

TARGETS: dict[str, TargetSpec] = {
    "vllm-prefix": TargetSpec(f"{_B}:VLLMPrefixCache", None,
                              "vLLM 0.33.0 KVCacheManager/BlockPool, prefix caching, full attention, page 2",
                              requires=_REQ),
    "vllm-prefix-engine": TargetSpec(f"{_B}:engine_capped", None,
                                     "the same, insert's hit capped at len - 1 tokens as the scheduler asks it",
                                     requires=_REQ),
    "vllm-prefix-swa": TargetSpec(f"{_B}:VLLMPrefixCache", None,
                                  "the same with the hybrid coordinator: full attention + sliding window 4, page 2",
                                  args=("swa",), requires=_REQ),
    "vllm-prefix-mamba": TargetSpec(f"{_B}:VLLMPrefixCache", None,
                                    "the same with the hybrid coordinator: full attention + mamba (align mode), page 2",
                                    args=("mamba",), requires=_REQ),
    "vllm-tiered": TargetSpec("conformance.targets.vllm.tiered:VLLMTiered", None,
                              "vLLM 0.33.0 KVCacheManager + CPUOffloadingManager (LRU) as OffloadingConnector drives "
                              "them: write-through, load-back, page 2", requires=_REQ),
    "vllm-offload-lru": TargetSpec(f"{_O}:VLLMOffload", None,
                                   "vLLM 0.33.0 CPUOffloadingManager (OffloadingConnector's), LRU policy, page 2",
                                   args=("lru",), requires=_REQ),
    "vllm-offload-arc": TargetSpec(f"{_O}:VLLMOffload", None,
                                   "vLLM 0.33.0 CPUOffloadingManager, ARC policy (eviction order not judged), page 2",
                                   args=("arc",), requires=_REQ),
}
