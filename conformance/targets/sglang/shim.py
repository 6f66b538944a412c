"""Import SGLang's `mem_cache` modules on a plain CPU machine, for the pinned versions only.

Why a shim: `sglang` from PyPI pins CUDA-only packages, and `import sglang` runs a top-level
`__init__` that pulls transformers and dozens more. Installed with `--no-deps` (see
`conformance.install`), its cache modules import once (1) the top-level `__init__` is bypassed,
(2) a few heavy sglang subpackages that the caches only name (model configs, layers, the
scheduler) are replaced by stand-ins, and (3) third-party modules that sglang files import but
that are absent are replaced by stand-ins. Real packages needed: torch, numpy, msgspec, dill, and
psutil for the host tier (the `sglang` extra); triton is used when present and stood in for when not (CPU runs never reach
it). A stand-in is only ever handed to an import made by an sglang file; everything else sees
the real import system, so a missing package used by torch still fails.

One process holds one sglang version (they share module names); `load(v)` refuses a second.
Where each version lives: `$REFCACHE_SGLANG_HOME/<version>` (default
`~/.cache/refcache/sglang/<version>`), filled by `python -m conformance.install`; or an
`sglang` distribution installed in the environment at a supported version.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from ..installing import engine_home

HOME_ENV = "REFCACHE_SGLANG_HOME"
# Set where an install was trimmed to the modules the caches use (a copy carried to a machine with no
# package index): sglang modules missing from it are stood in for too, and listed in `stubbed`.
TRIMMED_ENV = "REFCACHE_SGLANG_TRIMMED"

# sglang subpackages the caches import but do not use on the paths the adapters drive.
_COMMON_STUBS = (
    "sglang.srt.utils.hf_transformers", "sglang.srt.utils.hf_transformers_utils",
    "sglang.srt.layers", "sglang.srt.configs", "sglang.srt.managers", "sglang.srt.parser",
    "sglang.srt.function_call", "sglang.srt.model_executor", "sglang.srt.entrypoints",
    "sglang.srt.models", "sglang.srt.lora", "sglang.srt.multimodal", "sglang.srt.speculative",
)
# Third-party packages an sglang file always gets a stand-in for, installed or not: where they are
# installed (a GPU image with transformers), sglang's model-registry code would run against them.
FORCED = ("transformers", "huggingface_hub", "safetensors", "tokenizers", "torchvision", "torchaudio",
          "flashinfer", "sgl_kernel.flash_attn")
SUPPORTED: dict[str, tuple[str, ...]] = {
    "0.5.23": _COMMON_STUBS,
    "0.5.17": _COMMON_STUBS,
}


class ShimError(RuntimeError):
    """sglang cannot be loaded: not installed, an unsupported version, or another version loaded."""


def home() -> Path:
    """Where `conformance.install` puts each version (one `pip --target` directory per version)."""
    return engine_home(HOME_ENV, "sglang")


def _dist_version(root: Path) -> str | None:
    for d in root.glob("sglang-*.dist-info"):
        return d.name[len("sglang-"):-len(".dist-info")]
    return None


def locate(version: str) -> Path | None:
    """The directory holding the `sglang` package of `version`, or None when it is not installed."""
    d = home() / version
    if (d / "sglang").is_dir() and _dist_version(d) == version:
        return d
    try:
        if importlib.metadata.version("sglang") == version:
            spec = importlib.machinery.PathFinder.find_spec("sglang")
            if spec and spec.submodule_search_locations:
                return Path(list(spec.submodule_search_locations)[0]).parent
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def available(version: str) -> bool:
    return version in SUPPORTED and locate(version) is not None


def missing_reason(version: str) -> str:
    """One clear sentence on why `version` cannot be loaded ('' when it can)."""
    if version not in SUPPORTED:
        return f"sglang {version} is not supported by the conformance shim (supported: {', '.join(SUPPORTED)})"
    if locate(version) is None:
        found = _dist_version(home() / version) if (home() / version).is_dir() else None
        what = f"found sglang {found} there instead" if found else "it is not installed"
        return (f"sglang {version} is needed at {home() / version} ({what}); "
                f"run `python -m conformance.install` (or set {HOME_ENV})")
    for mod in ("torch", "numpy", "msgspec", "dill"):
        if importlib.util.find_spec(mod) is None and not _in_deps(mod):
            return f"sglang {version} needs the package {mod!r}: pip install -e '.[sglang]'"
    return ""


def _in_deps(mod: str) -> bool:
    return (home() / "deps" / mod).exists()


# ------------------------------------------------------------------------- stand-ins
class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stub()

    def __getitem__(cls, item):
        return cls

    def __or__(cls, other):
        return cls

    __ror__ = __or__


class StubBase(metaclass=_StubMeta):
    """What a class deriving from a stand-in derives from: accepts any arguments."""

    def __init_subclass__(cls, **kw):
        pass

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stub()


class Stub:
    """Any attribute of a stand-in module: callable, subscriptable, false, empty; a decorator
    applied to a function returns the function."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        if len(a) == 1 and not k and callable(a[0]):
            return a[0]
        return Stub()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stub()

    def __mro_entries__(self, bases):
        return (StubBase,)

    def __instancecheck__(self, obj) -> bool:  # `isinstance(x, <stand-in class>)`: x came from a stand-in
        return isinstance(obj, (Stub, StubBase))

    def __subclasscheck__(self, cls) -> bool:
        return isinstance(cls, type) and issubclass(cls, StubBase)

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False

    def __len__(self):
        return 0

    def __contains__(self, item):
        return False

    def __getitem__(self, item):
        return Stub()

    def __setitem__(self, key, value):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __or__(self, other):
        return Stub()

    __ror__ = __or__


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Stub()


