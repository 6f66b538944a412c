"""The conformance machine plus a storage tier (L3): a `prefetch` rule for targets that declare the
"prefetch" operation and can say what their L3 holds (`l3_pages`) and how much L2 is free
(`host_free`). Kept apart from `conformance.machine` so targets without storage run the one machine
unchanged; the runner picks this one through `TargetSpec.machine`.

What a prefetch is judged on (the spec, DESIGN §3 `prefetch`): it may add to L2 only pages that L3
holds, contiguous from the request's host match; the data it brings is read back later through
load-back and match (D1 on the KV written at insert); and, where the stop policy waits for
completion, a prefetch that was issued (not declined as too short or rate-limited) and finds at
least `threshold` tokens in L3 with at least `threshold` tokens of L2 free brings at least what
fits: L2 that is short truncates the prefetch to the page-aligned free size, it does not give up
(for KV-only targets: a sidecar such as mamba makes a prefetch all-or-nothing upstream).

A prefetch may also stay in flight across operations (targets that declare "prefetch_pending"):
`prefetch_start` issues it and leaves it pending, any other rule may run meanwhile (eviction,
inserts, load-backs), and `prefetch_finish` polls it to its end and judges it as above, except the
truncation duty, which is judged only where nothing ran in between (L2's free space and L3's
contents are measured at the start). While pending, the prefetch host-references its anchor: the
anchor is not deleted (an eviction or a cascade may demote it, never drop it), which the target's
own checks (slot accounting on both tiers, its sanity check) and the final release observe.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from .machine import ConformanceMachine


class StorageMachine(ConformanceMachine):
    THRESHOLD_PAGES = 2  # the targets' prefetch_threshold, in pages

    def __init__(self):
        super().__init__()
        self.pending = None  # (the judge of the prefetch in flight, len(calls) when it started)

    @precondition(lambda self: "prefetch" in self.info.ops and self.pending is None)
    @rule(tokens=ConformanceMachine.requests, extra=st.lists(st.integers(0, 3), max_size=3))
    def prefetch(self, tokens, extra=()):
        self._prefetch(list(tokens) + self._tokens(list(extra)))

    @precondition(lambda self: "prefetch_pending" in self.info.ops and self.pending is None)
    @rule(tokens=ConformanceMachine.requests, extra=st.lists(st.integers(0, 3), max_size=3))
    def prefetch_start(self, tokens, extra=()):
        if self.pending is not None:  # a replay that calls it out of turn: one prefetch in flight at a time
            return
        tokens = list(tokens) + self._tokens(list(extra))
        self.calls.append(("prefetch_start", list(tokens)))
        judge = self._judge(tokens)
        anchor_len = self.t.prefetch_start(tokens)
        self.pending = (judge, len(self.calls))
        # Issuing a prefetch changes no page (its L2 staging is allocated when L3 answers).
        self._step(f"prefetch_start {tokens} -> anchor {anchor_len}", self._allowed(),
                   lambda b, a: judge["anchor"](anchor_len))

    @precondition(lambda self: self.pending is not None)
    @rule()
    def prefetch_finish(self, _=None):
        if self.pending is None:  # a replay that calls it out of turn
            return
        self.calls.append(("prefetch_finish", 0))
        judge, at = self.pending
        self.pending = None
        got = self.t.prefetch_finish()
        alone = at == len(self.calls) - 1  # nothing ran while it was in flight
        self._step(f"prefetch_finish {got}", self._allowed(gain_side=judge["side"]),
                   lambda b, a: judge["end"](b, a, got["outcome"], alone))

    def teardown(self):
        try:
            if self.pending is not None:
                self.prefetch_finish()
        finally:
            super().teardown()

    def _prefetch(self, tokens):
        self.calls.append(("prefetch", list(tokens)))
        judge = self._judge(tokens)
        got = self.t.prefetch(tokens)

        def check(b, a):
            return judge["anchor"](got["anchor_len"]) + judge["end"](b, a, got["outcome"], True)

        self._step(f"prefetch {tokens} -> {got}", self._allowed(gain_side=judge["side"]), check)

    def _judge(self, tokens) -> dict:
        """What the model expects of a prefetch of `tokens` issued now: checks of its anchor and of
        its end (the pages it brought), measured before it is issued."""
        ps = self.info.page_size
        m = self.model
        pages = m.page_prefixes(tokens)
        want = m.predict_match(tokens)
        # "last-host-is-best" (a contract difference, see test_hicache.py): the target anchors a prefetch at
        # its best_match_node, the deepest node every component accepts, not at the deepest page with KV.
        host_len = want[2] if "last-host-is-best" in self.info.allow else want[1]
        l3 = self.t.l3_pages(tokens)
        start = host_len // ps
        run = 0
        while start + run < len(l3) and l3[start + run]:
            run += 1
        free = self.t.host_free()
        self._touch([p for p in pages if len(p) <= host_len])
        waits = self.t.prefetch_policy == "wait_complete"
        fits = min(run, free // ps)
        # All-or-nothing (a sidecar): the whole run is due where L3 also holds the state at its end and
        # both host pools have room for it (a target that can say so: `l3_sidecar_pages`).
        side_l3 = getattr(self.t, "l3_sidecar_pages", None)
        whole = self.info.sidecar is not None and side_l3 is not None and run >= self.THRESHOLD_PAGES \
            and free // ps >= run and side_l3(tokens)[start + run - 1] and self.t.host_sidecar_free() >= 1

        def anchor(anchor_len):
            if anchor_len != host_len:
                return [f"prefetch anchored after {anchor_len} tokens, model's host match is {host_len}"]
            return []

        def end(b, a, outcome, alone):
            v = []
            declined = any(k.startswith("declined") for k in outcome)
            new = [p for p in pages if p in a.pages and a.pages[p].host and not (p in b.pages and (b.pages[p].host
                                                                                                   or b.pages[p].dev))]
            beyond = [p for p in new if not (host_len < len(p) <= host_len + run * ps)]
            if beyond:
                v.append(f"prefetch put pages in L2 that L3 does not hold after the host match: {beyond[:3]}")
            n = sum(1 for p in pages[start:start + run] if p in a.pages and (a.pages[p].host or a.pages[p].dev))
            if alone and waits and not declined and self.info.sidecar is None and run >= self.THRESHOLD_PAGES \
                    and fits >= self.THRESHOLD_PAGES and n < fits:
                v.append(f"prefetch brought {n} of the {run} pages L3 holds with room for {fits} in L2 "
                         f"({free} tokens free): it must truncate to what fits, not give up (outcome {outcome})")
            if alone and waits and not declined and whole and n < run:
                v.append(f"prefetch brought {n} of the {run} pages L3 holds, with the {self.info.sidecar} state at "
                         f"their end and room for all in L2: waiting for completion, it must bring them all "
                         f"(outcome {outcome})")
            return v

        side = frozenset(pages) if self.info.sidecar else frozenset()  # a prefetched path's state comes with it
        return {"anchor": anchor, "end": end, "side": side}
