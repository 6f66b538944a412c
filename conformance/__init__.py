"""Conformance: the stateful suite run against other caches (SGLang's) through one target interface.

`run_target(name, budget_s, seed)` runs the conformance machine against one target for a time
budget; `target_names()` / `TARGETS` name them. SGLang targets need their sglang version
installed (`python -m conformance.install`); see `conformance.shim`.
"""

from __future__ import annotations

__all__ = ["TARGETS", "available_targets", "run_target", "target_names"]


def __getattr__(name: str):
    if name in __all__:  # lazily, so `python -m conformance.runner` does not import itself twice
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
