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


class StorageError(RefCacheError):
    """L3 storage misuse: a page of the wrong shape or dtype, a bad hash, or the result of a
    storage operation asked for before it completed."""


class StorageIOError(StorageError, OSError):
    """An L3 read or write failed at the I/O level: the page is unavailable (a miss for the
    cache), never wrong data."""
