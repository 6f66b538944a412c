"""Failure reports a reviewer can act on: the check that fired, the minimized steps, the tree
before and after the failing step, the seed, the replay command and a standalone pytest file.

A program is the list of rule calls Hypothesis printed (`requests_0 = state.insert_new(...)`).
`replay` runs one against a fresh machine with every invariant after every rule, which is also
how `minimize` (a line-level delta-debugging pass after Hypothesis's own shrinking) decides
whether a shorter program still fails the same way.
"""

from __future__ import annotations

import contextlib
import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis.stateful import PRECONDITIONS_MARKER, RULE_MARKER

from refcache.snapshot import Snapshot
from stateful_tests.machines import MACHINES
from stateful_tests.seeded_bugs import SEEDED_BUGS

from .hunt import _STEP, Hunt, failure_check

CHECKS_AFTER_RULE = ("state.invariants_hold()", "state.model_agrees()")


@dataclass
class Replay:
    failed: bool
    check: str = ""
    message: str = ""
    failing_step: str = ""
    before: Snapshot | None = None
    after: Snapshot | None = None
    log: list[str] = field(default_factory=list)


def replay(machine: str, rules: list[str], bug: str | None = None) -> Replay:
    """Run `rules` on a fresh `machine` (under seeded `bug`), invariants after each, then teardown."""
    patch = SEEDED_BUGS[bug].patch() if bug else contextlib.nullcontext()
    with patch:
        state = MACHINES[machine]()
        env = {"state": state}
        before = state.cache.snapshot()
        for line in [*rules, "state.teardown()"]:
            before = state.cache.snapshot()
            if not _allowed(state, line):  # a shortened program may call a rule its state does not allow
                return Replay(False, message="a rule's precondition does not hold", failing_step=line)
            lhs, eq, call = line.partition(" = ")
            if not eq or not call.startswith("state."):
                lhs, call = "", line
            try:
                exec(f"_result = {call}", env)  # noqa: S102 - our own generated program, one rule call per line
                if lhs:  # binding the rule's results is the program's business: a mismatch is no finding
                    try:
                        exec(f"{lhs} = _result", env)  # noqa: S102
                    except (TypeError, ValueError) as e:
                        return Replay(False, message=f"program does not replay: {e}", failing_step=line)
                if line != "state.teardown()":
                    for chk in CHECKS_AFTER_RULE:
                        exec(chk, env)  # noqa: S102
            except (NameError, SyntaxError) as e:  # the program itself does not replay
                return Replay(False, message=f"program does not replay: {e}", failing_step=line)
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                msg = f"{type(e).__name__}: {e}" if not isinstance(e, AssertionError) else str(e)
                return Replay(True, failure_check(str(e)), msg, line, before, state.cache.snapshot(), list(state.log))
    return Replay(False, log=list(state.log))


def _allowed(state, line: str) -> bool:
    m = _STEP.match(line)
    fn = getattr(type(state), m.group(1), None) if m else None
    rule = getattr(fn, RULE_MARKER, None)
    preconditions = rule.preconditions if rule is not None else getattr(fn, PRECONDITIONS_MARKER, ())
    return all(p(state) for p in preconditions)


_NAME = re.compile(r"\b[a-z]+_\d+\b")  # the variables Hypothesis names bundle values: requests_0, nodes_3


def dependents(rules: list[str], i: int) -> list[int]:
    """Line `i` and every later line that uses a value it (or such a line) defined: dropping a
    definition alone leaves a program that does not replay, so it must go with its users."""
    group, names = [i], set()
    for k in range(i, len(rules)):
        lhs, eq, rhs = rules[k].partition(" = ")
        used = set(_NAME.findall(rhs if eq else lhs))
        if k == i or used & names:
            if k != i:
                group.append(k)
            if eq:
                names |= set(_NAME.findall(lhs))
    return group


def minimize(machine: str, rules: list[str], check: str, bug: str | None = None,
             time_cap_s: float = 120.0) -> tuple[list[str], bool]:
    """Drop rule calls — a definition with every line using it, then one line at a time, then
    two at a time, repeating until none can go — while the replay still fails: the same `check`
    on the clean cache; any check under a seeded bug, since the clean cache passes every
    program. Hypothesis's shrinker is thorough but slow on expensive steps, and it may stop at
    its time cap. Returns the program and whether it is 1-minimal: a full pass tried dropping
    each of its steps alone and none could go (False when `time_cap_s` cut the search short)."""
    stop = time.monotonic() + time_cap_s

    def still_fails(trial: list[str]) -> bool:
        try:
            r = replay(machine, trial, bug)
        except Exception:  # noqa: BLE001 - a program the machine cannot run is not a smaller failure
            return False
        return r.failed and (bug is not None or r.check == check)

    def without(lines: list[str], drop) -> list[str]:
        return [r for k, r in enumerate(lines) if k not in drop]

    cur = list(rules)
    while time.monotonic() < stop:
        for i in range(len(cur) - 1, -1, -1):
            if i < len(cur) and len(group := dependents(cur, i)) > 1 and still_fails(trial := without(cur, set(group))):
                cur = trial
        singles_from = len(cur)
        for i in range(len(cur) - 1, -1, -1):
            if time.monotonic() >= stop:
                return cur, False
            if i < len(cur) and still_fails(trial := cur[:i] + cur[i + 1:]):
                cur = trial
        if len(cur) < singles_from:
            continue  # a single went: try every single again on the shorter program
        pairs = ((i, j) for j in range(len(cur) - 1, 0, -1) for i in range(j - 1, -1, -1))
        smaller = next((t for i, j in pairs if time.monotonic() < stop and still_fails(t := without(cur, (i, j)))), None)
        if smaller is None:
            return cur, True  # the singles pass above tried every step of `cur` alone: none could go
        cur = smaller
    return cur, False


