"""SGLang 0.5.23's PD-decode KV offload (`DecodeKVCacheOffloadManager`) on CPU, with the file storage
backend (L3): not a machine target, a fixed check of what the offload leaves in L3.

The manager is the one 0.5.23 caller that keeps a moved L2 operation's `PoolTransfer`s: it calls the
controller's write() with flush=True (the move runs inside the call), then hands `transfer.host_indices`
to write_storage and frees them. Only the SWA sidecar goes through a PoolTransfer (the KV anchor's host
indices are returned by write() apart from the move), and only a UnifiedSWAKVPool device pool gives it
one, so the stack is the SWA-hybrid unified pool (`init_unified_swa_pools`), hybrid controller and host
pools as the manager builds them, io_backend "direct" with the "layer_first" host layout (the layout
whose move sorts the host indices), a one-rank gloo group for its tensor-parallel group.

Each request is a finished decode: a one-token prompt (nothing page-aligned for the prefill side) and
its output; the manager offloads the page-aligned part to L2, then to L3 under its own hash chain.
Every token's slot holds an id of its prefix in K (layer 0 of both sub-pools), so reading a page file
back says which prefix it holds. Without CUDA the allocator's wait on a copy's finish event
(`_wait_hicache_transfers`, which asks for the current CUDA stream) synchronizes the CPU events instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from unittest import mock

import torch

from . import shim
from .common import HICACHE_REAL, V_NEW, cpu_stand_ins

PS = 2


class _Kv:
    def __init__(self, row: int):
        self.req_pool_idx = row


class _Req:
    """The fields of a scheduler Req the manager reads (weak-referenceable, as its maps need)."""

    def __init__(self, rid: str, row: int, tokens: list[int]):
        self.rid, self.kv = rid, _Kv(row)
        # all_tokens = origin_input_ids + output_ids[:-1]: the last output token has no KV yet
        self.origin_input_ids, self.output_ids = tokens[:1], tokens[1:] + [0]
        self.extra_key = self.cache_salt = None

    def finished(self) -> bool:
        return False  # the check frees the device rows itself


def offload_and_read_back(runs: list[list[int]]) -> list[str]:
    """Offload each token run as a finished decode request through the manager (one at a time, each
    run to the end of its L3 backup), then read every page the manager stored back from L3: returns
    one line per page whose KV or SWA bytes hold another prefix than the page's (empty: all right).
    Loads sglang 0.5.23 in this process and starts a one-rank gloo group."""
    shim.load(V_NEW, real=HICACHE_REAL)
    import torch.distributed as dist
    from sglang.srt.disaggregation.decode_kvcache_offload_manager import DecodeKVCacheOffloadManager
    from sglang.srt.mem_cache.allocator import unified_sub_pool as usp
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.unified_memory_pool import init_unified_swa_pools
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    cpu = not torch.cuda.is_available()
    if cpu:
        cpu_stand_ins()
    l3 = tempfile.mkdtemp(prefix="refcache-decode-l3-")
    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = l3
    set_global_server_args_for_scheduler(ServerArgs(
        model_path="dummy", page_size=PS, hicache_io_backend="direct", hicache_mem_layout="layer_first",
        hicache_storage_backend="file", hicache_ratio=1.0, device="cpu", disaggregation_mode="decode"))
    get_parallel().override_permanently(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def wait_cpu(self) -> None:
        events = tuple(self._hicache_transfer_done_events.values())
        self._hicache_transfer_done_events.clear()
        for e in events:
            e.synchronize()

    stand_in = mock.patch.object(usp.MultiEndedAllocator, "_wait_hicache_transfers", wait_cpu) if cpu \
        else contextlib.nullcontext()
    try:
        with stand_in:
            return _run(runs, l3, dist, DecodeKVCacheOffloadManager, ReqToTokenPool, init_unified_swa_pools)
    finally:
        shutil.rmtree(l3, ignore_errors=True)


def _run(runs, l3, dist, Manager, ReqToTokenPool, init_pools) -> list[str]:
    b = init_pools(device="cpu", kv_cache_dtype=torch.bfloat16, head_num=2, head_dim=8, v_head_dim=8,
                   swa_head_num=2, swa_head_dim=8, swa_v_head_dim=8, page_size=PS, start_layer=0, end_layer=2,
                   swa_attention_layer_ids=[1], full_attention_layer_ids=[0], full_max_total_num_tokens=16,
                   swa_max_total_num_tokens=16, enable_memory_saver=False, need_sort=False)
    kv, alloc = b.token_to_kv_pool, b.token_to_kv_pool_allocator
    rows = ReqToTokenPool(size=2, max_context_len=32, device="cpu", enable_memory_saver=False)
    m = Manager(rows, alloc, dist.group.WORLD, tree_cache=None)
    ids: dict[tuple, int] = {}
    bufs = ((kv.full_kv_pool.get_key_buffer(0), alloc.full_attn_allocator),
            (kv.swa_kv_pool.get_key_buffer(0), alloc.swa_attn_allocator))
    reqs = []
    for i, tokens in enumerate(runs):
        virt = alloc.alloc(-(-len(tokens) // PS) * PS)
        if virt is None:
            raise RuntimeError("device pool full")
        rows.req_to_token[0, : len(virt)] = virt.to(rows.req_to_token.dtype)
        for buf, sub in bufs:  # slot of token j holds the id of tokens[: j + 1]
            for j, s in enumerate(kv._virt_tokens_to_phys_tokens(virt, sub).tolist()[: len(tokens)]):
                if s >= 0:
                    buf[s].view(-1)[0] = ids.setdefault(tuple(tokens[: j + 1]), len(ids) + 1)
        req = _Req(f"r{i}", 0, list(tokens))
        reqs.append(req)
        if not m.offload_kv_cache(req):
            raise RuntimeError(f"offload of {tokens} declined")
        for _ in range(5000):
            m.check_offload_progress()
            if not m.ongoing_offload and not m.ongoing_backup:
                break
            time.sleep(0.001)
        else:
            raise RuntimeError("offload never acknowledged")
        alloc.free(virt)
    prefix_of = {v: k for k, v in ids.items()}
    wrong = []
    for req, tokens in zip(reqs, runs, strict=True):
        for p, h in enumerate(m._compute_prefix_hash(req, tokens[: len(tokens) // PS * PS])):
            want = tuple(tokens[: (p + 1) * PS])
            for pool, suffix in (("KV", ""), ("SWA", ".swa")):
                path = os.path.join(l3, f"{h}{suffix}__0_1.bin")
                if not os.path.exists(path):
                    wrong.append(f"{pool} page {want}: not in L3")
                    continue
                data = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.bfloat16)
                # layer-first page: [K/V, layer, token, head, dim]; the last token's K leads its row
                got = prefix_of.get(int(data[(PS - 1) * data.numel() // (2 * PS)].item()))
                if got != want:
                    wrong.append(f"{pool} page {want}: L3 holds {got}")
    return wrong


def search(budget_s: float, seed: int = 0) -> dict:
    """A property search over this path, for a bug only it can show (seed #23427): Hypothesis draws
    sequences of finished requests (1-4 token runs over a 3-token alphabet, 2-12 tokens each, what
    the 16-slot device pool always takes), offloads them one after another and reads every stored page back. The
    judge is the spec's rule for a storage tier, with the expected bytes from the tokens alone: the
    page the manager stored under a prefix's key holds that prefix, KV and SWA alike. Slices of 50
    examples with fresh seeds until `budget_s`; a failure is shrunk by Hypothesis. Returns {caught,
    seconds, examples, operations (requests in the minimized sequence), check, calls (its runs)}."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis import strategies as st

    requests = st.lists(st.lists(st.integers(1, 3), min_size=2, max_size=12), min_size=1, max_size=4)
    state: dict = {"examples": 0, "last": None}

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests)
    def offloaded_pages_hold_their_prefix(runs):
        state["examples"] += 1
        wrong = offload_and_read_back(runs)
        if wrong:
            state["last"] = (runs, wrong)
            raise AssertionError(wrong[0])

    start, i = time.monotonic(), 0
    while time.monotonic() - start < budget_s and state["last"] is None:
        try:
            hyp_seed(seed * 100_003 + i)(offloaded_pages_hold_their_prefix)()
        except AssertionError:
            pass
        i += 1
    runs, wrong = state["last"] or (None, None)
    return {"caught": runs is not None, "seconds": round(time.monotonic() - start, 2), "examples": state["examples"],
            "operations": len(runs) if runs else None, "check": wrong[0] if wrong else None, "calls": runs,
            "wrong_pages": len(wrong) if wrong else 0}
