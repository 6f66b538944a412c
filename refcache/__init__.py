"""refcache: a reference hierarchical prefix cache for LLM serving (see DESIGN.md)."""

from .cache import HiCache, InsertResult, MatchResult
from .config import CacheConfig, PrefetchPolicy, WritePolicy
from .errors import (
                     ComponentError,
                     ConfigError,
                     InvalidAnchorError,
                     InvalidIndicesError,
                     InvalidKeyError,
                     LockError,
                     PoolExhaustedError,
                     RefCacheError,
                     UnknownNodeError,
                     UnknownOperationError,
)
from .invariants import CHECKS, Violation, check_all
from .node import TreeNode
from .transfer import CudaExecutor, DeterministicExecutor, Executor, Operation, OpKind, OpState, PoolTransfer

__all__ = [
    "CHECKS", "CacheConfig", "ComponentError", "ConfigError", "CudaExecutor",
    "DeterministicExecutor", "Executor", "HiCache", "InsertResult", "InvalidAnchorError",
    "InvalidIndicesError", "InvalidKeyError", "LockError", "MatchResult", "OpKind", "OpState",
    "Operation", "PoolExhaustedError", "PoolTransfer", "PrefetchPolicy", "RefCacheError",
    "TreeNode", "UnknownNodeError", "UnknownOperationError", "Violation", "WritePolicy",
    "check_all",
]
