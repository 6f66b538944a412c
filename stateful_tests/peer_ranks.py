"""A simulated second TP rank, in process: its local view is what the test says it is.

Real ranks reach agreement through collectives (`refcache.tp`); in a single-process machine the
other rank's side of each collective is scripted instead, so the machine can make the ranks'
local views differ (a peer whose storage holds fewer pages, a peer still waiting on its own
transfers, a peer whose timeout already fired) and check that this rank acts on the agreed value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from refcache.tp import RankGroup


@dataclass
class PeerView:
    """The other rank's local view: tokens its storage can supply (None: as many as ours), whether
    it may stop waiting for a prefetch, and whether it already stopped (e.g. its timeout fired)."""

    hit_cap: int | None = None
    ready: bool = True
    terminated: bool = False

    def agrees(self) -> bool:
        return self.hit_cap is None and self.ready and not self.terminated


class PeerRanks(RankGroup):
    """Two ranks: this one, and a peer whose side of every collective comes from `view`.
    The collectives this rank issues are the ones `refcache.tp` defines: all_min([hit length]) and
    all_max([not ready, terminated])."""

    world_size = 2
    rank = 0

    def __init__(self) -> None:
        self.view = PeerView()
        self.disagreements = 0  # collectives whose result differed from this rank's local value

    def _peer(self, values: Sequence[int]) -> list[int]:
        if len(values) == 1:  # hit length
            return [values[0] if self.view.hit_cap is None else self.view.hit_cap]
        return [int(not self.view.ready), int(self.view.terminated)]

    def all_max(self, values: Sequence[int]) -> list[int]:
        out = [max(int(a), b) for a, b in zip(values, self._peer(values), strict=True)]
        self.disagreements += out != [int(v) for v in values]
        return out

    def all_min(self, values: Sequence[int]) -> list[int]:
        out = [min(int(a), b) for a, b in zip(values, self._peer(values), strict=True)]
        self.disagreements += out != [int(v) for v in values]
        return out
