"""Shared pytest fixtures: caches on the device chosen by REFCACHE_DEVICE, checked after each test."""

from __future__ import annotations

import os

import pytest
import torch

from refcache import CacheConfig, DeterministicExecutor, HiCache

DEVICE = os.environ.get("REFCACHE_DEVICE", "cpu")


def test_device() -> str:
    """Device the suite runs the cache on: REFCACHE_DEVICE (cpu by default)."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("REFCACHE_DEVICE=cuda but CUDA is not available")
    return DEVICE


test_device.__test__ = False  # not a test, despite its name


@pytest.fixture
def make_cache():
    """Factory for caches with a manual deterministic executor (CPU) unless one is given.

    After the test, every cache it made must pass every invariant, data included."""
    made: list[HiCache] = []

    def factory(executor=None, **overrides) -> HiCache:
        cfg = CacheConfig(**{"device": test_device(), **overrides})
        if executor is None:
            executor = DeterministicExecutor(copy_device=cfg.device)
        cache = HiCache(cfg, executor=executor)
        made.append(cache)
        return cache

    yield factory
    for cache in made:
        violations = cache.check_invariants(check_data=True)
        assert violations == [], "invariants broken at the end of the test:\n" + "\n".join(map(str, violations))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed stateful test leaves a report (steps, trees, a standalone repro) under
    reports/failures/ (or REFCACHE_FAILURE_REPORTS), named after the test."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed or call.excinfo is None:
        return
    exc = call.excinfo.value
    if not any(str(n).startswith("state = ") for n in getattr(exc, "__notes__", [])):
        return
    from pathlib import Path

    from campaign.report import report_from_exception

    out = Path(os.environ.get("REFCACHE_FAILURE_REPORTS", "reports/failures"))
    stem = "".join(c if c.isalnum() else "_" for c in item.name)[:80]
    try:
        files = report_from_exception(exc, out, stem)
    except Exception as e:  # noqa: BLE001 - a report that cannot be written must not hide the failure
        rep.sections.append(("refcache failure report", f"could not write the report: {e!r}"))
        return
    if files:
        rep.sections.append(("refcache failure report", "\n".join(f"{k}: {v}" for k, v in files.items())))
