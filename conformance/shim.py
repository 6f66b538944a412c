"""Moved to `conformance.targets.sglang.shim`; this name is the same module (kept for old imports)."""

import sys

from .targets.sglang import shim as _shim

sys.modules[__name__] = _shim
