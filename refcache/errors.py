"""Errors raised by refcache.

Every public operation either succeeds or raises one of these and leaves the cache unchanged,
so callers can catch `RefCacheError` and carry on with a consistent cache.
"""


class RefCacheError(Exception):
    """Base class of every error refcache raises on purpose."""


class ConfigError(RefCacheError, ValueError):
    """The cache configuration is inconsistent (e.g. a pool smaller than one page)."""


class InvalidKeyError(RefCacheError, ValueError):
    """Token keys are not a whole number of pages, empty, or not integers."""


class InvalidIndicesError(RefCacheError, ValueError):
    """Slot indices have the wrong dtype, device, length or alignment, or are not owned by the caller."""


class UnknownNodeError(RefCacheError, KeyError):
    """The node is not (or no longer) attached to this cache's tree."""


class LockError(RefCacheError, RuntimeError):
    """Unlock of a node that is not locked."""


class InvalidAnchorError(RefCacheError, ValueError):
    """A load-back or prefetch anchor that cannot serve (no data, or a tombstone for a component)."""


class PoolExhaustedError(RefCacheError, MemoryError):
    """A pool cannot supply the requested slots even after every allowed eviction."""


class ComponentError(RefCacheError, ValueError):
    """A component argument is missing, unexpected, or not enabled in this cache."""


class UnknownOperationError(RefCacheError, KeyError):
    """An operation or request id that the cache does not know (or no longer tracks)."""
