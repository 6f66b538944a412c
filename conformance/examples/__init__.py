"""Worked adapters for `docs/adapter.md`: small caches that are not refcache, run by the same suite."""
