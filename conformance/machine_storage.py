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
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from .machine import ConformanceMachine


class StorageMachine(ConformanceMachine):
    THRESHOLD_PAGES = 2  # the targets' prefetch_threshold, in pages

    @precondition(lambda self: "prefetch" in self.info.ops)
    @rule(tokens=ConformanceMachine.requests, extra=st.lists(st.integers(0, 3), max_size=3))
    def prefetch(self, tokens, extra=()):
        self._prefetch(list(tokens) + self._tokens(list(extra)))

    def _prefetch(self, tokens):
        self.calls.append(("prefetch", list(tokens)))
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
        got = self.t.prefetch(tokens)
        waits = self.t.prefetch_policy == "wait_complete"
        declined = any(k.startswith("declined") for k in got["outcome"])
        fits = min(run, free // ps)

        def check(b, a):
            v = []
            if got["anchor_len"] != host_len:
                v.append(f"prefetch anchored after {got['anchor_len']} tokens, model's host match is {host_len}")
            new = [p for p in pages if p in a.pages and a.pages[p].host and not (p in b.pages and (b.pages[p].host
                                                                                                   or b.pages[p].dev))]
            beyond = [p for p in new if not (host_len < len(p) <= host_len + run * ps)]
            if beyond:
                v.append(f"prefetch put pages in L2 that L3 does not hold after the host match: {beyond[:3]}")
            n = sum(1 for p in pages[start:start + run] if p in a.pages and (a.pages[p].host or a.pages[p].dev))
            if waits and not declined and self.info.sidecar is None and run >= self.THRESHOLD_PAGES \
                    and fits >= self.THRESHOLD_PAGES and n < fits:
                v.append(f"prefetch brought {n} of the {run} pages L3 holds with room for {fits} in L2 "
                         f"({free} tokens free): it must truncate to what fits, not give up (outcome {got['outcome']})")
            return v

        side = frozenset(pages) if self.info.sidecar else frozenset()  # a prefetched path's state comes with it
        self._step(f"prefetch {tokens} -> {got}", self._allowed(gain_side=side), check)
