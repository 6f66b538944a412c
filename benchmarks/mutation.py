"""Mutation score as a standing figure: how many small faults in refcache/ the suite catches.

    python -m benchmarks.mutation [--jobs N] [--modules cache,prefetch,...] [--budget-per-mutant S]
                                  [--limit K] [--out reports/mutation.json]
    python -m benchmarks.mutation --mutant pages-1a2b3c4d       # one mutant, verbosely (triage)
    python -m benchmarks.mutation --list                         # the mutants, nothing run
    python -m benchmarks.mutation --report-only                  # reports/mutation.md from json + triage

Mutants come from cosmic-ray (pinned in the `mutation` extra): its operator plugins enumerate every
mutation of a module as (module, operator, occurrence) and `cosmic_ray.mutating.mutate_code` turns
one into source text, which is all we need, because the kill check is ours: not a pytest run but
first a short clean campaign (every machine of `stateful_tests.machines.MACHINES` through
`campaign.hunt.hunt`, stopping at the first detection), and only for mutants the campaign misses,
the unit tests that cover the mutated line (coverage.py contexts, computed once and cached). mutmut 3
was the alternative; its trampolines rewrite every function of the package and assume the kill
check is a pytest run, which fits neither the campaign nor our process pool.

Each mutant runs in a sandbox copy of the project (never in this working tree) in child processes
forked from this one after torch/Hypothesis/pytest are imported (saves ~2 s a check), with a time
limit per step. Statuses: killed-by-campaign, killed-by-tests-only, survived, timeout (a step ran
past its limit: counted as killed, shown apart), error (the harness's fault, not a kill).
Mutants in type hints and in the text of error/log messages are skipped (they cannot change what
the cache does); so are mutants the operators produce that do not compile.
`reports/mutation_triage.toml` marks survivors equivalent or benign, with a reason; the score is
shown over all mutants and over the non-equivalent ones.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import hashlib
import json
import os
import platform
import re
import select
import signal
import socket
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.mutation_run import (
    CACHE_DIR,
    REPO,
    Child,
    Sandbox,
    can_fork,
    compute_coverage_map,
    fingerprint,
    load_coverage_map,
    make_sandbox,
    preload,
    project_files,
    run_child,
    snapshot,
)

CORE_MODULES = ("cache", "prefetch", "bookkeeping", "pages", "storage", "tp", "transfer", "pools")
TOOL = "cosmic-ray"
DEFAULT_OUT = REPO / "reports" / "mutation.json"
DEFAULT_TRIAGE = REPO / "reports" / "mutation_triage.toml"
STATUSES = ("killed-by-campaign", "killed-by-tests-only", "timeout", "survived", "error")
VERDICTS = ("equivalent", "benign", "gap")  # a gap stays a miss in every score until a check kills it
EXCLUDED = ("equivalent", "benign")  # what leaves the non-equivalent scores' denominators
_TYPE_CHECKING = ("TYPE_CHECKING", "typing.TYPE_CHECKING")
_MESSAGE_CALLS = re.compile(r"^(log|logger|logging|_log|_logger|warnings|warn)\b")


# ------------------------------------------------------------------------------------ enumeration
@dataclass
class Mutant:
    """One mutation: where, which cosmic-ray operator and occurrence, and the changed line."""

    id: str
    module: str
    path: str  # relative to the repo: refcache/<module>.py
    line: int
    col: int
    function: str
    operator: str  # cosmic-ray's name, e.g. core/ReplaceBinaryOperator_Sub_Add
    occurrence: int
    before: str
    after: str
    stmt_lines: tuple[int, int]
    def_lines: tuple[int, int]

    @property
    def diff(self) -> str:
        return f"{self.before} -> {self.after or '(line removed)'}"


def tool_version() -> str:
    from importlib.metadata import version

    return version("cosmic-ray")


def operators(pattern: str | None = None) -> list[tuple[str, Any]]:
    """cosmic-ray's core operators that take no arguments (the variable inserter/replacer need a
    configuration and are not part of its default set), optionally filtered by a regex."""
    import cosmic_ray.plugins

    out = []
    for name in cosmic_ray.plugins.operator_names():
        cls = cosmic_ray.plugins.get_operator(name)
        if cls.arguments() or (pattern and not re.search(pattern, name)):
            continue
        out.append((name, cls()))
    return out


def _ancestors(node: Any) -> Iterator[Any]:
    while node is not None:
        yield node
        node = node.parent


def skip_reason(node: Any) -> str | None:
    """Why a mutation at `node` cannot change behaviour: it sits in a type hint (annotations are
    never evaluated here: `from __future__ import annotations`; nor is `if TYPE_CHECKING:`'s
    condition worth a mutant) or builds the text of an error, assertion or log message."""
    if node.type == "if_stmt" and node.children[1].get_code().strip() in _TYPE_CHECKING:
        return "type hint"  # `if TYPE_CHECKING:` guards imports for annotations only
    in_text = False
    for a in _ancestors(node):
        p = a.parent
        if p is None:
            break
        i = next(k for k, c in enumerate(p.children) if c is a)
        if p.type == "tfpdef" and i >= 2:  # a parameter's annotation
            return "type hint"
        if p.type == "funcdef" and i >= 1 and getattr(p.children[i - 1], "value", None) == "->":
            return "type hint"
        if p.type == "annassign" and i == 1:
            return "type hint"
        if p.type == "if_stmt" and i == 1 and a.get_code().strip() in _TYPE_CHECKING:
            return "type hint"
        in_text = in_text or a.type in ("fstring", "string") or _string_formatting(a)
        if in_text:
            if p.type == "raise_stmt" or (p.type == "assert_stmt" and i >= 3):
                return "message text"
            if p.type in ("atom_expr", "power") and _MESSAGE_CALLS.match(p.children[0].get_code().strip()):
                return "message text"
    return None


def _string_formatting(node: Any) -> bool:
    """`"..." % x` or `"..." + x`: message text built without an f-string."""
    return node.type in ("term", "arith_expr") and node.children[0].type in ("string", "fstring", "strings")


def _qualname(node: Any) -> str:
    names = [a.name.value for a in _ancestors(node) if a.type in ("funcdef", "classdef")]
    return ".".join(reversed(names)) or "<module>"


def _lines_of(node: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the enclosing statement's lines, the enclosing definition's lines) of a mutated node."""
    stmt = (node.start_pos[0], node.end_pos[0])
    for a in _ancestors(node):
        if a.type == "simple_stmt":
            stmt = (a.start_pos[0], a.end_pos[0])
            break
        if a.type in ("if_stmt", "while_stmt", "for_stmt", "with_stmt", "try_stmt", "funcdef", "classdef", "decorated"):
            stmt = (a.start_pos[0], node.end_pos[0])
            break
    defn = next(((a.start_pos[0], a.end_pos[0]) for a in _ancestors(node) if a.type in ("funcdef", "classdef")), stmt)
    return stmt, defn