class _NoDriver:
    """triton.runtime without triton: probing for a GPU driver fails the way it does with no GPU."""

    def __getattr__(self, name):
        raise RuntimeError("triton is not installed (conformance shim stand-in)")


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = list(spec.submodule_search_locations or [])
        m.__conformance_stub__ = True
        if spec.name in ("triton.runtime", "triton.runtime.driver"):
            m.driver = m.active = _NoDriver()
        elif spec.name == "triton":
            m.runtime = _StubModule("triton.runtime")
            m.runtime.driver = _NoDriver()
        return m

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    """front=True: sglang subpackages in `internal` (before the real finders), except those in
    `real`; front=False: anything an sglang file imports that the real finders did not find."""

    def __init__(self, root: Path, internal: tuple[str, ...], front: bool, record: set, real: tuple[str, ...] = ()):
        self.root, self.internal, self.front, self.record, self.real = str(root), internal, front, record, real

    def find_spec(self, name, path=None, target=None):
        if self.front:
            forced = any(name == p or name.startswith(p + ".") for p in FORCED) and self._from_sglang()
            if not forced and not any(name == p or name.startswith(p + ".") for p in self.internal):
                return None
            if not forced and any(name == r or name.startswith(r + ".") for r in self.real):
                return None
        else:
            if not self._from_sglang():
                return None
            if name.split(".")[0] == "sglang" and not os.environ.get(TRIMMED_ENV):
                return None
        self.record.add(name)
        spec = importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)
        if self.front and name.startswith("sglang."):  # a stand-in package keeps its real folder (for `real`)
            folder = Path(self.root).parent.joinpath(*name.split("."))
            spec.submodule_search_locations = [str(folder)] if folder.is_dir() else []
        return spec

    def _from_sglang(self) -> bool:
        f = sys._getframe(2)
        while f is not None and (f.f_code.co_filename.startswith("<frozen") or "importlib" in f.f_code.co_filename):
            f = f.f_back
        return f is not None and f.f_code.co_filename.startswith(self.root)


@dataclass
class Loaded:
    version: str
    root: Path
    stubbed: set


_LOADED: Loaded | None = None


def loaded() -> Loaded | None:
    """The sglang version this process has loaded, if any."""
    return _LOADED


