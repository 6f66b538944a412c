"""Import vLLM 0.33.0's scheduler-side cache modules on a plain CPU machine.

Why a shim: the `vllm` wheel pins CUDA builds of torch and dozens of serving packages, and its
top-level `__init__` (and `vllm.distributed`'s) import the engine, the model executor and
NCCL bindings. The prefix cache (`vllm.v1.core`: block pool, KV cache manager, coordinators)
and the CPU offloading manager (`vllm.v1.kv_offload`) are pure Python over those names. So,
with vLLM installed `--no-deps` into its own directory (`install.py` here):

1. `vllm` and `vllm.distributed` are hollow packages: their folders, without their `__init__`;
2. vLLM subpackages the caches only name (configs, the model executor, the engine's request
   plumbing, multimodal, sampling/pooling params, metrics exporters) are stand-ins;
3. third-party modules a vLLM file imports that are not installed (zmq, cbor2, xxhash, regex,
   prometheus_client, platform probes) are stand-ins, for vLLM files only.

Real packages needed: torch, numpy, msgspec, typing_extensions. A stand-in is handed only to
imports made by vLLM's files (or for the vLLM subpackages listed), so anything else that is
missing still fails as usual. Block hashes use vLLM's own `sha256` (pickle + hashlib), which
needs none of the stand-ins.

Where it lives: `$REFCACHE_VLLM_HOME/0.33.0` (default `~/.cache/refcache/vllm/0.33.0`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

from ..installing import engine_home

VERSION = "0.33.0"
HOME_ENV = "REFCACHE_VLLM_HOME"
REAL_DEPS = ("torch", "numpy", "msgspec", "typing_extensions")
HOLLOW = ("vllm", "vllm.distributed")
STANDINS = (
    "vllm.config", "vllm.model_executor", "vllm.forward_context", "vllm.v1.worker",
    "vllm.distributed.parallel_state", "vllm.v1.engine", "vllm.compilation", "vllm.v1.metrics.perf",
    "vllm.v1.spec_decode", "vllm.v1.structured_output", "vllm.multimodal", "vllm.pooling_params",
    "vllm.sampling_params", "vllm.outputs", "vllm.lora",
)
# The modules the targets use; `load` imports them so a broken install fails at once, with its name.
MODULES = (
    "vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.core.kv_cache_manager",
    "vllm.v1.kv_cache_interface", "vllm.v1.request", "vllm.utils.hashing",
    "vllm.v1.kv_offload.base", "vllm.v1.kv_offload.cpu.manager",
    "vllm.v1.kv_offload.cpu.policies.lru", "vllm.v1.kv_offload.cpu.policies.arc",
)


class ShimError(RuntimeError):
    """vLLM cannot be loaded here: not installed, another version, or a real dependency missing."""


def home() -> Path:
    return engine_home(HOME_ENV, "vllm")


def locate() -> Path | None:
    """The directory holding vLLM 0.33.0's `vllm` package, or None."""
    d = home() / VERSION
    if (d / "vllm" / "v1" / "core" / "block_pool.py").is_file() and (d / f"vllm-{VERSION}.dist-info").is_dir():
        return d
    return None


def missing_reason() -> str:
    """'' when vLLM can be loaded in this process, else one sentence on why not."""
    if locate() is None:
        return (f"vllm {VERSION} is needed at {home() / VERSION} (it is not installed); run "
                f"`python -m conformance.targets.vllm.install` (or set {HOME_ENV})")
    for mod in REAL_DEPS:
        if importlib.util.find_spec(mod) is None and not (home() / "deps" / mod).exists():
            return f"vllm {VERSION} needs the package {mod!r}: python -m conformance.targets.vllm.install"
    if "vllm" in sys.modules and not getattr(sys.modules["vllm"], "__refcache_shim__", False):
        return "a real `vllm` package is already imported in this process; the shim cannot load beside it"
    return ""


# ---------------------------------------------------------------------------- stand-ins
class _Any:
    """Any attribute of a stand-in module: callable, subscriptable, a base class, false, empty."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return a[0] if len(a) == 1 and not k and callable(a[0]) else _Any()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any()

    def __mro_entries__(self, bases):
        return (_AnyBase,)

    def __getitem__(self, item):
        return _Any()

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __len__(self):
        return 0

    def __or__(self, other):
        return _Any()

    __ror__ = __or__

    def __instancecheck__(self, obj) -> bool:
        return isinstance(obj, (_Any, _AnyBase))


class _AnyBase:
    def __init_subclass__(cls, **kw):
        pass

    def __init__(self, *a, **k):
        pass


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any()


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        m = _StandIn(spec.name)
        m.__path__ = []
        m.__refcache_standin__ = True
        return m

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    """front: the vLLM subpackages in STANDINS; back: whatever a vLLM file imports that the real
    finders did not find (third-party packages vLLM's full install would have brought)."""

    def __init__(self, root: str, front: bool, record: set):
        self.root, self.front, self.record = root, front, record

    def find_spec(self, name, path=None, target=None):
        if self.front:
            if not any(name == p or name.startswith(p + ".") for p in STANDINS):
                return None
        elif name.split(".")[0] == "vllm" or not self._from_vllm():
            return None
        self.record.add(name)
        return importlib.machinery.ModuleSpec(name, _Loader(), is_package=True)

    def _from_vllm(self) -> bool:
        f = sys._getframe(2)
        while f is not None and (f.f_code.co_filename.startswith("<frozen") or "importlib" in f.f_code.co_filename):
            f = f.f_back
        return f is not None and f.f_code.co_filename.startswith(self.root)


_STUBBED: set = set()
_ROOT: Path | None = None


def stubbed() -> set:
    """Module names this process was handed stand-ins for."""
    return set(_STUBBED)


def load() -> Path:
    """Make vLLM 0.33.0's cache modules importable in this process (once); returns its root.

    Raises ShimError with one clear sentence when it cannot."""
    global _ROOT
    if _ROOT is not None:
        return _ROOT
    why = missing_reason()
    if why:
        raise ShimError(why)
    root = locate()
    assert root is not None
    import numpy  # noqa: F401  (real packages first: their optional probes must not meet a stand-in)
    import torch  # noqa: F401

    deps = home() / "deps"
    if deps.is_dir() and str(deps) not in sys.path:
        sys.path.append(str(deps))
    sys.path.insert(0, str(root))
    for name in HOLLOW:
        m = types.ModuleType(name)
        m.__path__ = [str(root.joinpath(*name.split(".")))]
        m.__file__ = os.path.join(m.__path__[0], "__init__.py")
        m.__refcache_shim__ = True
        if name == "vllm":
            m.__version__ = VERSION
        sys.modules[name] = m
    sys.meta_path.insert(0, _Finder(str(root / "vllm"), True, _STUBBED))
    sys.meta_path.append(_Finder(str(root / "vllm"), False, _STUBBED))
    _ROOT = root
    try:
        for mod in MODULES:
            importlib.import_module(mod)
    except Exception as e:
        raise ShimError(f"vllm {VERSION} at {root} did not import through the shim: {type(e).__name__}: {e}") from e
    return root
