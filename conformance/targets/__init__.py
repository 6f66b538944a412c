"""Conformance targets, one folder per engine (`refcache/`, `sglang/`, ...), sharing one machine
(`conformance.machine`) and one target interface (`conformance.target`).

Each engine package exposes `TARGETS: dict[str, TargetSpec]`; `conformance.runner` merges them.
A spec names its adapter by import path, so listing targets imports no engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TargetSpec:
    """How to build one target and what it needs.

    factory: "package.module:callable" returning a `conformance.target.Target` (called with `args`).
    sglang: the sglang version it needs (its process loads that version; another runs in a child).
    requires: optional "package.module:function" returning '' when the target can run here, else
    why not (one sentence), for engines other than sglang.
    machine: optional "package.module:Class", a subclass of `conformance.machine.ConformanceMachine`
    with more rules (e.g. `conformance.machine_storage:StorageMachine`); default the one machine."""

    factory: str
    sglang: str | None = None
    what: str = ""
    page_size: int = 2
    args: tuple = ()
    requires: str | None = None
    machine: str | None = None

    def resolve(self) -> Callable:
        mod, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(mod), attr)
