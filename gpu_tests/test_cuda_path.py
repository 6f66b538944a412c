"""The cache on CUDA with the CUDA executor: real streams and events, pinned host memory."""

import pytest
import torch

from campaign.random_walk import CONFIGS, run_walk, small_config
from refcache import CacheConfig, CudaExecutor, HiCache
from refcache.data import pages_ok, write_request

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _drain(cache):
    torch.cuda.synchronize()
    return cache.poll()


def test_host_pool_is_pinned_and_device_pool_on_cuda():
    """L2 is pinned host memory, L1 lives on the GPU."""
    c = HiCache(CacheConfig(device="cuda"))
    assert c.host_kv.data.is_pinned() and c.device_kv.data.is_cuda
    assert isinstance(c.executor, CudaExecutor)


def test_backup_evict_load_roundtrip_on_cuda():
    """Backup through the copy stream, demote, load back: the bytes survive the round trip."""
    c = HiCache(CacheConfig(device="cuda", page_size=4, device_tokens=64, host_tokens=64))
    toks = list(range(32))
    idx, _ = write_request(c, toks)
    c.insert(toks, idx)
    assert len(_drain(c)) == 1
    assert c.evict(10**6) == 32
    m = c.match_prefix(toks)
    assert m.device_len == 0 and m.host_hit_length == 32
    c.load_back(m.best_match_node)
    _drain(c)
    m = c.match_prefix(toks)
    assert m.device_len == 32 and pages_ok(c, toks, m.device_indices)
    assert c.check_invariants(check_data=True) == []


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_walk_on_cuda_executor(name):
    """Random walks where the GPU decides when copies finish (polled)."""
    res = run_walk(small_config(name, "cuda"), 0, 300, manual_executor=False)
    assert res.violations == [], "\n".join(map(str, res.violations)) + "\n" + "\n".join(res.log[-15:])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_walk_on_cuda_manual_order(name):
    """Random walks on CUDA pools with the test choosing the completion order."""
    res = run_walk(small_config(name, "cuda"), 1, 300, manual_executor=True)
    assert res.violations == [], "\n".join(map(str, res.violations)) + "\n" + "\n".join(res.log[-15:])