# ---------------------------------------------------------------------------- tree pictures
def _label(s: Snapshot, nid: int) -> str:
    n = s.nodes[nid]
    parts = [f"#{nid} {list(n.key)}", n.tiers or "-"]
    if n.mamba is not None or n.mamba_host is not None:
        parts.append("mamba:" + ("D" if n.mamba is not None else "") + ("H" if n.mamba_host is not None else ""))
    if n.swa or n.swa_host:
        parts.append("swa:" + ("D" if n.swa else "") + ("H" if n.swa_host else ""))
    if n.lock_ref:
        parts.append(f"lock={n.lock_ref}")
    if n.host_ref:
        parts.append(f"host_ref={n.host_ref}")
    return " ".join(parts)


def ascii_tree(s: Snapshot | None, mark: set[int] = frozenset()) -> str:
    """The tree as indented text; nodes named by the failure are marked with <<."""
    if s is None:
        return "(no snapshot)"
    lines = ["root"]

    def walk(nid: int, prefix: str) -> None:
        kids = [c for _, c in s.nodes[nid].children if c in s.nodes]
        for i, c in enumerate(kids):
            last = i == len(kids) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_label(s, c)}{'  <<' if c in mark else ''}")
            walk(c, prefix + ("    " if last else "│   "))

    walk(s.root, "")
    detached = sorted(set(s.registered) - set(_reachable(s)))
    if detached:
        lines.append(f"(registered but detached: {detached})")
    if s.ops:
        lines.append("in flight: " + "; ".join(f"op {o.id} {o.kind} {o.state} anchor=#{o.anchor}" for o in s.ops))
    return "\n".join(lines)


def _reachable(s: Snapshot) -> list[int]:
    out, todo = [], [s.root]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(c for _, c in s.nodes[n].children if c in s.nodes)
    return out


