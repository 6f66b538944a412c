"""Moved to `conformance.targets.refcache.adapter`; this name is the same module (kept for old imports)."""

import sys

from .targets.refcache import adapter as _adapter

sys.modules[__name__] = _adapter
