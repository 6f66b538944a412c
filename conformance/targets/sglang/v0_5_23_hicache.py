"""SGLang 0.5.23's HiCache: `UnifiedRadixCache` with `init_hicache` (device KV backed by a host
tier through the `HybridCacheController`), Python or compiled Rust tree core, FULL component.

Built the way a server builds it: real `ServerArgs` published to the runtime context, the real
MHA device pool and paged allocator, the host pool and controller `init_hicache` assembles,
io_backend "direct" with the page-first-direct host layout. Without CUDA, pinned-memory
registration is skipped and the three copy kernels are torch stand-ins (`kernels.py`); the tree,
controller, pools and their bookkeeping are SGLang's. Every operation is followed by the
scheduler's per-step poll (`check_hicache_events`) until no write or load is in flight, so the
machine sees settled states; the load-back threshold is 0 so small trees exercise the load path.

Neither tree core exposes nodes in production builds, so the abstraction reads what the public
tree-core interface offers: live node ids (probed with `collect_path_info`, ids are never
re-minted), each node's span and device value, `is_backuped`, and `walk_for_kv_canary` for the
locked/unlocked split. Token content comes from the KV itself: every slot's K (layer 0) holds an
id of the prefix written there, so the device data (D1) is read, not assumed, also after a copy
through the host tier. A host-only node's prefix is the one last read from its device data (or
derived from a descendant's).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from array import array

import torch

from models.abstract import Model, Page, Prefix

from ...target import CORE_OPS, Inserted, Match, Target, TargetError, TargetInfo
from . import shim
from .common import HICACHE_REAL, KNOWN, V_NEW, cpu_stand_ins, walk_tree

POLICY_SUFFIX = {"write_through": "", "write_through_selective": "-selective", "write_back": "-write-back"}
# Explained divergences for these targets (each kept demonstrated in test_hicache.py).
KNOWN_HI = KNOWN
# Contract differences of a sidecar component (mamba, SWA) under HiCache (kept in test_hicache.py), each
# judged by its own rule: last_host_node is best_match_node (the deepest node every component's
# validator accepts on some tier, the anchor of a later storage prefetch), where the spec's last_host is
# the deepest page with KV; and host_hit_length counts the backed-up tokens between the device match and
# the best match, where the spec counts them all (a page's KV may be on device, its sidecar data not).
SIDECAR_HOST_RULES = frozenset({"last-host-is-best", "host-hit-is-backed-up"})
# With a storage tier: a prefetch run to its end in one step, or started and left in flight while
# other operations run (`prefetch_start` / `prefetch_finish`, machine_storage.py).
STORAGE_OPS = frozenset({"prefetch", "prefetch_pending"})


def storage_ops(prefetch: str | None) -> frozenset:
    """The storage operations the machine may drive: with a storage tier, a prefetch run to its end
    and one held in flight across operations, under every stop policy. (The held prefetch was once
    wait_complete-only, for a KeyError in SGLang's `node_by_id` under best_effort and timeout: our
    adapter polled HiCache between a load-back's match and the load-back, which the scheduler never
    does; see `load_back` and test_hicache.py.)"""
    return frozenset() if prefetch is None else STORAGE_OPS


class SGLangUniHiCache(Target):
    """One `UnifiedRadixCache` with HiCache on. `core`: "python" | "rust"; `policy`: its
    hicache_write_policy."""

    DIGITS = 3  # prefix ids are written as 3 base-128 digits (exact in bf16)
    WINDOW = 0  # a sliding window, in tokens (the SWA targets)
    # The match field the scheduler anchors an L2 load-back on (schedule_policy passes it to
    # init_load_back as InitLoadBackParams.best_match_node); seeds.py reverts it for one seed.
    LOAD_BACK_ANCHOR = "best_match_node"

    def __init__(self, core: str = "python", policy: str = "write_through", prefetch: str | None = None,
                 ratio: float | None = None):
        """`prefetch`: None (no storage tier), or the prefetch stop policy ("best_effort",
        "wait_complete", "timeout") with SGLang's file storage backend in a fresh directory.
        `ratio`: hicache_ratio (L2 size over the device's), by default 1.5, 1.25 with storage."""
        shim.load(V_NEW, real=HICACHE_REAL)
        from sglang.srt.mem_cache import base_prefix_cache as b
        from sglang.srt.mem_cache import cache_init_params as cip
        from sglang.srt.mem_cache import memory_pool as mp
        from sglang.srt.mem_cache import radix_cache as r
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        self.b, self.r, self.FULL = b, r, ComponentType.FULL
        self.dev = dev = "cuda" if torch.cuda.is_available() else "cpu"
        io, layout, head_dim = self._io_path(dev)
        ps, n = 2, 16
        self.policy, self.core = policy, core
        self.info = TargetInfo(f"sglang-hicache-{core}{POLICY_SUFFIX[policy]}{self._suffix(prefetch)}"
                               f"{self._ratio_suffix(ratio)}", page_size=ps,
                               ops=CORE_OPS | {"load_back"} | storage_ops(prefetch), device_tokens=n,
                               host=True, sglang=V_NEW, exact_locks=False, stamps=False,
                               allow=self.allowances(policy) | self.storage_allowances(policy, prefetch),
                               notes=self._io_notes(dev))
        sa = ServerArgs(model_path="dummy", page_size=ps, hicache_io_backend=io,
                        hicache_mem_layout=layout, hicache_write_policy=policy,
                        # L2 pressure makes prefetches truncate
                        hicache_ratio=ratio or (1.5 if prefetch is None else 1.25),
                        device=dev, **self._storage(prefetch, ps))
        set_global_server_args_for_scheduler(sa)
        self._one_rank()
        self.kv = mp.MHATokenToKVPool(size=n, page_size=ps, dtype=torch.bfloat16, head_num=2, head_dim=head_dim,
                                      layer_num=2, device=dev, enable_memory_saver=False)
        self.alloc_ = PagedTokenToKVPoolAllocator(size=n, page_size=ps, dtype=torch.bfloat16, device=dev,
                                                  kvcache=self.kv, need_sort=False)
        params = cip.CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=self.alloc_,
                                     page_size=ps, tree_components=(ComponentType.FULL,), tree_core_backend=core)
        self.cache = self._unified(UnifiedRadixCache, params, core)
        self.cache.init_hicache(sa, params)
        self.cache.load_back_threshold = 0
        if dev == "cpu":  # the storage path's staging pages ask for pinned memory
            for entry in self.cache.host_pool_group.entries:
                entry.host_pool.pin_memory = False
        elif not all(e.host_pool.can_use_jit for e in self.cache.host_pool_group.entries):
            raise shim.ShimError("SGLang's host pool declined its JIT HiCache kernels on this GPU")
        self.k0 = self.kv.get_key_buffer(0)
        self._start_reading()

    @staticmethod
    def _unified(cls, params, core: str):
        """The UnifiedRadixCache on tree core `core`; refused (ShimError) if SGLang fell back to another."""
        cache = cls(params)
        if cache._tree_core_backend != core:
            raise shim.ShimError(f"UnifiedRadixCache fell back to the {cache._tree_core_backend} tree core "
                                 f"instead of {core}")
        return cache

    def _start_reading(self) -> None:
        """The adapter's own record of what it wrote and read, empty once the cache is built."""
        self.tc = self.cache.tree_core
        self.root = self.tc.root_node_handle()
        self.ids: dict[Prefix, int] = {}
        self.prefixes: list[Prefix] = []
        self.prefix_of: dict = {}  # match/lock handle -> the prefix the machine asked for
        self.node_prefix_: dict[int, Prefix] = {}  # node id -> its full prefix, as last read
        self.live: set[int] = set()
        self.top = self.root  # highest node id probed so far

    @staticmethod
    def allowances(policy: str) -> frozenset:
        return KNOWN_HI

    @staticmethod
    def _io_path(dev: str) -> tuple[str, str, int]:
        """(io backend, host layout, head_dim). On the CPU: direct IO, page-first-direct, copies by
        torch (kernels.py). On a GPU: SGLang's defaults, kernel IO and the page_first layout, whose
        copies are its JIT HiCache kernels compiled there with nvcc (jit.py); those copy rows in
        128-byte groups, so a row (2 heads x head_dim x bf16) is made 256 bytes."""
        if dev == "cpu":
            cpu_stand_ins()
            return "direct", "page_first_direct", 8
        from . import jit

        jit.serve(shim.loaded().root)
        return "kernel", "page_first", 64

    @staticmethod
    def _io_notes(dev: str) -> str:
        if dev == "cpu":
            return "on cpu (CPU stand-ins for pinning and copies)"
        return f"on {torch.cuda.get_device_name()}: kernel IO, page_first, SGLang's JIT HiCache kernels"

    def _storage(self, prefetch: str | None, ps: int) -> dict:
        """ServerArgs for SGLang's file storage backend in a fresh directory ({} without storage)."""
        self.prefetch_policy, self.storage_dir, self.requests, self.pending_ = prefetch, None, 0, None
        if prefetch is None:
            return {}
        self.storage_dir = tempfile.mkdtemp(prefix="refcache-l3-")
        os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = self.storage_dir  # HiCacheFile reads it
        return dict(hicache_storage_backend="file", hicache_storage_prefetch_policy=prefetch,
                    hicache_storage_backend_extra_config=json.dumps({"prefetch_threshold": 2 * ps}))

    def _one_rank(self) -> None:
        """With storage: a single rank (the file backend names its files by rank)."""
        if self.prefetch_policy is not None:
            from sglang.srt.runtime_context import get_parallel

            get_parallel().override_permanently(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)

    @staticmethod
    def storage_allowances(policy: str, prefetch: str | None) -> frozenset:
        """"write-back-l2-full" (machine.py `_spare_unbacked_leaves`): under write_back with L3, an
        eviction may leave an unbacked leaf on device when L2 cannot take its backup and what holds
        L2 is host-referenced by an L3 backup or a prefetch (`_evict_components`: "subtree drop
        declined ... stays device-resident until host space frees")."""
        return frozenset({"write-back-l2-full"}) if policy == "write_back" and prefetch is not None else frozenset()

    @staticmethod
    def _ratio_suffix(ratio: float | None) -> str:
        """The target name's tail for an L2 smaller than the device's pool ("-small-l2")."""
        return "" if ratio is None else "-small-l2" if ratio < 1 else f"-l2-{ratio:g}"

    def _suffix(self, prefetch: str | None) -> str:
        if prefetch is None:
            return ""
        return "-storage" + ("" if prefetch == "wait_complete" else "-" + prefetch.replace("_", "-"))

    # ----------------------------------------------------------------- data in the KV
    def _id(self, prefix: Prefix) -> int:
        if prefix not in self.ids:
            self.ids[prefix] = len(self.prefixes) + 1
            self.prefixes.append(prefix)
        return self.ids[prefix]

    def _write(self, slots: torch.Tensor, tokens: list[int], buf: torch.Tensor | None = None) -> None:
        """Write into each slot of `buf` (by default the full KV's K of layer 0) the id of its prefix."""
        buf = self.k0 if buf is None else buf
        for i, s in enumerate(slots.tolist()):
            x, row = self._id(tuple(tokens[: i + 1])), buf[s].view(-1)
            for d in range(self.DIGITS):
                row[d] = float(x % 128)
                x //= 128

    def _read(self, slot: int, buf: torch.Tensor | None = None) -> Prefix | None:
        row = (self.k0 if buf is None else buf)[slot].view(-1)[: self.DIGITS].float().tolist()
        x = sum(int(v) * 128**d for d, v in enumerate(row))
        return self.prefixes[x - 1] if 0 < x <= len(self.prefixes) else None

    # ----------------------------------------------------------------- driving
    def _key(self, tokens):
        return self.r.RadixKey(array("q", tokens))

    def _settle(self) -> None:
        c = self.cache
        for i in range(5000):
            c.check_hicache_events()
            cc = c.cache_controller
            if not c.ongoing_write_through and not c.ongoing_load_back and not cc.write_queue and not cc.load_queue \
                    and not c.ongoing_backup:
                return
            if self.dev == "cuda":
                torch.cuda.synchronize()
            if c.ongoing_backup and i > 10:  # L3 writes run on the controller's storage thread
                time.sleep(0.001)
        raise AssertionError(f"operations never acknowledged: writes {list(c.ongoing_write_through)}, "
                             f"loads {list(c.ongoing_load_back)}")

    def alloc(self, tokens):
        n = len(tokens)
        if self.alloc_.available_size() < n:
            self.cache.evict(self.b.EvictParams(num_tokens=n - self.alloc_.available_size()))
            self._settle()
        idx = self.alloc_.alloc(n)
        if idx is None:
            raise TargetError(f"{n} tokens needed, {self.alloc_.available_size()} free after eviction")
        self._write(idx, tokens)
        return idx

    def insert(self, tokens, kv):
        # The unified tree frees the duplicates of what it already holds itself.
        res = self.cache.insert(self.b.InsertParams(key=self._key(tokens), value=kv, track_adopted_ranges=True))
        self._settle()
        return Inserted(self.cached_len(res))

    def cached_len(self, res) -> int:
        """The spec's cached_len (leading tokens already on device) from an InsertResult.

        Contract difference, mapped here: 0.5.23's prefix_len counts the matched host-only nodes
        too, whose device KV the insert adopts from the request (listed in adopted_ranges); those
        are a suffix of the matched path (a device node's parent is on device), so the device
        prefix ends where the first adopted range starts."""
        starts = [a for ranges in (res.adopted_ranges or {}).values() for a, _ in ranges]
        return min([res.prefix_len, *starts])

    def _end(self, node) -> int:
        path = self.tc.collect_path_info([node])[0]
        return path[-1].path_end if path else 0

    def _note_path(self, tokens, m) -> None:
        """Record the prefix of every node on the path a match of `tokens` returned: each lies on
        `tokens`. A match may split a host-only node; the new upper node holds no device KV to read
        its prefix from, and a later poll may evict the lower one it could be derived from (a
        prefetch's storage hit taking L2), so the prefix is taken here, before any poll."""
        for node in (m.last_device_node, m.last_host_node, m.best_match_node):
            for step in self.tc.collect_path_info([node])[0]:
                self.node_prefix_[step.node_id] = tuple(tokens[: step.path_end])

    def match(self, tokens):
        # The match's nodes are read before the poll: a poll lets a prefetch in flight take L2 for its
        # storage hit, evicting host leaves, the matched best_match_node / last_host_node among them
        # (then a KeyError in node_by_id), and the scheduler uses a match's result before it polls.
        m = self.cache.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        self._note_path(tokens, m)
        node = m.last_device_node
        self.prefix_of[node] = tuple(tokens[: m.device_prefix_len])
        idx = self.tc.collect_full_device_indices(node, self.root).tolist()
        got = Match(device_len=m.device_prefix_len, best_len=self._end(m.best_match_node), node=node,
                    device_indices=idx, last_host_len=self._end(m.last_host_node), host_hit=m.host_hit_length)
        self._settle()
        return got

    def data_ok(self, tokens, m) -> bool:
        return [self._read(s) for s in m.device_indices] == [tuple(tokens[: i + 1]) for i in range(len(m.device_indices))]

    def load_back(self, tokens) -> int | None:
        """Match, then load `best_match_node` back as the scheduler does (load_back, then start the
        loading, then poll); None when the cache declined. Returns the device match length after.

        No poll between the match and the load-back: the scheduler goes from the match
        (`Req.init_next_round_input`) straight to `PrefillAdder.add_one_req` -> `init_load_back`
        and polls HiCache (`check_hicache_events`) only at the start of a step. A poll there would
        let a prefetch in flight take L2 for its storage hit, evicting host leaves, the matched
        node among them (then a KeyError in node_by_id; test_hicache.py keeps the case)."""
        m = self.cache.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        self._note_path(tokens, m)
        if m.host_hit_length > 0 or m.mamba_host_hit_length > 0 or m.swa_host_hit_length > 0:  # any component's
            got = self.cache.load_back(getattr(m, self.LOAD_BACK_ANCHOR))
            self.cache.ready_to_load_host_cache()
            self._settle()
            if not got:
                return None
        return self.match(tokens).device_len

    # ----------------------------------------------------------------- storage tier (L3)
    def l3_pages(self, tokens: list[int]) -> list[bool]:
        """For each page of `tokens`: whether L3 holds it (the backend asked directly)."""
        backend = self.cache.cache_controller.storage_backend
        return [bool(backend.exists(k)) for k in self._l3_keys(tokens)]

    def _l3_keys(self, tokens: list[int]) -> list[str]:
        """The storage keys of the whole pages of `tokens` (SGLang's hash chain)."""
        from sglang.srt.mem_cache.utils import get_storage_hash_str

        ps = self.info.page_size
        return get_storage_hash_str(array("q", tokens[: len(tokens) // ps * ps]), None, page_size=ps)

    def host_free(self) -> int:
        return self.cache.cache_controller.mem_pool_host.available_size()

    def prefetch(self, tokens: list[int]) -> dict:
        """Prefetch `tokens` from L3 as the scheduler does, start to finish: `prefetch_start`, then
        `prefetch_finish`. Returns {anchor_len, outcome: the counter it bumped}."""
        start = self.prefetch_start(tokens)
        got = self.prefetch_finish()
        return {"anchor_len": start, "outcome": got["outcome"]}

    def prefetch_start(self, tokens: list[int]) -> int:
        """Match, then prefetch what follows the host match (anchored at last_host_node, hash chain
        continued from it) and leave it in flight (its anchor stays host-referenced until it ends):
        other operations may run before `prefetch_finish`. Returns the anchor's length."""
        c = self.cache
        # As the scheduler's _prefetch_kvcache: the match, then the prefetch from its anchor, no poll between.
        m = c.match_prefix(self.b.MatchPrefixParams(key=self._key(tokens)))
        self._note_path(tokens, m)
        anchor = m.last_host_node
        start = self._end(anchor)
        self.requests += 1
        req = self.b.CacheRequestHandle(f"conformance-{self.requests}", 0)
        self.pending_ = (req, list(tokens), dict(c._prefetch_outcome_stats))
        c.prefetch_from_storage(req, anchor, array("q", tokens[start:]), self.tc.get_last_hash_value(anchor),
                                matched_prefix_tokens=list(tokens[:start]))
        return start

    def prefetch_finish(self) -> dict:
        """Poll the pending prefetch's progress as the scheduler does until the request may stop
        waiting, then take its tokens. Returns {tokens, outcome}."""
        c = self.cache
        req, tokens, before = self.pending_
        self.pending_ = None
        deadline = time.monotonic() + 10
        while not c.check_prefetch_progress(req):
            c.check_hicache_events()
            if time.monotonic() > deadline:
                raise AssertionError(f"prefetch of {tokens} never finished ({self.prefetch_policy})")
            time.sleep(0.001)
        c.pop_prefetch_loaded_tokens(req)
        c.discard_storage_prefetch_accounting(req)
        self._settle()
        # A prefetch that ended before its reads did releases its L2 staging later, when the storage
        # threads let go of it (as our own detached prefetches drain): give that up to 2 s before the
        # host pool is judged, so R1 sees a leak, not the release still on its way.
        host, stop = c.cache_controller.mem_pool_host, time.monotonic() + 2
        while host.available_size() + self._held() != host.size and time.monotonic() < stop:
            c.check_hicache_events()
            time.sleep(0.005)
        self._settle()
        # The nodes a prefetch inserts hold no device data yet: they lie on the request's path.
        for i, path in self._nodes().items():
            end = path[-1].path_end
            if i not in self.node_prefix_ and end <= len(tokens) and self._hash_agrees(i, tokens[:end]):
                self.node_prefix_[i] = tuple(tokens[:end])
        bumped = [k for k, v in c._prefetch_outcome_stats.items() if v != before.get(k)]
        return {"tokens": tokens, "outcome": bumped}

    def _held(self) -> int:
        """L2 slots the tree's backed-up nodes hold."""
        return sum(p[-1].path_end - p[-1].path_start for i, p in self._nodes().items() if self.tc.is_backuped(i))

    def _staged(self) -> int:
        """L2 slots a prefetch in flight holds for what L3 returns (its operation's host indices,
        allocated when L3 answers; they join the tree when the prefetch ends)."""
        ops = getattr(self.cache, "ongoing_prefetch", None) or {}
        return sum(len(o.operation.host_indices) for o in ops.values()
                   if getattr(o.operation, "host_indices", None) is not None)

    def alive(self, node) -> bool:
        try:
            self.tc.collect_path_info([node])
            return True
        except (KeyError, IndexError, RuntimeError, ValueError):
            return False

    def node_prefix(self, node) -> Prefix:
        return self.prefix_of[node]

    def lock(self, node):
        return self.cache.lock(node)

    def locked_prefix(self, lock) -> Prefix:
        return self.prefix_of[lock.node]

    def unlock(self, lock):
        self.cache.unlock(lock)

    def evict(self, n):
        freed = self.cache.evict(self.b.EvictParams(num_tokens=n)).num_tokens_evicted
        self._settle()
        return freed

    # ----------------------------------------------------------------- reading the tree
    def _tree(self):
        """(node, prefix) for every node below the root, read from the Python core's nodes (the
        sidecar targets read them directly on that core)."""
        return walk_tree(self.tc.root_node)

    def _nodes(self) -> dict[int, tuple]:
        """Every live node id -> its path (TreePathNodeInfo from the root down)."""
        out = {}
        for i in list(self.live):
            if self.alive(i):
                out[i] = self.tc.collect_path_info([i])[0]
            else:
                self.live.discard(i)
        misses, i = 0, max(self.top, max(self.live, default=self.root))
        while misses < 24:
            i += 1
            if self.alive(i):
                out[i] = self.tc.collect_path_info([i])[0]
                self.live.add(i)
                self.top, misses = i, 0
            else:
                misses += 1
        return out

    def _prefixes(self, nodes: dict[int, tuple]) -> dict[int, Prefix]:
        """Each node's prefix: from its device KV where it has some, else as last known, else cut
        from a descendant's."""
        for i, path in nodes.items():
            v = self.tc.get_component_device_value(i, self.FULL)
            if v is not None and len(v):
                pre = self._read(int(v[-1]))
                if pre is None or len(pre) != path[-1].path_end:
                    raise AssertionError(f"D1: node {i} (ending at {path[-1].path_end}) holds slot {int(v[-1])} "
                                         f"whose contents are {pre}")
                self.node_prefix_[i] = pre
        out = {i: self.node_prefix_[i] for i in nodes if i in self.node_prefix_}
        for i, path in nodes.items():
            if i in out:
                for step in path[:-1]:
                    out.setdefault(step.node_id, out[i][: step.path_end])
        for i, path in nodes.items():  # a node a prefetch in flight inserted lies on its request's path
            end = path[-1].path_end
            if i not in out and self.pending_ is not None and end <= len(self.pending_[1]) \
                    and self._hash_agrees(i, self.pending_[1][:end]):
                out[i] = tuple(self.pending_[1][:end])
        for i in nodes:
            if i not in out:
                raise AssertionError(f"node {i} ({nodes[i][-1]}): prefix unknown (no device data, none before)")
            self.node_prefix_[i] = out[i]
        return out

    def _hash_agrees(self, node, tokens) -> bool:
        """Whether `node` may end the prefix `tokens`: its last storage hash (where it has one) is
        the hash chain's last of `tokens`. Guards the guess that a node of unknown prefix lies on the
        path of the prefetch in flight: another host-only node (a match's split) may be there too."""
        from sglang.srt.mem_cache.utils import get_storage_hash_str

        have = self.tc.get_last_hash_value(node)
        if not have or not tokens:
            return True
        return get_storage_hash_str(array("q", tokens), None, page_size=self.info.page_size)[-1] == have

    def _walk(self, unlocked_only: bool):
        w = self.tc.walk_for_kv_canary(unlocked_only, False)
        return list(zip(w.slot_indices.tolist(), w.positions.tolist(), w.prev_slot_indices.tolist(), strict=True))

    def abstract(self) -> Model:
        """The tree as the tree core's public interface shows it (the only view the Rust core gives)."""
        ps = self.info.page_size
        m = Model(page_size=ps, sidecar=self.info.sidecar, window=self.WINDOW)
        nodes = self._nodes()
        pre = self._prefixes(nodes)
        unlocked = {s for s, _, _ in self._walk(True)}
        for i, path in nodes.items():
            info = path[-1]
            v = self.tc.get_component_device_value(i, self.FULL)
            dev = v is not None and len(v) > 0
            locked = dev and any(int(s) not in unlocked for s in v.tolist())
            host = bool(self.tc.is_backuped(i))
            every, last = self._sidecar_flags(i)
            for end in range(info.path_start + ps, info.path_end + 1, ps):
                m.pages[pre[i][:end]] = Page(dev=dev, host=host, lock=1 if locked else 0, **every,
                                             **(last if end == info.path_end else {}))
        return m

    def _sidecar_flags(self, node) -> tuple[dict, dict]:
        """A sidecar component's Page flags for `node` through the interface: (on every page of the
        node, on its last page only). None here; the sidecar targets say theirs."""
        return {}, {}

    def check(self) -> list[str]:
        v = []
        walk = self._walk(False)
        for s, pos, prev in walk:
            got = self._read(s)
            if got is None or len(got) != pos + 1 or (pos > 0 and self._read(prev) != got[:-1]):
                v.append(f"D1: slot {s} (position {pos}, after slot {prev}) holds {got}")
        try:
            self.cache.sanity_check()
        except Exception as e:  # the target's own checker
            v.append(f"sanity_check: {type(e).__name__}: {e}")
        total = self.alloc_.size
        if self.alloc_.available_size() + len(walk) != total:  # R1 on the device: every slot free or in the tree
            v.append(f"R1: device pool of {total} slots: {self.alloc_.available_size()} free + {len(walk)} in the tree")
        unlocked = len(self._walk(True))
        got = (self.tc.full_evictable_size(), self.tc.full_protected_size())
        if got != (unlocked, len(walk) - unlocked):
            v.append(f"R2: evictable/protected sizes {got}, the tree's device slots sum to {(unlocked, len(walk) - unlocked)}")
        host = self.cache.cache_controller.mem_pool_host
        held = sum(p[-1].path_end - p[-1].path_start for i, p in self._nodes().items() if self.tc.is_backuped(i))
        staged = self._staged()
        if held + staged + host.available_size() != host.size:  # R1 on the host tier: no slot leaked or shared
            v.append(f"R1: host pool of {host.size} slots: {host.available_size()} free + {held} held by the tree"
                     f" + {staged} staged by a prefetch in flight")
        return v

    def close(self) -> None:
        import atexit

        atexit.unregister(self.cache.shutdown)
        if getattr(self, "gate", None) is not None:
            self.gate.set()
        if self.storage_dir is not None:
            self.cache.shutdown()
            shutil.rmtree(self.storage_dir, ignore_errors=True)
        self.cache.release_host_resources()


class SGLangUniHiMamba(SGLangUniHiCache):
    """`UnifiedRadixCache` with FULL + MAMBA components and HiCache on (host KV and host mamba
    pools), Python tree core, page size 1 (mamba without the extra buffer requires it). The Python
    core's nodes are read directly: device and host values and lock counts of both components. Each
    mamba state (temporal, layer 0) holds the id of the request it was written for, so a state that
    a node holds, also after a round trip through the host tier, is checked to be its prefix's."""

    def __init__(self, policy: str = "write_through", prefetch: str | None = None, core: str = "python"):
        shim.load(V_NEW, real=HICACHE_REAL)
        from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateShape
        from sglang.srt.mem_cache import base_prefix_cache as b
        from sglang.srt.mem_cache import cache_init_params as cip
        from sglang.srt.mem_cache import memory_pool as mp
        from sglang.srt.mem_cache import radix_cache as r
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        self.b, self.r, self.FULL, self.MAMBA = b, r, ComponentType.FULL, ComponentType.MAMBA
        self.dev = dev = "cuda" if torch.cuda.is_available() else "cpu"
        cpu_stand_ins(pinning=dev == "cpu")  # on a GPU too: sgl_kernel's copies (mamba state) do not load
        n, slots = 16, 6
        self.policy, self.core = policy, core
        self.info = TargetInfo(f"sglang-hicache-mamba{'' if core == 'python' else '-' + core}{POLICY_SUFFIX[policy]}"
                               f"{self._suffix(prefetch)}", page_size=1,
                               sidecar="mamba", device_tokens=n, mamba_slots=slots,
                               ops=CORE_OPS | {"load_back", "evict_mamba"} | storage_ops(prefetch),
                               host=True, sglang=V_NEW, exact_locks=False, stamps=False,
                               allow=self.allowances(policy) | SIDECAR_HOST_RULES,
                               notes=f"on {dev}" + (" (CPU stand-ins for pinning and copies)" if dev == "cpu" else
                                                    " (direct IO with torch copies: sgl_kernel does not load)"))
        sa = ServerArgs(model_path="dummy", page_size=1, hicache_io_backend="direct",
                        hicache_mem_layout="page_first_direct", hicache_write_policy=policy, hicache_ratio=1.5,
                        device=dev, **self._storage(prefetch, 1))
        sa._mamba_cache_chunk_size = 64
        set_global_server_args_for_scheduler(sa)
        self._one_rank()
        shape = Mamba2StateShape.create(tp_world_size=1, intermediate_size=32, n_groups=1, num_heads=2, head_dim=8,
                                        state_size=8, conv_kernel=4)
        self.req_pool = mp.HybridReqToTokenPool(
            size=4, mamba_size=slots, mamba_spec_state_size=4, max_context_len=64, device=dev,
            enable_memory_saver=False, cache_params=Mamba2CacheParams(shape=shape, layers=[0]), mamba_layer_ids=[0],
            enable_mamba_extra_buffer=False, speculative_num_draft_tokens=3)
        self.kv = mp.HybridLinearKVPool(size=n, dtype=torch.bfloat16, page_size=1, head_num=2, head_dim=8,
                                        full_attention_layer_ids=[1], device=dev, enable_memory_saver=False,
                                        mamba_pool=self.req_pool.mamba_pool)
        self.alloc_ = TokenToKVPoolAllocator(size=n, dtype=torch.bfloat16, device=dev, kvcache=self.kv, need_sort=False)
        params = cip.CacheInitParams(disable=False, req_to_token_pool=self.req_pool,
                                     token_to_kv_pool_allocator=self.alloc_, page_size=1,
                                     tree_components=(ComponentType.FULL, ComponentType.MAMBA),
                                     tree_core_backend=core)
        self.cache = self._unified(UnifiedRadixCache, params, core)
        self.cache.init_hicache(sa, params)
        self.cache.load_back_threshold = 0
        if dev == "cpu":
            for entry in self.cache.host_pool_group.entries:
                entry.host_pool.pin_memory = False
        self.state0 = self.req_pool.mamba_pool.mamba_cache.temporal[0]  # layer 0: [slot, ...], an id per state
        self.k0 = self.kv.full_kv_pool.get_key_buffer(self.kv.full_kv_pool.start_layer)
        self._start_reading()
        self.gate = threading.Event()  # open unless a prefetch's mamba read is being held
        self.gate.set()
        if prefetch is not None:
            self._gate_sidecar_reads()

    def _gate_sidecar_reads(self) -> None:
        """Make the storage backend's mamba reads wait at `gate`. A prefetch reads its KV, then the
        mamba state at the end of what it found (a second read on the same storage thread, acked
        apart); on this CPU the two follow each other within microseconds, against a remote backend
        they need not. Holding the second read lets the machine poll the prefetch in that window."""
        from sglang.srt.mem_cache.hicache_storage import PoolName

        backend = self.cache.cache_controller.storage_backend
        read = backend.batch_get_v2

        def gated(transfers, *a, **k):
            if any(x.name == PoolName.MAMBA for x in transfers):
                self.gate.wait(10)
            return read(transfers, *a, **k)

        backend.batch_get_v2 = gated

    def l3_sidecar_pages(self, tokens: list[int]) -> list[bool]:
        """For each page of `tokens`: whether L3 holds the mamba state that ends there."""
        from sglang.srt.mem_cache.utils import get_storage_hash_str

        backend = self.cache.cache_controller.storage_backend
        return [bool(backend.exists(k + ".mamba")) for k in get_storage_hash_str(array("q", tokens), None, page_size=1)]

    def host_sidecar_free(self) -> int:
        """Free states in the host mamba pool."""
        return sum(e.host_pool.available_size() for e in self.cache.host_pool_group.entries if e.name == "mamba")

    def prefetch_start(self, tokens: list[int]) -> int:
        self.gate.clear()
        return super().prefetch_start(tokens)

    def prefetch_finish(self) -> dict:
        """Poll the prefetch as the scheduler does while its mamba read is held (until its KV has
        landed, it ended, or 0.5 s), then let the read go and poll it to its end."""
        c, req = self.cache, self.pending_[0]
        try:
            stop = time.monotonic() + 0.5
            while time.monotonic() < stop:
                c.check_hicache_events()
                info = c.ongoing_prefetch.get(req)
                if info is None or info.operation.is_terminated():
                    break
                op = info.operation
                if op.host_indices is not None and op.completed_tokens >= len(op.hash_value) * self.info.page_size:
                    c.check_prefetch_progress(req)  # the KV is in, the state is not: may it end now?
                    break
                time.sleep(0.001)
        finally:
            self.gate.set()
        return super().prefetch_finish()

    def alloc(self, tokens):
        idx = super().alloc(tokens)
        states = self.req_pool.mamba_allocator
        slot = states.alloc(1)
        if slot is None:
            self.cache.evict(self.b.EvictParams(num_tokens=0, mamba_num=1))
            self._settle()
            slot = states.alloc(1)
        if slot is None:
            self.alloc_.free(idx)
            raise TargetError("mamba state pool full after eviction")
        self.state0[int(slot[0])].view(-1)[0] = float(self._id(tuple(tokens)))  # the state of the whole request
        return idx, slot

    def insert(self, tokens, kv):
        idx, slot = kv
        res = self.cache.insert(self.b.InsertParams(key=self._key(tokens), value=idx, mamba_value=slot,
                                                    track_adopted_ranges=True))
        if res.mamba_exist:
            self.req_pool.mamba_allocator.free(slot)
        self._settle()
        return Inserted(self.cached_len(res), not res.mamba_exist)

    def evict_mamba(self, n):
        freed = self.cache.evict(self.b.EvictParams(num_tokens=0, mamba_num=n)).mamba_num_evicted
        self._settle()
        return freed

    def abstract(self) -> Model:
        if self.core != "python":
            return super().abstract()
        m = Model(page_size=1, sidecar="mamba", window=0)
        for node, pre in self._tree():
            f, s = node.component_data[self.FULL], node.component_data[self.MAMBA]
            start = len(pre) - len(node.key)
            for end in range(start + 1, len(pre) + 1):
                last = end == len(pre)
                m.pages[pre[:end]] = Page(dev=f.value is not None, host=f.host_value is not None,
                                          mamba=last and s.value is not None, mamba_host=last and s.host_value is not None,
                                          lock=1 if f.lock_ref else 0, host_ref=f.host_lock_ref)
        return m

    def _sidecar_flags(self, node) -> tuple[dict, dict]:
        """The node's state, on its last page (a host copy shows through the interface only while the
        state is off device; host references are not visible there)."""
        mv = self.tc.get_component_device_value(node, self.MAMBA)
        return {}, {"mamba": mv is not None and len(mv) > 0,
                    "mamba_host": bool(self.tc.component_has_host_value_only(node, self.MAMBA))}

    def _node_values(self) -> list[tuple]:
        """Per node: (prefix, full device value, full host slots, mamba device value), from the Python
        core's nodes or the Rust core's interface."""
        if self.core == "python":
            return [(pre, n.component_data[self.FULL].value,
                     0 if n.component_data[self.FULL].host_value is None else len(n.component_data[self.FULL].host_value),
                     n.component_data[self.MAMBA].value) for n, pre in self._tree()]
        nodes = self._nodes()
        pre = self._prefixes(nodes)
        return [(pre[i], self.tc.get_component_device_value(i, self.FULL),
                 p[-1].path_end - p[-1].path_start if self.tc.is_backuped(i) else 0,
                 self.tc.get_component_device_value(i, self.MAMBA)) for i, p in nodes.items()]

    def _held(self) -> int:
        """L2 slots the tree holds. On the Rust core the base's count: it runs before a prefetch's new
        nodes have known prefixes, which `_node_values` needs there."""
        return sum(h for _, _, h, _ in self._node_values()) if self.core == "python" else super()._held()

    def check(self) -> list[str]:
        v = []
        dev_slots, host_slots, states = 0, 0, 0
        for pre, fv, fh, sv in self._node_values():
            if fv is not None and len(fv):
                dev_slots += len(fv)
                got = [self._read(int(x)) for x in fv]
                want = [pre[: len(pre) - len(fv) + i + 1] for i in range(len(fv))]
                if got != want:
                    v.append(f"D1: node {pre} holds device KV of {got}")
            host_slots += fh
            if sv is not None and len(sv):
                states += len(sv)
                x = int(self.state0[int(sv[0])].view(-1)[0])
                got = self.prefixes[x - 1] if 0 < x <= len(self.prefixes) else None
                if got != pre:
                    v.append(f"D1: node {pre} holds the mamba state of {got}")
        try:
            self.cache.sanity_check()
        except Exception as e:  # the target's own checker
            v.append(f"sanity_check: {type(e).__name__}: {e}")
        if self.alloc_.available_size() + dev_slots != self.alloc_.size:
            v.append(f"R1: device pool of {self.alloc_.size} slots: {self.alloc_.available_size()} free + "
                     f"{dev_slots} in the tree")
        mam = self.req_pool.mamba_allocator
        if mam.available_size() + states != self.info.mamba_slots:
            v.append(f"R1: mamba pool of {self.info.mamba_slots} states: {mam.available_size()} free + {states} in the tree")
        host = self.cache.cache_controller.mem_pool_host
        staged = self._staged()
        if host_slots + staged + host.available_size() != host.size:
            v.append(f"R1: host pool of {host.size} slots: {host.available_size()} free + {host_slots} held by the tree"
                     f" + {staged} staged by a prefetch in flight")
        return v