def load(version: str, real: tuple[str, ...] = ()) -> Loaded:
    """Make `sglang` (of `version`) importable in this process without its top-level `__init__`.
    `real`: sglang modules to import for real although their package is stood in for.

    Raises ShimError (one message) when the version is unsupported or not installed, or when
    another version is already loaded in this process."""
    global _LOADED
    if version not in SUPPORTED:
        raise ShimError(missing_reason(version))
    if _LOADED is not None:
        if _LOADED.version == version:
            _make_real(real)
            return _LOADED
        raise ShimError(f"sglang {_LOADED.version} is already loaded in this process; "
                        f"sglang {version} needs its own process")
    reason = missing_reason(version)
    if reason:
        raise ShimError(reason)
    root = locate(version)
    if "sglang" in sys.modules:
        raise ShimError("an `sglang` module was imported before the conformance shim; load it through the shim only")
    import numpy  # noqa: F401  (real packages first: their optional probes must not meet a stand-in)
    import torch  # noqa: F401

    deps = home() / "deps"
    if deps.is_dir() and str(deps) not in sys.path:
        sys.path.append(str(deps))  # after the environment's own packages
    if importlib.util.find_spec("triton") is None:
        # torch probes for triton when its compiler stack is first imported (sglang files decorate
        # with torch.compile): let it see the truth before sglang's own `import triton` meets a stand-in.
        import torch._dynamo  # noqa: F401
        import torch._inductor.runtime.hints  # noqa: F401

    _load_sgl_kernel_copies()
    sys.path.insert(0, str(root))
    pkg = types.ModuleType("sglang")
    pkg.__path__ = [str(root / "sglang")]
    pkg.__file__ = str(root / "sglang" / "__init__.py")
    pkg.__version__ = version
    sys.modules["sglang"] = pkg
    stubbed: set = set()
    sys.meta_path.insert(0, _Finder(root / "sglang", SUPPORTED[version], True, stubbed, tuple(real)))
    sys.meta_path.append(_Finder(root / "sglang", SUPPORTED[version], False, stubbed))
    os.environ.setdefault("SGLANG_RUST_BUILD_MODE", "never")  # never compile the Rust core at import
    _LOADED = Loaded(version, root, stubbed)
    return _LOADED


def _make_real(real: tuple[str, ...]) -> None:
    """A later load of the same version asks for more real modules: fine while none of them has
    been imported yet (as a stand-in); otherwise this process cannot give it them."""
    finder = next(f for f in sys.meta_path if isinstance(f, _Finder) and f.front)
    extra = [r for r in real if r not in finder.real]
    late = [m for m in sys.modules if any(m == r or m.startswith(r + ".") for r in extra)]
    if late:
        raise ShimError(f"sglang modules {late} were already imported as stand-ins in this process; "
                        f"a target needing them real needs its own process")
    finder.real = finder.real + tuple(extra)


def _load_sgl_kernel_copies() -> None:
    """With CUDA and no `sgl_kernel` package, but `<home>/sgl_kernel/` holding its `kvcacheio.py` and
    `sm90|sm100/common_ops*.so` (from the sglang-kernel wheel): register those real copy kernels
    without the package's `__init__` (which loads every other kernel library of a 383 MB wheel)."""
    import torch

    d = home() / "sgl_kernel"
    if not torch.cuda.is_available() or importlib.util.find_spec("sgl_kernel") is not None or not d.is_dir():
        return
    major, minor = torch.cuda.get_device_capability()
    libs = sorted((d / ("sm90" if (major, minor) == (9, 0) else "sm100")).glob("common_ops*.so"))
    if not libs:
        return
    torch.ops.load_library(str(libs[0]))
    pkg = _StubModule("sgl_kernel")  # its other kernels: stand-ins; kvcacheio: the real file
    pkg.__path__ = [str(d)]
    sys.modules["sgl_kernel"] = pkg


def require(version: str, *modules: str) -> list[types.ModuleType]:
    """load(version), then import `modules` (dotted names under sglang)."""
    load(version)
    return [importlib.import_module(m) for m in modules]
