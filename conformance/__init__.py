"""Conformance: the stateful suite run against other prefix caches through one target interface.

Public, stable API (what an adapter for your own cache imports; see docs/adapter.md):

- `Target`: the interface an adapter implements; `TargetInfo`: what the target supports;
  `Match` / `Inserted`: what `match` / `insert` return; `TargetError`: an operation the
  caller may legitimately see refused (a pool exhausted); `SlotBook`: a KV slot allocator that
  records what every slot holds, for the data (D1) and slot-accounting (R1) checks;
  `CORE_OPS`: the operations every target supports.
- `check_target(factory, budget_s)`: run the conformance machine against a target for a time
  budget and get the minimized failure, if any; the pytest plugin
  (`pytest --refcache-target mypkg.adapter:make_target`) is a thin wrapper around it.

Stability: within 0.x these names keep their meaning; fields and methods may be added, with
defaults, but none removed or redefined without a release note. Everything else in this package
(the machine's rules, the runner, `conformance.targets`) is internal and may change.

Internal entry points for this repository: `run_target(name, budget_s, seed)` runs the machine
against one of the built-in targets (refcache, SGLang's caches); `target_names()` / `TARGETS`
name them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .check import CheckResult, check_target, replay_operations
    from .target import CORE_OPS, Inserted, Match, SlotBook, Target, TargetError, TargetInfo

__all__ = [
    # the public adapter API (stable)
    "CORE_OPS", "CheckResult", "Inserted", "Match", "SlotBook", "Target", "TargetError", "TargetInfo",
    "check_target", "replay_operations",
    # this repository's own targets (internal)
    "TARGETS", "available_targets", "run_target", "target_names",
]
_CHECK = ("CheckResult", "check_target", "replay_operations")
_RUNNER = ("TARGETS", "available_targets", "run_target", "target_names")


def __getattr__(name: str):
    # Lazily: the pytest plugin imports this package in every pytest run, and the target module
    # needs torch; `python -m conformance.runner` must not import itself twice either.
    if name in _CHECK:
        from . import check

        return getattr(check, name)
    if name in __all__ and name not in _RUNNER:
        from . import target

        return getattr(target, name)
    if name in _RUNNER:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'conformance' has no attribute {name!r}")