def mermaid_tree(s: Snapshot | None, mark: set[int] = frozenset()) -> str:
    if s is None:
        return ""
    lines = ["graph TD", f'  n{s.root}["root"]']
    for nid in _reachable(s):
        for _, c in s.nodes[nid].children:
            if c in s.nodes:
                lines.append(f'  n{nid} --> n{c}["{html.escape(_label(s, c))}"]')
    lines += [f"  style n{m} fill:#fbb,stroke:#c00" for m in mark if m in s.nodes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report
@dataclass
class FailureReport:
    title: str
    machine: str
    bug: str | None
    hunt: Hunt
    rules: list[str]
    replayed: Replay
    statement: str = ""
    one_minimal: bool = False  # no single step of `rules` can be dropped with the failure kept

    @property
    def marked(self) -> set[int]:
        return {int(x) for x in re.findall(r"node (\d+)", self.replayed.message)}

    def _cap(self) -> str:
        return " (stopped at the campaign's shrink-time cap)" if self.hunt.shrink_capped else ""

    def _minimality(self) -> str:
        return (" (1-minimal: no single step can be dropped with the failure kept)" if self.one_minimal
                else " (not shown 1-minimal: minimization reached its time cap)")

    def repro_source(self) -> str:
        body = "\n".join(f"    {r}\n    state.invariants_hold()\n    state.model_agrees()" for r in self.rules)
        bug_note = (f"Found with seeded bug {self.bug!r}: run with REFCACHE_SEEDED_BUG={self.bug} to see it fail;\n"
                    "without it the clean cache passes.") if self.bug else "Found on the clean cache."
        return f'''"""Reproduces {self.replayed.check} on machine {self.machine} with no Hypothesis search.

{bug_note}
Generated by `refcache verify` (seed {self.hunt.seed}).
"""

import contextlib
import os

from stateful_tests.machines import MACHINES
from stateful_tests.seeded_bugs import SEEDED_BUGS

MACHINE = {self.machine!r}
BUG = os.environ.get("REFCACHE_SEEDED_BUG", "")


def replay():
    state = MACHINES[MACHINE]()
{body}
    state.teardown()


def test_repro():
    with SEEDED_BUGS[BUG].patch() if BUG else contextlib.nullcontext():
        replay()
'''

    def markdown(self, repro_name: str, replay_cmd: str) -> str:
        steps = "\n".join(f"{i + 1}. `{r}`" for i, r in enumerate(self.rules))
        return f"""# {self.title}

- **Check that fired:** `{self.replayed.check}` {('— ' + self.statement) if self.statement else ''}
- **Machine:** `{self.machine}`{f'  — seeded bug `{self.bug}`' if self.bug else ''}
- **Seed:** {self.hunt.seed}; detected after {self.hunt.seconds:.1f} s and {self.hunt.steps_run} checked steps;
  Hypothesis shrank it in {self.hunt.shrink_seconds:.1f} s{self._cap()} to {len(self.hunt.rules)} steps, line-level
  minimization to {len(self.rules)}{self._minimality()}.
- **Replay:** `{replay_cmd}` (standalone file: `{repro_name}`)

## Message

```
{self.replayed.message}
```

## Minimized steps

{steps}

Failing step: `{self.replayed.failing_step}`

## Tree before the failing step

```
{ascii_tree(self.replayed.before, self.marked)}
```

## Tree after the failing step

```
{ascii_tree(self.replayed.after, self.marked)}
```
"""

    def html(self, repro_name: str, replay_cmd: str) -> str:
        e = html.escape
        steps = "".join(f"<li><code>{e(r)}</code></li>" for r in self.rules)
        return f"""<!doctype html><meta charset=utf-8><title>{e(self.title)}</title>
<script type="module">import mermaid from "https://cdn.jsdelivr.net/npm/mermaid@11/dist/mermaid.esm.min.mjs";
mermaid.initialize({{startOnLoad: true}});</script>
<style>body{{font-family:sans-serif;max-width:70em;margin:auto}} pre{{background:#f4f4f4;padding:.5em}}</style>
<h1>{e(self.title)}</h1>
<p><b>Check that fired:</b> <code>{e(self.replayed.check)}</code> {e(self.statement)}<br>
<b>Machine:</b> {e(self.machine)} {('— seeded bug <code>' + e(self.bug) + '</code>') if self.bug else ''}<br>
<b>Seed:</b> {self.hunt.seed}; detected after {self.hunt.seconds:.1f} s;
{len(self.rules)} minimized steps{e(self._minimality())}<br>
<b>Replay:</b> <code>{e(replay_cmd)}</code> (<a href="{e(repro_name)}">{e(repro_name)}</a>)</p>
<h2>Message</h2><pre>{e(self.replayed.message)}</pre>
<h2>Minimized steps</h2><ol>{steps}</ol><p>Failing step: <code>{e(self.replayed.failing_step)}</code></p>
<h2>Tree before the failing step</h2><pre class="mermaid">{e(mermaid_tree(self.replayed.before, self.marked))}</pre>
<pre>{e(ascii_tree(self.replayed.before, self.marked))}</pre>
<h2>Tree after the failing step</h2><pre class="mermaid">{e(mermaid_tree(self.replayed.after, self.marked))}</pre>
<pre>{e(ascii_tree(self.replayed.after, self.marked))}</pre>
"""

    def write(self, out: Path, stem: str) -> dict[str, str]:
        """Write `stem`.md, `stem`.html and test_`stem`.py into `out`; returns their names."""
        out.mkdir(parents=True, exist_ok=True)
        repro = f"test_{stem}.py"
        env = f"REFCACHE_SEEDED_BUG={self.bug} " if self.bug else ""
        cmd = f"{env}python -m pytest -p no:cacheprovider {out / repro}"
        (out / repro).write_text(self.repro_source())
        (out / f"{stem}.md").write_text(self.markdown(repro, cmd))
        (out / f"{stem}.html").write_text(self.html(repro, cmd))
        return {"markdown": f"{stem}.md", "html": f"{stem}.html", "repro": repro}


def build_report(h: Hunt, bug: str | None, title: str, statement: str = "", minimize_lines: bool = True
                 ) -> FailureReport | None:
    """Replay a hunt's minimized program, minimize it further, and picture the failing step."""
    rules = h.rules
    first = replay(h.machine, rules, bug)
    if not first.failed:
        return None  # Hypothesis's program did not replay (flaky): the hunt's message stands alone
    one_minimal = False
    if minimize_lines:
        rules, one_minimal = minimize(h.machine, rules, first.check, bug)
        first = replay(h.machine, rules, bug)
    return FailureReport(title, h.machine, bug, h, rules, first, statement, one_minimal)


def report_from_exception(exc: BaseException, out: Path, stem: str, bug: str | None = None) -> dict[str, str] | None:
    """Write a report for a failed stateful test from the program Hypothesis attached to `exc`
    (None when `exc` carries no stateful program or its machine is not one of ours)."""
    from .hunt import Hunt, _record

    h = Hunt(machine="", seed=-1, found=True)
    _record(h, exc)
    first = next((ln for ln in h.program if ln.startswith("state = ")), "")
    cls = first.removeprefix("state = ").removesuffix("()")
    machine = next((k for k, m in MACHINES.items() if m.__name__ == cls), None)
    if machine is None:
        return None
    h.machine = machine
    rep = build_report(h, bug, f"Stateful test failure: {stem}")
    if rep is None:
        return None
    return {k: str(out / v) for k, v in rep.write(out, stem).items()}
