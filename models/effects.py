"""Required effects: what an operation *must* achieve, predicted from the model's own state.

The frame (`models.abstract.frame`) says what a step may change; a cache that does nothing
passes it. These predictions say what must hold after a step (DESIGN §2), each from the model's
state before it and the figures the spec names (pool capacities):
- an allocation succeeds whenever free plus freeable space covers it, and fails only when it
  does not; when even evicting everything unlocked could not cover it, it changes nothing;
- eviction frees what it is asked while anything is freeable (`models.abstract.check_evict`);
- under write-through every inserted page is backed up (or being backed up), and under selective
  write-through every page whose hits reached the threshold, unless L2 truly has no room;
- a load-back starts whenever its anchor's path misses data and nothing is loading it, and once
  acknowledged its anchor is a device match end;
- poll finishes every operation whose parts have all settled (liveness);
- a prefetch that fetched everything, with its state, leaves the state on the prefix it ends.
"""

from __future__ import annotations

from collections.abc import Iterable

from .abstract import Model, Prefix
from .recency import Recency


def freeable_device(m: Model, write_back: bool) -> int:
    """L1 KV tokens eviction can free right now, cascades aside: unlocked device pages whose
    device descendants are all freeable and which may lose their device copy (an L2 copy to demote
    to, or no host reference; under write-back a page without an L2 copy waits for its backup)."""
    ok: dict[Prefix, bool] = {}
    for p in sorted(m.pages, key=len, reverse=True):  # children before parents
        g = m.pages[p]
        if not g.dev:
            continue
        kids = [c for c in m.children(p) if m.pages[c].dev]
        ok[p] = (g.lock == 0 and all(ok[c] for c in kids)
                 and (g.host or (g.host_ref == 0 and not write_back)))
    return m.page_size * sum(ok.values())


def unlocked_device(m: Model) -> int:
    """L1 KV tokens not protected by a lock: the most eviction could ever free."""
    return m.page_size * sum(1 for g in m.pages.values() if g.dev and g.lock == 0)


def alloc_errors(before: Model, n: int, free: int, raised: bool, write_back: bool, changed: list[str]) -> list[str]:
    """alloc_device(n) with `free` L1 tokens free before it; `changed` is what the frame saw change."""
    if not raised:
        return []
    v = []
    room = free + freeable_device(before, write_back)
    if room >= n:
        v.append(f"alloc of {n} tokens failed although {free} were free and {room - free} freeable")
    unlocked = unlocked_device(before)
    if free + unlocked < n and changed:
        v.append(f"alloc of {n} tokens could never succeed ({free} free, {unlocked} unlocked) "
                 f"but evicted before failing: {changed[0]}")
    return v


def host_room(before: Model, free_host: int, keep: Prefix = ()) -> int:
    """L2 tokens a backup can get: free ones plus every host-only page no one references, except
    those on the path of `keep` (an insert takes its host-only pages back onto the device)."""
    return free_host + before.host_evictable_tokens(keep)


def backup_errors(before: Model, after: Model, due: list[Prefix], free_host: int, keep: Prefix = ()) -> list[str]:
    """Every page in `due` (on device, due for backup by policy) has an L2 copy or a backup in
    flight after the step, unless L2 could not hold them all."""
    ps = before.page_size
    busy = before.busy()
    due = [p for p in due if p not in busy and p in after.pages and after.pages[p].dev]
    need = [p for p in due if not (before.pages.get(p) and before.pages[p].host)]
    room = host_room(before, free_host, keep)
    if not need or ps * len(need) > room:
        return []
    backing = {q for op in after.ops.values() if op.kind == "backup" for q in op.pages}
    missing = [p for p in need if not after.pages[p].host and p not in backing]
    return [f"{p}: due for backup by the write policy but neither on L2 nor being backed up, "
            f"with {room} L2 tokens free or evictable" for p in missing[:3]]


def spurious_backups(before: Model, after: Model, may: set) -> list[str]:
    """Backups this step started may only cover pages the write policy made due (`may`)."""
    new = [op for i, op in after.ops.items() if op.kind == "backup" and i not in before.ops]
    return [f"backup op {op.id} of {sorted(op.pages)[-1]} started, but the write policy does not make it due"
            for op in new if not op.pages <= may][:3]


def due_selective(rec: Recency, pages: list[Prefix], threshold: int, certain: bool = True) -> list[Prefix]:
    """Pages of `pages` whose hits certainly (or, with certain=False, possibly) reached the
    selective write-through threshold."""
    return [p for p in pages if (rec.certainly_hit(p, threshold) if certain else rec.possibly_hit(p, threshold))]