def _mutated_code(tree: Any, node: Any, op: Any, index: int) -> str:
    """The module's code with one mutation applied, the tree left as it was: cosmic-ray's
    operators change only the node, its subtree and its place in the parent, so those are saved
    and put back (re-parsing per mutant would cost ~0.1 s each). Checked against
    `cosmic_ray.mutating.mutate_code` before a mutant is run."""
    from cosmic_ray.ast import ast_nodes

    saved = [(n, getattr(n, "value", None), list(n.children) if hasattr(n, "children") else None) for n in ast_nodes(node)]
    parent = node.parent
    siblings = list(parent.children) if parent is not None else None
    new = op.mutate(node, index)
    if parent is not None and new is not node:
        i = next(k for k, c in enumerate(siblings) if c is node)
        parent.children = siblings[:i] + ([new] if new is not None else []) + siblings[i + 1:]
    try:
        return tree.get_code()
    finally:
        if parent is not None:
            parent.children = siblings
        for n, value, children in saved:
            if value is not None:
                n.value = value
            if children is not None:
                n.children = children


def _changed(old: list[str], new: list[str]) -> tuple[str, str]:
    i = 0
    while i < min(len(old), len(new)) and old[i] == new[i]:
        i += 1
    j = 0
    while j < min(len(old), len(new)) - i and old[-1 - j] == new[-1 - j]:
        j += 1
    return " ".join(s.strip() for s in old[i:len(old) - j]), " ".join(s.strip() for s in new[i:len(new) - j])


def _compiles(code: str, lines: tuple[int, int], path: str) -> bool:
    """Whether a mutant is valid Python (some operators also hit e.g. the bare `*` of keyword-only
    parameters): its definition first, the whole module to confirm a failure."""
    block = "\n".join(code.split("\n")[lines[0] - 1:lines[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. `x is 0`: valid, if odd
        for text in (textwrap.dedent(block), code):
            try:
                compile(text, path, "exec", dont_inherit=True)
                return True
            except SyntaxError:
                pass
    return False


def enumerate_module(module: str, root: Path = REPO, operator_filter: str | None = None,
                     cache: bool = True) -> tuple[list[Mutant], collections.Counter]:
    """Every mutant of refcache/<module>.py and the skipped ones counted by reason. Cached in
    build/mutation/ by the source's hash, cosmic-ray's version and the operator filter."""
    from cosmic_ray.ast import ast_nodes, get_ast

    rel = f"refcache/{module}.py"
    source = (root / rel).read_text()
    key = hashlib.sha256(f"{source}\0{tool_version()}\0{operator_filter}\0v2".encode()).hexdigest()[:16]
    cached = CACHE_DIR / f"mutants-{module}-{key}.json"
    if cache and cached.exists():
        data = json.loads(cached.read_text())
        return ([Mutant(**{**m, "stmt_lines": tuple(m["stmt_lines"]), "def_lines": tuple(m["def_lines"])})
                 for m in data["mutants"]], collections.Counter(data["skipped"]))
    tree = get_ast(source)
    nodes = list(ast_nodes(tree))
    old_lines = source.split("\n")
    mutants: list[Mutant] = []
    skipped: collections.Counter = collections.Counter()
    seen: collections.Counter = collections.Counter()
    for name, op in operators(operator_filter):
        occurrence = 0
        for node in nodes:
            for index, _ in enumerate(op.mutation_positions(node)):
                occ, occurrence = occurrence, occurrence + 1
                reason = skip_reason(node)
                if reason:
                    skipped[reason] += 1
                    continue
                code = _mutated_code(tree, node, op, index)
                stmt, defn = _lines_of(node)
                if not _compiles(code, defn, rel):
                    skipped["does not compile"] += 1
                    continue
                before, after = _changed(old_lines, code.split("\n"))
                if before == after:
                    skipped["no change"] += 1
                    continue
                func = _qualname(node)
                short = name.split("/", 1)[1]
                ident = f"{module}|{func}|{short}|{before}|{after}"
                seen[ident] += 1
                digest = hashlib.sha1(f"{ident}|{seen[ident]}".encode()).hexdigest()[:8]
                mutants.append(Mutant(f"{module}-{digest}", module, rel, node.start_pos[0], node.start_pos[1], func, name, occ,
                                      before, after, stmt, defn))
    mutants.sort(key=lambda m: (m.line, m.col, m.operator, m.occurrence))
    if cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"mutants": [asdict(m) for m in mutants], "skipped": dict(skipped)}))
    return mutants, skipped


def enumerate_mutants(modules: Iterable[str], root: Path = REPO, operator_filter: str | None = None,
                      cache: bool = True) -> tuple[list[Mutant], dict[str, dict[str, int]]]:
    """All mutants of `modules`, and per module the skipped ones by reason."""
    out: list[Mutant] = []
    skipped: dict[str, dict[str, int]] = {}
    for module in modules:
        ms, sk = enumerate_module(module, root, operator_filter, cache)
        out += ms
        skipped[module] = dict(sk)
    return out, skipped


def mutant_source(m: Mutant, root: Path = REPO) -> tuple[str, str]:
    """(original, mutated) text of the mutant's module, through cosmic-ray's own `mutate_code`."""
    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_code

    original = (root / m.path).read_text()
    mutated = mutate_code(original, cosmic_ray.plugins.get_operator(m.operator)(), m.occurrence)
    if mutated is None or _changed(original.split("\n"), mutated.split("\n")) != (m.before, m.after):
        raise RuntimeError(f"{m.id}: cosmic-ray's mutation differs from the enumerated one (source changed?)")
    return original, mutated


