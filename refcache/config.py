"""Cache configuration: geometry, pool sizes, policies, components, device."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .errors import ConfigError


class WritePolicy(str, enum.Enum):
    """When device KV is copied to the host tier."""

    WRITE_THROUGH = "write_through"  # back up every node as it is inserted
    WRITE_THROUGH_SELECTIVE = "write_through_selective"  # back up after `backup_after_hits` hits
    WRITE_BACK = "write_back"  # back up only when evicting


class PrefetchPolicy(str, enum.Enum):
    """When a request waiting on an L3 prefetch may stop waiting."""

    BEST_EFFORT = "best_effort"  # at once, with whatever has arrived
    WAIT_COMPLETE = "wait_complete"  # when every page and every pool transfer is done
    TIMEOUT = "timeout"  # when done, or once the deadline has passed


COMPONENTS = ("full", "mamba", "swa")


@dataclass(frozen=True)
class CacheConfig:
    """Everything that shapes a cache. Sizes are in tokens (KV) or slots (mamba states)."""

    page_size: int = 4
    device_tokens: int = 64
    host_tokens: int = 128
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 8
    dtype: torch.dtype = torch.float16
    components: tuple[str, ...] = ("full",)
    write_policy: WritePolicy = WritePolicy.WRITE_THROUGH
    backup_after_hits: int = 2
    device_mamba_slots: int = 8
    host_mamba_slots: int = 16
    mamba_state_dim: int = 16
    swa_window: int = 8
    device: str = "cpu"
    prefetch_policy: PrefetchPolicy = PrefetchPolicy.BEST_EFFORT
    prefetch_threshold: int = 4
    prefetch_timeout_steps: int = 8
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "write_policy", WritePolicy(self.write_policy))
        object.__setattr__(self, "prefetch_policy", PrefetchPolicy(self.prefetch_policy))
        object.__setattr__(self, "components", tuple(self.components))
        p = self.page_size
        if p <= 0:
            raise ConfigError(f"page_size must be positive, got {p}")
        for name in ("device_tokens", "host_tokens"):
            v = getattr(self, name)
            if v < p or v % p:
                raise ConfigError(f"{name}={v} must be a positive multiple of page_size={p}")
        if self.components[:1] != ("full",) or len(set(self.components)) != len(self.components):
            raise ConfigError(f"components must start with 'full' and not repeat: {self.components}")
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise ConfigError(f"unknown components {sorted(unknown)}; known: {COMPONENTS}")
        if self.has("mamba") and self.has("swa"):
            raise ConfigError("a cache holds full plus at most one of mamba or swa")
        for name in ("num_layers", "num_heads", "head_dim", "device_mamba_slots",
                     "host_mamba_slots", "mamba_state_dim", "backup_after_hits"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.swa_window <= 0 or self.swa_window % p:
            raise ConfigError(f"swa_window={self.swa_window} must be a positive multiple of page_size")
        if self.prefetch_threshold < 0 or self.prefetch_timeout_steps < 0:
            raise ConfigError("prefetch_threshold and prefetch_timeout_steps must be >= 0")
        if not self.dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating type, got {self.dtype}")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available")
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device}")

    def has(self, component: str) -> bool:
        """Whether `component` is configured."""
        return component in self.components

    @property
    def sidecar(self) -> str | None:
        """The one component besides full (mamba or swa), if any."""
        return self.components[1] if len(self.components) > 1 else None

    @property
    def torch_device(self) -> torch.device:
        dev = torch.device(self.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