def load_needed(m: Model, end: Prefix) -> bool:
    """Whether load_back(end) has something to bring: full KV off device on its path, its mamba
    state, or SWA data within its window."""
    path = [p for p in m.page_prefixes(end) if not m.pages[p].dev]
    if path:
        return True
    if not end:
        return False
    if m.sidecar == "mamba":
        return not m.pages[end].mamba
    if m.sidecar == "swa":
        return any(not m.pages[q].swa for q in window(m, end))
    return False


def window(m: Model, end: Prefix) -> list[Prefix]:
    """The page prefixes within the SWA window ending at `end` (node-granular windows may reach
    further up; the cache only needs these)."""
    ps = m.page_size
    return [end[:k] for k in range(len(end), max(0, len(end) - m.window), -ps)]


def ack_errors(after: Model, acked_loads: list[Prefix]) -> list[str]:
    """An acknowledged load-back leaves its anchor a device match end."""
    return [f"load-back to {p} acknowledged but {p} is not a device match end"
            for p in acked_loads if p in after.pages and not after.valid_end(p, "device")]


def settled_errors(ops) -> list[str]:
    """Poll liveness: no operation whose parts have all settled stays in flight (prefetches that
    still wait for their request aside)."""
    v = []
    for op in ops:
        settled = all(s != "pending" for _, s in op.parts)
        if settled and (op.kind in ("backup", "load", "store") or op.state == "draining"):
            v.append(f"op {op.id} ({op.kind}) has every part settled but poll left it in flight")
    return v


def size_errors(m: Model, sizes: dict) -> list[str]:
    """The cache's evictable/protected totals (what allocation decides on) against the model's own
    count: device data is protected by a lock, host data by a reference or a device copy."""
    ps = m.page_size
    want: dict = {}

    def add(key, n):
        want[key] = want.get(key, 0) + n

    for g in m.pages.values():
        dev = "protected" if g.lock else "evictable"
        host = "protected" if (g.host_ref or g.dev) else "evictable"
        for on, comp, tier, state, n in ((g.dev, "full", "device", dev, ps), (g.host, "full", "host", host, ps),
                                         (g.mamba, "mamba", "device", dev, 1), (g.mamba_host, "mamba", "host", host, 1),
                                         (g.swa, "swa", "device", dev, ps), (g.swa_host, "swa", "host", host, ps)):
            if on:
                add((comp, tier, state), n)
    got = {k: v for k, v in sizes.items() if v}
    return [f"R2 by the model: {k} is {got.get(k, 0)}, the model counts {want.get(k, 0)}"
            for k in sorted(set(want) | set(got)) if want.get(k, 0) != got.get(k, 0)][:3]


def tombstone(m: Model, p: Prefix) -> bool:
    """No value of the defining component at `p` on any tier: the sidecar's, or full KV's when alone."""
    g = m.pages[p]
    if m.sidecar == "mamba":
        return not (g.mamba or g.mamba_host)
    if m.sidecar == "swa":
        return not (g.swa or g.swa_host)
    return not (g.dev or g.host)


def cascade_errors(before: Model, after: Model, failed: Iterable[int] = ()) -> list[str]:
    """A childless tombstone that no lock, reference or operation holds is deleted at once when a
    deletion leaves one (the cascade goes on upward), and so is each node of a backup or load-back
    that failed (`failed`: ids of operations a part of which failed), which gives back what the
    node held for it. (Not checked elsewhere: a terminated prefetch may leave one, what arrived
    joining the tree without the state its end lacks, and so may a successful backup of a node
    whose state went while it ran.)"""
    ps = before.page_size
    gone = {p for p in before.pages if p not in after.pages}
    failed = set(failed)
    released = {p for i, op in before.ops.items() if i not in after.ops and i in failed
                and op.kind in ("backup", "load") for p in op.pages}
    held = after.busy() | {op.anchor for op in after.ops.values() if op.anchor}
    v = []
    for q in sorted({t[:-ps] for t in gone} | released):  # (pages with children are skipped)
        if not q or q not in after.pages or q in held or after.children(q):
            continue
        g = after.pages[q]
        if g.lock == 0 and g.host_ref == 0 and tombstone(after, q):
            v.append(f"{q}: left a childless tombstone no one holds (the cascade stopped)")
    return v