def sample(mutants: list[Mutant], k: int | None) -> list[Mutant]:
    """`k` mutants spread evenly over the list (every module and operator gets its share)."""
    if not k or k >= len(mutants):
        return mutants
    return [mutants[i * len(mutants) // k] for i in range(k)]


# -------------------------------------------------------------------------------- test selection
class TestSelector:
    """For a mutated line: the tests whose coverage context ran it, fastest first; failing that the
    tests of its statement, of its definition, and last the module's own test file(s)."""

    def __init__(self, cmap: dict[str, Any], root: Path = REPO):
        self.tests: list[str] = cmap["tests"]
        self.durations: dict[str, float] = cmap["durations"]
        self.lines: dict[str, dict[str, list[int]]] = cmap["lines"]
        self.root = root

    def _over(self, path: str, lines: range) -> set[int]:
        per_line = self.lines.get(path, {})
        return {i for ln in lines for i in per_line.get(str(ln), ())}

    def module_tests(self, m: Mutant) -> set[int]:
        own = f"tests/test_{m.module}.py::"
        ids = {i for i, t in enumerate(self.tests) if t.startswith(own)}
        if ids:
            return ids
        hits = collections.Counter(self.tests[i].split("::")[0] for per in self.lines.get(m.path, {}).values() for i in per)
        files = {f for f, _ in hits.most_common(3)}
        return {i for i, t in enumerate(self.tests) if t.split("::")[0] in files}

    def select(self, m: Mutant) -> tuple[list[str], str]:
        for source, ids in (("line", lambda: self._over(m.path, range(m.line, m.line + 1))),
                            ("statement", lambda: self._over(m.path, range(m.stmt_lines[0], m.stmt_lines[1] + 1))),
                            ("definition", lambda: self._over(m.path, range(m.def_lines[0], m.def_lines[1] + 1))),
                            ("module tests", lambda: self.module_tests(m))):
            found = ids()
            if found:
                return sorted((self.tests[i] for i in found), key=lambda t: (self.durations.get(t, 0.0), t)), source
        return [], "none"

    def limit(self, test: str, factor: float, minimum: float) -> float:
        return max(minimum, factor * self.durations.get(test, minimum))


# ------------------------------------------------------------------------------------- the run
@dataclass
class Settings:
    budget_per_machine: float
    examples_per_slice: int
    seed: int
    tests: bool
    test_factor: float
    test_min_s: float
    mode: str
    tests_only: bool = False  # the listed mutants survived the campaign already: run their unit tests only
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)  # with tests_only: their campaign records


def classify_campaign(child: Child) -> dict[str, Any] | None:
    """The campaign's verdict, or None when it found nothing (the unit tests come next)."""
    if child.timed_out:
        return {"status": "timeout", "killed_by": f"timeout in {child.timed_out}", "check": "campaign"}
    final = child.final
    if final and final[0] == "campaign":
        if not final[1]:
            return None
        f = final[1][0]
        return {"status": "killed-by-campaign", "killed_by": f"{f['machine']} ({f['check']})", "check": "campaign",
                "detail": f"{f['error_type']}: {f['error']}", "program": f.get("program", [])}
    if final and final[0] == "error":
        return {"status": "killed-by-campaign", "killed_by": "exception", "check": "campaign", "detail": final[1]}
    return {"status": "killed-by-campaign", "killed_by": f"crash (exit {child.exit_status})", "check": "campaign"}


def classify_tests(child: Child) -> dict[str, Any]:
    if child.timed_out:
        return {"status": "timeout", "killed_by": f"timeout in {child.timed_out}", "check": "tests"}
    final = child.final
    if final and final[0] == "result":
        rc, failed = final[1], final[2]
        if rc == 0 or rc == 5:
            return {"status": "survived"}
        if rc in (1, 2, 3):
            f = failed[0] if failed else {"test": f"pytest exit {rc}", "error": ""}
            return {"status": "killed-by-tests-only", "killed_by": f["test"], "check": "tests",
                    "detail": f.get("error", "")[-600:]}
        return {"status": "error", "killed_by": f"pytest exit {rc} (usage error: stale coverage map?)", "check": "tests"}
    if final and final[0] == "error":
        return {"status": "error", "killed_by": "harness exception", "detail": final[1]}
    return {"status": "killed-by-tests-only", "killed_by": f"crash (exit {child.exit_status}) in {child.step}",
            "check": "tests"}


class Progress:
    """One line on stderr: done/total, kills, survivors, ETA."""

    def __init__(self, total: int, jobs: int):
        self.total, self.jobs, self.t0, self.last = total, jobs, time.monotonic(), 0.0
        self.counts: collections.Counter = collections.Counter()
        self.tty = sys.stderr.isatty()

    def update(self, status: str | None = None, force: bool = False) -> None:
        if status:
            self.counts[status] += 1
        now = time.monotonic()
        if not force and now - self.last < (0.5 if self.tty else 30.0):
            return
        self.last = now
        done = sum(self.counts.values())
        elapsed = now - self.t0
        eta = elapsed / done * (self.total - done) if done else float("nan")
        c = self.counts
        line = (f"[mutation] {done}/{self.total} mutants: killed {c['killed-by-campaign'] + c['killed-by-tests-only']} "
                f"(campaign {c['killed-by-campaign']}, tests only {c['killed-by-tests-only']}), timeout {c['timeout']}, "
                f"survived {c['survived']}" + (f", error {c['error']}" if c["error"] else "")
                + f"; {elapsed:.0f} s, ETA {_dur(eta)}")
        print(("\r" + line + "\033[K") if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.update(force=True)
        if self.tty:
            print(file=sys.stderr)


def _dur(s: float) -> str:
    if s != s:  # nan
        return "?"
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 120 else f"{s:.0f} s"


@dataclass
class _Slot:
    sandbox: Sandbox
    mutant: Mutant | None = None
    record: dict[str, Any] | None = None
    child: Child | None = None
    phase: str = ""
    t0: float = 0.0


def run_mutants(mutants: list[Mutant], selector: TestSelector | None, settings: Settings, jobs: int,
                machines: list[str], workdir: Path, root: Path = REPO, out_partial: Path | None = None,
                partial: dict[str, Any] | None = None, results: list[dict[str, Any]] | None = None,
                stop_at: float | None = None) -> list[dict[str, Any]]:
    """Every mutant through the campaign and, if it survives that, its unit tests; `jobs` at a time,
    each in its own sandbox copy of `root`. Results are appended to `results` as they come (so an
    interrupted run keeps what it did). At `stop_at` (time.monotonic()) the checks in flight are
    dropped and the rest left undone, so a run under an outer time limit ends with its report
    written (`--resume` picks up the rest)."""
    files = project_files(root)
    slots = [_Slot(Sandbox(make_sandbox(workdir / f"w{i}", root, files))) for i in range(min(jobs, len(mutants)) or 1)]
    pending = collections.deque(mutants)
    results = [] if results is None else results
    kills: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    progress = Progress(len(mutants), jobs)
    last_save = time.monotonic()

    def start_campaign(slot: _Slot, m: Mutant) -> None:
        _, mutated = mutant_source(m, root)
        slot.sandbox.apply(m.path, mutated)
        order = sorted(machines, key=lambda n: (-kills[m.module][n], machines.index(n)))
        slot.mutant, slot.phase, slot.t0 = m, "campaign", time.monotonic()
        slot.record = {**mutant_record(m), "campaign_s": None, "tests_s": None}
        slot.child = Child(slot.sandbox.path, {"phase": "campaign", "machines": order, "seed": settings.seed,
                                               "budget": settings.budget_per_machine, "stop_first": True,
                                               "examples": settings.examples_per_slice},
                           mode=settings.mode, log=slot.sandbox.path / ".check.log").start()

    def start_tests_only(slot: _Slot, m: Mutant) -> None:
        """A mutant an earlier run's campaign left alive: straight to the unit tests that cover it."""
        _, mutated = mutant_source(m, root)
        slot.sandbox.apply(m.path, mutated)
        slot.mutant, slot.t0 = m, time.monotonic()
        before = settings.earlier.get(m.id, {})
        slot.record = {**mutant_record(m), "campaign_s": before.get("campaign_s"), "tests_s": None,
                       "campaign": campaign_outcome(before) + " (earlier run)"}
        if campaign_outcome(before) == "timeout":
            slot.record["campaign_killed_by"] = before.get("campaign_killed_by") or before.get("killed_by")
        tests_or_survived(slot)

    def tests_or_survived(slot: _Slot) -> None:
        """The unit tests covering the slot's mutant, or `survived` when none cover it (or --no-tests)."""
        ids, source = selector.select(slot.mutant) if (selector and settings.tests) else ([], "off")
        slot.record.update(tests_selected=len(ids), tests_from=source)
        if ids:
            start_tests(slot, ids)
        else:
            finish(slot, {"status": "survived"})

    def start_tests(slot: _Slot, ids: list[str]) -> None:
        slot.phase = "tests"
        slot.child = Child(slot.sandbox.path, {"phase": "tests", "ids": ids}, mode=settings.mode,
                           log=slot.sandbox.path / ".check.log",
                           limit_for=lambda t: selector.limit(t, settings.test_factor, settings.test_min_s)).start()

    def finish(slot: _Slot, verdict: dict[str, Any]) -> None:
        rec = slot.record
        rec.update(verdict)
        rec.pop("program", None)  # `--mutant ID` shows it; a full run's JSON stays small
        if rec.get("detail"):
            rec["detail"] = rec["detail"][:200]
        rec["seconds"] = round(time.monotonic() - slot.t0, 2)
        results.append(rec)
        if rec["status"] == "killed-by-campaign" and "(" in rec.get("killed_by", ""):
            kills[slot.mutant.module][rec["killed_by"].split(" (")[0]] += 1
        slot.sandbox.restore()
        slot.mutant = slot.child = slot.record = None
        progress.update(rec["status"])

    try:
        while pending or any(s.child for s in slots):
            if stop_at is not None and time.monotonic() > stop_at:
                pending.clear()
                break
            for slot in slots:
                while slot.child is None and pending:  # (a mutant no test covers frees its slot at once)
                    (start_tests_only if settings.tests_only else start_campaign)(slot, pending.popleft())
            active = [s.child for s in slots if s.child is not None and not s.child.eof]
            if active:
                select.select(active, [], [], 0.25)
            else:
                time.sleep(0.05)
            for slot in slots:
                if slot.child is None or not slot.child.pump():
                    continue
                child = slot.child
                if slot.phase == "campaign":
                    slot.record["campaign_s"] = round(child.seconds, 2)
                    verdict = classify_campaign(child)
                    if verdict is not None:
                        finish(slot, verdict)
                    else:
                        tests_or_survived(slot)
                else:
                    slot.record["tests_s"] = round(child.seconds, 2)
                    finish(slot, classify_tests(child))
            progress.update()
            if out_partial is not None and time.monotonic() - last_save > 120:
                write_json(out_partial, {**(partial or {}), "complete": False, "mutants": results})
                last_save = time.monotonic()
    finally:
        for slot in slots:
            if slot.child is not None:
                slot.child.kill()
                slot.sandbox.restore()
        progress.close()
    return results


def mutant_record(m: Mutant) -> dict[str, Any]:
    return {"id": m.id, "module": m.module, "line": m.line, "function": m.function, "operator": m.operator.split("/", 1)[1],
            "occurrence": m.occurrence, "before": m.before, "after": m.after, "diff": m.diff}


def baseline_campaign(settings: Settings, workdir: Path, root: Path = REPO) -> tuple[list[str], list[dict[str, Any]]]:
    """The campaign on the unmutated code (every machine, no early stop): it must find nothing, or
    every mutant would look killed. Returns the machine names and what it found."""
    sb = make_sandbox(workdir, root, name="baseline")
    child = run_child(Child(sb, {"phase": "campaign", "machines": [], "seed": settings.seed,
                                 "budget": settings.budget_per_machine, "stop_first": False,
                                 "examples": settings.examples_per_slice},
                            mode=settings.mode, log=sb / ".check.log"))
    machines = next((m[1] for m in child.messages if m[0] == "machines"), [])
    if child.final is None or child.final[0] != "campaign":
        log = (sb / ".check.log").read_text()[-3000:]
        raise RuntimeError(f"the baseline campaign did not complete (timeout in {child.timed_out}, exit "
                           f"{child.exit_status}, {child.final}):\n{log}")
    return machines, child.final[1]


# ------------------------------------------------------------------------------------- triage, report
def load_triage(path: Path) -> dict[str, dict[str, str]]:
    """`[mutant."<id>"] verdict = "equivalent" | "benign", reason = "..."`."""
    if not Path(path).exists():
        return {}
    try:
        import tomllib

        with open(path, "rb") as f:
            data = tomllib.load(f)
    except ModuleNotFoundError:  # Python 3.10: cosmic-ray depends on `toml`
        import toml

        data = toml.load(str(path))
    out = {}
    for mid, entry in data.get("mutant", {}).items():
        if entry.get("verdict") not in VERDICTS:
            raise ValueError(f"{path}: {mid}: verdict must be one of {VERDICTS}, got {entry.get('verdict')!r}")
        out[mid] = {"verdict": entry["verdict"], "reason": entry.get("reason", "")}
    return out


def campaign_outcome(m: dict[str, Any]) -> str:
    """What the campaign alone made of a mutant: killed, timeout, survived or error (a record whose
    unit tests ran later, under --tests-only, keeps its campaign's outcome in `campaign`)."""
    if m.get("status") == "killed-by-campaign":
        return "killed"
    if m.get("check") == "campaign" and m.get("status") in ("timeout", "error"):
        return m["status"]
    return "timeout" if str(m.get("campaign", "")).startswith("timeout") else "survived"


def tables(mutants: list[dict[str, Any]], triage: dict[str, dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """Per module and in total, by the campaign alone and by the whole suite (campaign or tests):
    killed, timeout, survived, error, and the score over all and over non-equivalent mutants. Each view
    judges its own outcome: a survivor triaged equivalent or benign leaves a view's denominator if it
    survived that view's checks (a benign campaign survivor a unit test kills stays out of the
    campaign's denominator and counts as killed by the whole suite)."""
    views = ("campaign", "suite")
    out: dict[str, list[dict[str, Any]]] = {}
    modules = sorted({m["module"] for m in mutants}, key=lambda x: (CORE_MODULES + (x,)).index(x))
    for view in views:
        outcome = {m["id"]: campaign_outcome(m) if view == "campaign" else
                   {"killed-by-campaign": "killed", "killed-by-tests-only": "killed"}.get(m["status"], m["status"])
                   for m in mutants}
        rows = []
        for mod in [*modules, "total"]:
            ms = [m for m in mutants if mod in ("total", m["module"])]
            killed = sum(outcome[m["id"]] == "killed" for m in ms)
            timeout = sum(outcome[m["id"]] == "timeout" for m in ms)
            error = sum(outcome[m["id"]] == "error" for m in ms)
            excluded = [m for m in ms if outcome[m["id"]] == "survived"
                        and triage.get(m["id"], {}).get("verdict") in EXCLUDED]
            equiv = sum(triage[m["id"]]["verdict"] == "equivalent" for m in excluded)
            n = len(ms)
            rows.append({"module": mod, "mutants": n, "killed": killed, "timeout": timeout,
                         "survived": n - killed - timeout - error, "error": error,
                         "equivalent": equiv, "benign": len(excluded) - equiv,
                         "score": (killed + timeout) / n if n else 0.0,
                         "score_non_equivalent": (killed + timeout) / (n - len(excluded)) if n - len(excluded) else 0.0,
                         # benign survivors counted as misses: only what no input can tell apart leaves
                         "score_strict": (killed + timeout) / (n - equiv) if n - equiv else 0.0})
        out[view] = rows
    return out


def format_table(rows: list[dict[str, Any]], title: str) -> str:
    head = ("| module | mutants | killed | timeout | survived | error | equivalent | benign | score | "
            "score (non-equivalent, benign as missed) | score (non-equivalent, non-benign) |")
    lines = [f"**{title}**", "", head, "|" + "---|" * 11]
    for r in rows:
        name = f"**{r['module']}**" if r["module"] == "total" else r["module"]
        lines.append(f"| {name} | {r['mutants']} | {r['killed']} | {r['timeout']} | {r['survived']} | {r['error']} | "
                     f"{r['equivalent']} | {r['benign']} | {100 * r['score']:.1f}% | "
                     f"{100 * r.get('score_strict', r['score_non_equivalent']):.1f}% | {100 * r['score_non_equivalent']:.1f}% |")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """The report, one mutant a line (a full run has thousands), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = json.dumps({k: v for k, v in data.items() if k != "mutants"}, indent=1)
    rows = ",\n".join("  " + json.dumps(m) for m in data.get("mutants", []))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(head[:-2] + ',\n "mutants": [\n' + rows + "\n ]\n}\n")
    tmp.replace(path)


def markdown(data: dict[str, Any], triage: dict[str, dict[str, str]], triage_path: str) -> str:
    """reports/mutation.md: the figures, then every survivor with its triage."""
    ms = data["mutants"]
    t = tables(ms, triage)
    s = data.get("settings", {})
    total = t["suite"][-1]
    tested = s.get("tests", True)  # False: --no-tests, the whole-suite figure was not measured
    head = (f"- **whole suite: {100 * total['score']:.1f}%** of {total['mutants']} mutants killed "
            f"({100 * total.get('score_strict', 0):.1f}% of non-equivalent ones, "
            f"{100 * total['score_non_equivalent']:.1f}% of non-equivalent, non-benign ones); " if tested else
            "- whole suite: not measured (`--no-tests`: the unit tests were not run on the survivors); ")
    lines = [
        "# Mutation score",
        "",
        f"Generated by `python -m benchmarks.mutation` from `{data.get('json', 'reports/mutation.json')}` and "
        f"`{triage_path}`; do not edit by hand (regenerate with `--report-only` after triage).",
        "",
        head + f"**campaign alone: {100 * t['campaign'][-1]['score']:.1f}%** of all mutants; "
        f"**{100 * t['campaign'][-1].get('score_strict', 0):.1f}%** of non-equivalent ones (benign survivors "
        f"counted as missed); {100 * t['campaign'][-1]['score_non_equivalent']:.1f}% of non-equivalent, "
        "non-benign ones"
        + ("" if data.get("complete", True) else " — **incomplete run**"),
        f"- modules: {', '.join(s.get('modules', []))}" + (f" (a sample of {s['limit']})" if s.get("limit") else ""),
        f"- mutation tool: {data.get('tool', TOOL)}; operators: cosmic-ray's core set"
        + (f" matching `{s['operators']}`" if s.get("operators") else ""),
        f"- campaign check: every machine ({len(s.get('machines', []))}) for {s.get('budget_per_machine')} s each "
        f"(`hunt`, seed {s.get('seed')}, slices of {s.get('examples_per_slice', 25)} examples), "
        "stopping at the first detection; unit-test check: the tests covering "
        "the mutated line (coverage contexts), fastest first, `-x`; the caches run on the CPU, except in runs "
        "given `--device cuda` (their commands below), which run them on the GPU",
        f"- machine: {data.get('host')} ({data.get('cpus')} CPUs, {data.get('jobs')} jobs), Python {data.get('python')}; "
        f"wall time {_dur(data.get('wall_s', float('nan')))}; {data.get('started', '')}",
        f"- command: `{data.get('command', '')}`",
        *([f"- resumed over {len(data['runs'])} runs: " + "; ".join(f"`{r.get('command')}` ({_dur(r.get('wall_s') or 0)})"
                                                                   for r in data["runs"])] if data.get("runs") else []),
        "",
        "Statuses: killed-by-campaign; killed-by-tests-only (the campaign missed it); timeout (a machine or a test "
        "ran past its limit: counted as killed, shown apart); survived. The non-equivalent score leaves out "
        "survivors triaged `equivalent` or `benign`; a survivor triaged `gap` (a fault the campaign should catch "
        "and does not yet, with what it lacks) stays counted as missed.",
        "",
        format_table(t["campaign"], "By the campaign alone"),
        "",
        *([format_table(t["suite"], "By the whole suite (campaign, then the unit tests)"), ""] if tested else []),
    ]
    sk = data.get("skipped", {})
    reasons: collections.Counter = collections.Counter()
    for per in sk.values():
        reasons.update(per)
    if not reasons:
        lines += ["Skipped before running: none (no mutant fell in a type hint or message text, or failed to compile).", ""]
    else:
        lines += [f"Skipped before running ({sum(reasons.values())}): "
                  + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
                  + " (type hints are not evaluated under `from __future__ import annotations`; message text cannot "
                    "change what the cache does; a mutant that does not compile is not a fault). Per module: "
                  + "; ".join(f"{mod} {sum(v.values())}" for mod, v in sk.items()) + ".", ""]
    survivors = [m for m in ms if m["status"] == "survived"]
    lines += [f"## Survivors ({len(survivors)})", "",
              "| id | where | operator | change | triage |", "|---|---|---|---|---|"]
    for m in survivors:
        tr = triage.get(m["id"])
        verdict = f"{tr['verdict']}: {tr['reason']}" if tr else "untriaged"
        lines.append(f"| `{m['id']}` | {m['module']}.py:{m['line']} `{m['function']}` | {m['operator']} | "
                     f"`{_md(m['before'])}` → `{_md(m['after']) or '(removed)'}` | {_md(verdict)} |")
    tests_only = [m for m in ms if m["status"] == "killed-by-tests-only"]
    if tests_only:
        lines += ["", f"## Missed by the campaign, killed by a unit test ({len(tests_only)})", "",
                  "<details><summary>what the campaign would not carry to another cache</summary>", "",
                  "| id | where | change | killed by |", "|---|---|---|---|"]
        for m in tests_only:
            lines.append(f"| `{m['id']}` | {m['module']}.py:{m['line']} | `{_md(m['before'])}` → `{_md(m['after'])}` | "
                         f"`{_md(m.get('killed_by', ''))}` |")
        lines += ["", "</details>"]
    timeouts = [m for m in ms if m["status"] == "timeout"]
    if timeouts:
        lines += ["", f"## Timeouts ({len(timeouts)})", ""]
        lines += [f"- `{m['id']}` {m['module']}.py:{m['line']} `{_md(m['diff'])}`: {m.get('killed_by', '')}" for m in timeouts]
    gaps = [m for m in survivors if triage.get(m["id"], {}).get("verdict") == "gap"]
    untriaged = [m for m in survivors if m["id"] not in triage]
    lines += ["", f"Survivors by triage: {len(survivors) - len(gaps) - len(untriaged)} equivalent or benign, "
              f"{len(gaps)} open gaps, {len(untriaged)} untriaged."]
    closed = [mid for mid in triage if triage[mid]["verdict"] == "gap"
              and any(m["id"] == mid and m["status"] != "survived" for m in ms)]
    if closed:
        lines += ["", "Gaps closed since triage (killed in this report; the entry can go): "
                  + ", ".join(f"`{x}`" for x in closed)]
    stale = [mid for mid in triage if triage[mid]["verdict"] != "gap"
             and any(m["id"] == mid and m["status"] not in ("survived",) for m in ms)]
    if stale:
        lines += ["", "Triaged but killed in this run (the triage is wrong, or a check is flaky): "
                  + ", ".join(f"`{x}`" for x in stale)]
    return "\n".join(lines) + "\n"


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("`", "'")


def print_tables(data: dict[str, Any], triage: dict[str, dict[str, str]]) -> None:
    t = tables(data["mutants"], triage)
    print(format_table(t["campaign"], "By the campaign alone"))
    print()
    print(format_table(t["suite"], "By the whole suite (campaign, then the unit tests)"))
    print(f"\nhost {data.get('host')} ({data.get('cpus')} CPUs, {data.get('jobs')} jobs); wall time "
          f"{_dur(data.get('wall_s', float('nan')))}")


# ------------------------------------------------------------------------------------------ CLI
def _coverage_map(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The cached map if it was made from the same sources, else a new one."""
    fp = fingerprint(root)
    path = CACHE_DIR / f"coverage_map-{fp[:12]}.json"
    cmap = None if args.remap else load_coverage_map(path, fp)
    if cmap is None:
        cmap = compute_coverage_map(path, args.jobs, root, echo=lambda s: print(s, file=sys.stderr, flush=True))
    return cmap


def _one(args: argparse.Namespace, mutants: list[Mutant], settings: Settings, root: Path) -> int:
    """--mutant ID: the diff, then each check verbosely, and which one kills it."""
    m = next((x for x in mutants if x.id == args.mutant), None)
    if m is None:
        print(f"no mutant {args.mutant} in modules {','.join(args.modules)}", file=sys.stderr)
        return 2
    original, mutated = mutant_source(m, root)
    print(f"{m.id}: {m.path}:{m.line} in {m.function}, {m.operator} occurrence {m.occurrence}")
    print("".join(difflib.unified_diff(original.splitlines(True), mutated.splitlines(True), f"a/{m.path}", f"b/{m.path}")))
    tr = load_triage(args.triage).get(m.id)
    if tr:
        print(f"triage: {tr['verdict']}: {tr['reason']}\n")
    with tempfile.TemporaryDirectory(prefix="refcache-mutant-") as tmp:
        sb = Sandbox(make_sandbox(Path(tmp), root))
        sb.apply(m.path, mutated)
        child = run_child(Child(sb.path, {"phase": "campaign", "machines": [], "seed": settings.seed,
                                          "budget": settings.budget_per_machine, "stop_first": not args.all_checks,
                                          "examples": settings.examples_per_slice, "verbose": True}, mode=settings.mode))
        verdict = classify_campaign(child)
        print(f"\ncampaign: {verdict or {'status': 'nothing found'}}")
        if verdict and verdict.get("program"):
            print("minimized steps:\n  " + "\n  ".join(verdict["program"]))
        if (verdict is None or args.all_checks) and settings.tests:  # (--no-tests: the campaign only)
            selector = TestSelector(_coverage_map(args, root))
            ids, source = selector.select(m)
            print(f"\nunit tests: {len(ids)} covering tests (from the {source}), fastest first")
            if ids:
                child = run_child(Child(sb.path, {"phase": "tests", "ids": ids,
                                                  "pytest_args": ["-q"] if args.all_checks else ["-x", "-q"]},
                                        mode=settings.mode, limit_for=lambda t: selector.limit(t, settings.test_factor,
                                                                                                settings.test_min_s)))
                print(f"tests: {classify_tests(child)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants checked at once (default: all cores)")
    ap.add_argument("--modules", default=",".join(CORE_MODULES), help="refcache modules to mutate (default: %(default)s)")
    ap.add_argument("--budget-per-mutant", type=float, default=9.0,
                    help="campaign search seconds per mutant, split evenly over the machines (default 9: 1 s each)")
    ap.add_argument("--limit", type=int, default=None, help="check only K mutants, spread evenly over the list")
    ap.add_argument("--ids", type=Path, default=None, help="check only the mutants whose ids this file lists, one a line")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report (default: %(default)s)")
    ap.add_argument("--md", type=Path, default=None, help="the Markdown report (default: the JSON's name, .md)")
    ap.add_argument("--triage", type=Path, default=DEFAULT_TRIAGE)
    ap.add_argument("--examples-per-slice", type=int, default=5,
                    help="Hypothesis examples per generation slice of `hunt` (it checks the budget between slices)")
    ap.add_argument("--seed", type=int, default=1, help="campaign seed (default 1)")
    ap.add_argument("--operators", default=None, help="only cosmic-ray operators matching this regex")
    ap.add_argument("--no-tests", action="store_true", help="campaign check only")
    ap.add_argument("--skip-equivalent", action="store_true",
                    help="do not run mutants triaged equivalent (they count as triaged survivors)")
    ap.add_argument("--test-timeout-factor", type=float, default=5.0,
                    help="a test's limit: this many times its duration in the coverage run (at least --test-timeout-min)")
    ap.add_argument("--test-timeout-min", type=float, default=15.0)
    ap.add_argument("--recheck", action="store_true",
                    help="with --ids: check the listed mutants again (e.g. the survivors, after new checks) and keep "
                         "every other result of --out as it is, so the report stays complete")
    ap.add_argument("--resume", action="store_true",
                    help="keep the results already in --out (same mutant ids and lines) and check only the others")
    ap.add_argument("--stop-after", type=float, default=None, metavar="S",
                    help="stop starting checks after S seconds and write the report (for runs under a time limit)")
    ap.add_argument("--tests-only", action="store_true",
                    help="with --recheck --ids: the listed mutants survived the campaign in --out already; run only "
                         "the unit tests that cover each (list every campaign survivor to measure the whole suite)")
    ap.add_argument("--remap", action="store_true", help="recompute the coverage map even if it is fresh")
    ap.add_argument("--rev", default=None, help="mutate and test this commit (git archive) instead of the working tree")
    ap.add_argument("--spawn", action="store_true", help="start each check as a new interpreter instead of forking")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the campaign's caches run (cuda reaches the CUDA executor and pinned-memory paths)")
    ap.add_argument("--mutant", default=None, help="rerun one mutant verbosely (its diff and which check kills it)")
    ap.add_argument("--all-checks", action="store_true", help="with --mutant: every machine and every covering test")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--report-only", action="store_true", help="regenerate the Markdown from the JSON and the triage")
    args = ap.parse_args(argv)
    args.modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    if args.mutant:
        args.modules = [args.mutant.rsplit("-", 1)[0]]
    md_path = args.md or args.out.with_suffix(".md")
    unknown = [m for m in args.modules if not (REPO / "refcache" / f"{m}.py").exists()]
    if unknown:
        ap.error(f"no refcache module {unknown}")
    if args.tests_only and (args.no_tests or not args.recheck or args.ids is None):
        ap.error("--tests-only re-checks listed campaign survivors with their unit tests: it needs --recheck --ids FILE "
                 "and not --no-tests")

    if args.report_only:
        data = json.loads(args.out.read_text())
        data["json"] = _rel(args.out)
        triage = load_triage(args.triage)
        md_path.write_text(markdown(data, triage, _rel(args.triage)))
        print_tables(data, triage)
        return 0

    with tempfile.TemporaryDirectory(prefix="refcache-mutation-") as tmp:
        root = snapshot(Path(tmp) / "src", args.rev)
        return _run(args, root, Path(tmp), md_path, argv)


def _run(args: argparse.Namespace, root: Path, tmp: Path, md_path: Path, argv: list[str] | None) -> int:
    mutants, skipped = enumerate_mutants(args.modules, root, operator_filter=args.operators)
    if args.device == "cuda":  # the machines run on CUDA (CudaExecutor, pinned L2): children must not fork a CUDA context
        os.environ["REFCACHE_DEVICE"] = "cuda"
    mode = "spawn" if args.spawn or args.device == "cuda" or not can_fork() else "fork"
    n_machines = 9  # until the baseline names them; only splits the budget
    settings = Settings(round(args.budget_per_mutant / n_machines, 3), args.examples_per_slice, args.seed, not args.no_tests,
                        args.test_timeout_factor, args.test_timeout_min, mode, args.tests_only)
    if args.list:
        per = collections.Counter(m.module for m in mutants)
        for m in mutants:
            print(f"{m.id}  {m.path}:{m.line}  {m.operator.split('/', 1)[1]}  {m.diff}")
        for mod in args.modules:
            print(f"{mod}: {per[mod]} mutants, skipped {skipped[mod]}", file=sys.stderr)
        print(f"total: {len(mutants)} mutants", file=sys.stderr)
        return 0
    if mode == "fork":
        preload()
    if args.mutant:
        return _one(args, mutants, settings, root)

    wanted = set(args.ids.read_text().split()) if args.ids is not None else set()
    if args.ids is not None and not args.recheck:
        mutants = [m for m in mutants if m.id in wanted]
    chosen = sample(mutants, args.limit)
    triage = load_triage(args.triage)
    kept, previous = _previous_results(args.out, chosen) if args.resume or args.recheck else ([], {})
    if args.recheck:  # run the listed ones again; every other result stays as it was
        kept = [r for r in kept if r["id"] not in wanted]
    if settings.tests_only:  # their campaign's records: the tests-only results keep what the campaign made of them
        settings.earlier = {r["id"]: r for r in previous.get("mutants", []) if r["id"] in wanted}
        killed = sorted(i for i, r in settings.earlier.items() if campaign_outcome(r) == "killed")
        if killed:
            print(f"--tests-only re-checks campaign survivors, but the campaign killed {len(killed)} of the listed "
                  f"mutants in {_rel(args.out)}: {', '.join(killed[:10])}", file=sys.stderr)
            return 2
    done = {r["id"] for r in kept}
    chosen = [m for m in chosen if m.id not in done]
    not_run = []
    if args.skip_equivalent:  # no check can kill them: reported as triaged survivors without running
        not_run = [{**mutant_record(m), "status": "survived", "seconds": 0.0, "not_run": "triaged equivalent"}
                   for m in chosen if triage.get(m.id, {}).get("verdict") == "equivalent"]
        chosen = [m for m in chosen if triage.get(m.id, {}).get("verdict") != "equivalent"]
    t0 = time.perf_counter()
    cmap = _coverage_map(args, root) if settings.tests else {"tests": [], "durations": {}, "lines": {}}
    machines, found = baseline_campaign(settings, tmp, root)
    if found:
        print(f"the clean campaign fails ({found[0]['machine']}: {found[0]['error_type']}: {found[0]['error']}), so every "
              "mutant would look killed: fix that first (or measure a commit: --rev HEAD)", file=sys.stderr)
        return 2
    settings.budget_per_machine = round(args.budget_per_mutant / len(machines), 3)
    print(f"[mutation] {len(chosen)} of {len(mutants)} mutants of {', '.join(args.modules)}"
          + (f" ({len(not_run)} triaged equivalent, not run)" if not_run else "") + f"; {len(machines)} machines at "
          f"{settings.budget_per_machine} s; {args.jobs} jobs ({mode}); baseline campaign clean", file=sys.stderr)
    data = {
        "tool": f"{TOOL} {tool_version()}", "host": socket.gethostname(), "cpus": os.cpu_count(), "jobs": args.jobs,
        "python": platform.python_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python -m benchmarks.mutation " + " ".join(sys.argv[1:] if argv is None else argv),
        "source": args.rev or "working tree", "json": _rel(args.out),
        "settings": {"modules": args.modules, "budget_per_mutant": args.budget_per_mutant,
                     "budget_per_machine": settings.budget_per_machine, "examples_per_slice": args.examples_per_slice,
                     "seed": args.seed, "machines": machines, "device": args.device,
                     "limit": args.limit, "operators": args.operators, "tests": settings.tests,
                     "skip_equivalent": args.skip_equivalent,
                     "test_timeout_factor": args.test_timeout_factor, "test_timeout_min": args.test_timeout_min},
        "coverage_map": {k: cmap.get(k) for k in ("created", "seconds", "jobs")} | {"tests": len(cmap["tests"])},
        "enumerated": {mod: sum(m.module == mod for m in mutants) for mod in args.modules},
        "skipped": skipped,
    }
    if kept:
        data["runs"] = previous.get("runs") or [{k: previous.get(k) for k in ("command", "host", "cpus", "jobs", "started",
                                                                              "wall_s")}]
        print(f"[mutation] resuming: {len(kept)} results kept from {_rel(args.out)}", file=sys.stderr)
    results: list[dict[str, Any]] = kept + not_run
    stop_at = time.monotonic() + args.stop_after if args.stop_after else None
    old_term = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` sends SIGTERM: keep what was done
    try:
        run_mutants(chosen, TestSelector(cmap), settings, args.jobs, machines, tmp, root, args.out, data, results, stop_at)
    except KeyboardInterrupt:
        print(f"\n[mutation] interrupted: {len(results) - len(kept) - len(not_run)} of {len(chosen)} mutants done, "
              "written as incomplete (--resume continues)", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    wall = round(time.perf_counter() - t0, 1)
    if kept:
        data["runs"].append({k: data.get(k) for k in ("command", "host", "cpus", "jobs", "started")} | {"wall_s": wall})
    data.update(wall_s=round(wall + sum((r.get("wall_s") or 0) for r in data.get("runs", [])[:-1]), 1),
                complete=len(results) == len(kept) + len(chosen) + len(not_run), mutants=results)
    data["summary"] = tables(results, triage)
    write_json(args.out, data)
    md_path.write_text(markdown(data, triage, _rel(args.triage)))
    print_tables(data, triage)
    print(f"wrote {_rel(args.out)} and {_rel(md_path)}")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _previous_results(path: Path, chosen: list[Mutant]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Results in an earlier report that still describe one of `chosen` (same id, line and change);
    errors are checked again."""
    try:
        previous = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return [], {}
    now = {m.id: m for m in chosen}
    kept = [r for r in previous.get("mutants", []) if r["id"] in now and r.get("status") != "error"
            and not r.get("not_run") and (r["line"], r["before"], r["after"]) == (now[r["id"]].line, now[r["id"]].before,
                                                                                    now[r["id"]].after)]
    return kept, previous


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    raise SystemExit(main())
