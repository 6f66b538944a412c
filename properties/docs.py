"""Invariant pages for reviewers, generated from the registry.

Two products. The committed reference, `docs/invariants.md`: every invariant's id, family,
statement, predicate, Z3 encoding, the transitions its proof covers and the bugs it guards
against, with nothing that depends on a run (no dates, no timings), so a test can demand that
the file equals what the generator writes now (properties/test_docs.py):

    python -m properties.docs --write docs/invariants.md     # regenerate
    python -m properties.docs --check docs/invariants.md     # exit 1 when it is stale

And a run's pages, with that run's figures (never committed: `refcache verify` writes them
into its report folder):

`python -m properties.docs [--out reports/invariants] [--proofs rows.json | --nodes N]
[--campaign reports/out/summary.json] [--crosshair] [--replay]` writes `index.md` and
`index.html` (one section per invariant: statement, the Python predicate, the Z3 encoding and
one instance of it as Z3 prints it, which tests and proofs check it, its status, its bug history)
and one `<ID>.md` per invariant. `generate(...)` is the same as a function.

Status inputs: proof rows (properties.prove.run_all or `prove --json`), the number of stateful
steps checked (a campaign summary's clean.steps, or a JSON {"steps": K} / {"invariants": {id: K}}),
CrossHair rows and replay results (properties.crosshair_checks.run, properties.replay.replay_all).
"""

from __future__ import annotations

import argparse
import html
import inspect
import json
import re
import sys
import time
from pathlib import Path

import z3

from refcache import invariants as inv_mod

from .encodings import ENCODINGS, LEMMAS
from .registry import BUGS, INVARIANTS, LEMMA_STATEMENTS, Invariant
from .symbolic import Z3, fresh_state
from .transitions import TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent
TEST_DIRS = ("tests", "stateful_tests", "gpu_tests", "properties")
GENERAL_CHECKS = (
    "every unit test's teardown: conftest.make_cache runs check_invariants(check_data=True) on each cache it made",
    "stateful machines (stateful_tests/machines.py): invariants_hold runs refcache.invariants.check_all after every step",
    "campaign random walks (campaign/random_walk.py): check_invariants after every step",
)


def checking_tests(ids: list[str], root: Path = ROOT) -> dict[str, list[str]]:
    """Test functions whose source names each invariant id: {id: ['path::test', ...]}."""
    out: dict[str, list[str]] = {i: [] for i in ids}
    pat = {i: re.compile(rf"\b{re.escape(i)}\b") for i in ids}
    for d in TEST_DIRS:
        for f in sorted((root / d).glob("test_*.py")):
            src = f.read_text()
            for m in re.finditer(r"^(?:async )?def (test_\w+)\(.*?(?=^\S|\Z)", src, re.M | re.S):
                for i, p in pat.items():
                    if p.search(m.group(0)):
                        out[i].append(f"{f.relative_to(root)}::{m.group(1)}")
    return out


def z3_instance(inv_id: str) -> str:
    """The encoding for one cache node and one operation, as Z3 prints it (simplified).

    Simplified in a fresh Z3 context: the order of a simplified term's arguments follows the ids
    of its parts in their context, so in the global one it would depend on what ran before (a
    proof, say), and the committed reference would look stale after it."""
    f = ENCODINGS[inv_id] if inv_id in ENCODINGS else LEMMAS[inv_id]
    s = fresh_state(2, 1, "s")
    term = f(Z3, s)
    if isinstance(term, bool):
        return str(term)
    text = str(z3.simplify(term.translate(z3.Context())))
    return re.sub(r"s\.(\w+)(\[\d\]|<\d>)?", lambda m: m.group(1) + (m.group(2) or ""), text)


def _source_of(fn) -> tuple[str, int]:
    lines, start = inspect.getsourcelines(fn)
    return "".join(lines), start


def _status(inv: Invariant, proofs: list[dict] | None, steps: dict | None) -> list[str]:
    out = []
    if inv.structural:
        rows = [r for r in (proofs or []) if r["invariant"] == inv.id and r.get("bug") is None]
        if rows:
            n = max(r["nodes"] for r in rows)
            secs = sum(r["seconds"] for r in rows)
            bad = [r for r in rows if r["status"] != "proved"]
            if bad:
                out.append(f"NOT proved: {len(bad)} of {len(rows)} transitions ("
                           + ", ".join(f"{r['transition']}: {r['status']}" for r in bad) + f"), trees up to {n} nodes")
            else:
                out.append(f"proved inductive over {len(rows)} transitions for every tree of up to {n} nodes "
                           f"in {secs:.1f} s (Z3 {z3.get_version_string()})")
        else:
            out.append("proof not run for this report")
    else:
        out.append("not structural: checked by its predicate only (no Z3 encoding)")
    k = None
    if steps:
        k = steps.get("invariants", {}).get(inv.id, steps.get("steps"))
    out.append(f"checked in {k} stateful steps" if k is not None else "stateful steps: not given to this report")
    return out


def sections(proofs: list[dict] | None = None, steps: dict | None = None, crosshair: list[dict] | None = None,
             replays: list[dict] | None = None) -> list[dict]:
    """The structured content of every section (rendered to Markdown and HTML)."""
    named = checking_tests(list(INVARIANTS))
    out = []
    for inv in INVARIANTS.values():
        pred = inv.predicate
        psrc, pline = _source_of(pred)
        sec = dict(id=inv.id, title=inv.title, group=inv.group, statement=inv.statement,
                   predicate=f"refcache.invariants.{pred.__name__}", predicate_where=f"refcache/invariants.py:{pline}",
                   predicate_doc=" ".join((pred.__doc__ or "").split()), predicate_source=psrc)
        if inv.z3 is not None:
            zsrc, zline = _source_of(inv.z3)
            sec.update(z3=f"properties.encodings.{inv.z3.__name__}", z3_where=f"properties/encodings.py:{zline}",
                       z3_doc=" ".join((inv.z3.__doc__ or "").split()), z3_source=zsrc, z3_instance=z3_instance(inv.id))
        checks = list(GENERAL_CHECKS)
        if inv.structural:
            checks.append(f"Z3 (properties.prove): preserved by each of the {len(TRANSITIONS)} transitions "
                          f"({', '.join(TRANSITIONS)})")
            checks.append("drift guard (properties.drift.check_step): concrete steps of the suite against the same relation")
        if inv.id == "S1":
            checks.append("CrossHair (properties.crosshair_checks): chain hashes depend on the parent; key split, match length")
        checks += [f"test {t}" for t in named[inv.id]]
        sec["checks"] = checks
        sec["status"] = _status(inv, proofs, steps)
        hist = []
        for b in inv.bugs:
            line = f"{b.id}: {b.title}"
            if b.upstream:
                line += f" (upstream: {b.upstream})"
            if b.seeded:
                line += f"; seeded as {', '.join(b.seeded)}"
            for r in proofs or []:
                if r.get("bug") in b.seeded + ((b.z3_mutant,) if b.z3_mutant else ()) and r["invariant"] == inv.id:
                    line += f"; Z3 {r['status']} via {r['transition']} (N={r['nodes']})"
            for r in replays or []:
                if r["bug"] in b.seeded and r["invariant"] == inv.id:
                    line += (f"; replayed as {r['steps']} HiCache calls ({r['transition']}): "
                             f"{'fails on the bug, passes clean' if r['reproduced'] else 'NOT reproduced'}")
            hist.append(line)
        sec["bugs"] = hist or ["no recorded bug yet"]
        out.append(sec)
    return out


def render_md(secs: list[dict], meta: dict) -> str:
    md = ["# refcache invariants", "", f"Generated {meta['when']} from properties/registry.py "
          "(statement, predicate and Z3 encoding are declared once there). DESIGN.md §3.", ""]
    md += ["| id | group | statement | status |", "|---|---|---|---|"]
    md += [f"| [{s['id']}](#{s['id'].lower()}) | {s['group']} | {s['statement']} | {s['status'][0]} |" for s in secs]
    for s in secs:
        md += ["", section_md(s)]
    if meta.get("lemmas"):
        md += ["", "## Strengthening lemmas", "", "Proved inductive together with the invariants (facts the code relies on):", ""]
        md += [f"- **{k}**: {v}" for k, v in meta["lemmas"].items()]
    if meta.get("crosshair"):
        md += ["", "## CrossHair contracts", "", "| function | status | expected | seconds | counterexample |",
               "|---|---|---|---|---|"]
        md += [f"| `{r['function']}` | {r['status']} | {r['expect']} | {r['seconds']} | {r['counterexample'] or ''} |"
               for r in meta["crosshair"]]
    return "\n".join(md) + "\n"


def section_md(s: dict) -> str:
    md = [f"## {s['id']}", "", f"**{s['id']} — {s['title']}** ({s['group']})", "", f"**Statement.** {s['statement']}", "",
          f"**Predicate.** `{s['predicate']}` ({s['predicate_where']}): {s['predicate_doc']}", ""]
    if "z3" in s:
        md += [f"**Z3 encoding.** `{s['z3']}` ({s['z3_where']}): {s['z3_doc']}", "", "```python", s["z3_source"].rstrip(),
               "```", "", "For one cache node (slot 1; slot 0 is the root) and one operation, Z3 prints it as:", "",
               "```", s["z3_instance"], "```", ""]
    else:
        md += ["**Z3 encoding.** none (not a structural invariant).", ""]
    md += ["**Checked by.**", ""] + [f"- {c}" for c in s["checks"]] + [""]
    md += ["**Status.**", ""] + [f"- {c}" for c in s["status"]] + [""]
    md += ["**Bug history.**", ""] + [f"- {b}" for b in s["bugs"]]
    return "\n".join(md)


def render_html(secs: list[dict], meta: dict) -> str:
    e = html.escape
    parts = ["<!doctype html><meta charset=utf-8><title>refcache invariants</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
             "pre{background:#f4f4f4;padding:.6em;overflow-x:auto;font-size:85%}td,th{border:1px solid #ccc;padding:.3em}"
             "table{border-collapse:collapse}.bad{color:#a00}</style>",
             "<h1>refcache invariants</h1>",
             f"<p>Generated {e(meta['when'])} from <code>properties/registry.py</code>. DESIGN.md §3.</p>",
             "<table><tr><th>id</th><th>group</th><th>statement</th><th>status</th></tr>"]
    for s in secs:
        cls = ' class="bad"' if s["status"][0].startswith("NOT") else ""
        parts.append(f"<tr><td><a href='#{e(s['id'])}'>{e(s['id'])}</a></td><td>{e(s['group'])}</td>"
                     f"<td>{e(s['statement'])}</td><td{cls}>{e(s['status'][0])}</td></tr>")
    parts.append("</table>")
    for s in secs:
        parts.append(f"<h2 id='{e(s['id'])}'>{e(s['id'])} — {e(s['title'])} <small>({e(s['group'])})</small></h2>")
        parts.append(f"<p><b>Statement.</b> {e(s['statement'])}</p>")
        parts.append(f"<p><b>Predicate.</b> <code>{e(s['predicate'])}</code> ({e(s['predicate_where'])}): "
                     f"{e(s['predicate_doc'])}</p>")
        if "z3" in s:
            parts.append(f"<p><b>Z3 encoding.</b> <code>{e(s['z3'])}</code> ({e(s['z3_where'])}): {e(s['z3_doc'])}</p>")
            parts.append(f"<pre>{e(s['z3_source'])}</pre><p>One cache node and one operation, as Z3 prints it:</p>")
            parts.append(f"<pre>{e(s['z3_instance'])}</pre>")
        else:
            parts.append("<p><b>Z3 encoding.</b> none (not a structural invariant).</p>")
        for title, key in (("Checked by", "checks"), ("Status", "status"), ("Bug history", "bugs")):
            parts.append(f"<p><b>{title}.</b></p><ul>" + "".join(f"<li>{e(x)}</li>" for x in s[key]) + "</ul>")
    if meta.get("lemmas"):
        parts.append("<h2>Strengthening lemmas</h2><ul>" + "".join(
            f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in meta["lemmas"].items()) + "</ul>")
    if meta.get("crosshair"):
        parts.append("<h2>CrossHair contracts</h2><table><tr><th>function</th><th>status</th><th>expected</th>"
                     "<th>seconds</th><th>counterexample</th></tr>" + "".join(
                         f"<tr><td><code>{e(r['function'])}</code></td><td>{e(r['status'])}</td><td>{e(r['expect'])}</td>"
                         f"<td>{r['seconds']}</td><td>{e(r['counterexample'] or '')}</td></tr>" for r in meta["crosshair"])
                     + "</table>")
    return "\n".join(parts) + "\n"


REFERENCE = "docs/invariants.md"
REGENERATE = f"python -m properties.docs --write {REFERENCE}"
FAMILIES = {"Structure": "the shape of the radix tree", "Tiers": "which tier may hold what, and who pins it",
            "Resources": "slots and the sizes kept about them",
            "Transfers": "operations in flight and their pool transfers", "Data": "the bytes themselves"}


def _para(text: str) -> str:
    return " ".join(text.split())


def reference_md() -> str:
    """The committed invariant reference (docs/invariants.md): deterministic, from the registry,
    the predicates, the encodings and the transitions, so it is stale exactly when they changed."""
    by_family: dict[str, list[Invariant]] = {}
    for inv in INVARIANTS.values():
        by_family.setdefault(inv.group, []).append(inv)
    md = ["# Invariant reference", "",
          f"<!-- Generated from properties/ by `{REGENERATE}`. Do not edit by hand: "
          "properties/test_docs.py fails when this file differs from what the generator writes. -->", "",
          "Each invariant is declared once, in [`properties/registry.py`](../properties/registry.py): an id, a "
          "statement, the Python predicate that `HiCache.check_invariants()` and every stateful machine run, and, "
          "for structural invariants, a Z3 encoding that is proved inductive over every transition of the cache. "
          f"This page is generated from those declarations (`{REGENERATE}`); the reasoning behind them is in "
          "[design.md](design.md#invariants).", "",
          "The figures of a particular run (proved for trees of up to N nodes, checked in K stateful steps) are "
          "not here, because they depend on the run: `refcache verify` writes them into its report folder "
          "(`invariants/index.md`).", "",
          "| id | family | invariant | statement | Z3 |", "|---|---|---|---|---|"]
    md += [f"| [{i.id}](#{i.id.lower()}) | {i.group} | {i.title} | {_para(i.statement)} | "
           f"{'proved inductive' if i.structural else 'predicate only'} |" for i in INVARIANTS.values()]
    for fam, invs in by_family.items():
        md += ["", f"## {fam}", "", f"Invariants about {FAMILIES.get(fam, fam.lower())}."]
        for inv in invs:
            md += ["", _reference_section(inv)]
    md += ["", "## Strengthening lemmas", "",
           "Facts the code relies on, proved inductive together with the invariants (an invariant alone is often "
           "not inductive: the proof needs these to rule out states the cache never reaches). Encoded in "
           "[`properties/encodings.py`](../properties/encodings.py).", ""]
    md += [f"- **{k}**: {v}" for k, v in LEMMA_STATEMENTS.items()]
    md += ["", "## Transitions", "",
           f"The {len(TRANSITIONS)} transitions of [`properties/transitions.py`](../properties/transitions.py), each "
           "transcribed from the code in `refcache/`. For every structural invariant and every transition, "
           "`python -m properties.prove` asks Z3 whether a state satisfying all invariants and lemmas can step to "
           "one that breaks the invariant; *proved* means no such state exists among trees of up to N nodes.", "",
           "| transition | the cache call | what it models |", "|---|---|---|"]
    md += [f"| `{t.name}` | `{t.api}` | {t.doc.replace('|', '/')} |" for t in TRANSITIONS.values()]
    md += ["", "## Bug catalogue", "",
           "The bugs the registry records, with the invariants that catch each (seeded bugs are in "
           "[`stateful_tests/seeded_bugs.py`](../stateful_tests/seeded_bugs.py); Z3 mutants in "
           "`properties/transitions.py`).", "", "| bug | what goes wrong | caught by | seeded as | Z3 mutant |",
           "|---|---|---|---|---|"]
    md += [f"| {b.id} | {b.title} | {', '.join(b.invariants) or 'the model (no invariant)'} | "
           f"{', '.join(f'`{x}`' for x in b.seeded) or '-'} | {f'`{b.z3_mutant}`' if b.z3_mutant else '-'} |"
           for b in BUGS.values()]
    return "\n".join(md) + "\n"


def _reference_section(inv: Invariant) -> str:
    pred = inv.predicate
    md = [f"### {inv.id}", "", f"**{inv.id} — {inv.title}** ({inv.group})", "", f"**Statement.** {_para(inv.statement)}", "",
          f"**Predicate.** [`refcache.invariants.{pred.__name__}`](../refcache/invariants.py): "
          f"{_para(pred.__doc__ or '')}", ""]
    if inv.z3 is not None:
        zsrc, _ = _source_of(inv.z3)
        md += [f"**Z3 encoding.** [`properties.encodings.{inv.z3.__name__}`](../properties/encodings.py): "
               f"{_para(inv.z3.__doc__ or '')}", "", "```python", zsrc.rstrip(), "```", "",
               "For one cache node (slot 1; slot 0 is the root) and one operation slot, Z3 sees:", "",
               "```", z3_instance(inv.id), "```", "",
               f"**Proof.** Inductive over each of the {len(TRANSITIONS)} transitions (see [Transitions](#transitions)), "
               "together with the other invariants and the lemmas: `python -m properties.prove --nodes 6`.", ""]
    else:
        md += ["**Z3 encoding.** None: not structural (it is about liveness or bytes), so it is checked by its "
               "predicate only.", ""]
    checks = list(GENERAL_CHECKS)
    if inv.structural:
        checks.append("drift guard (`properties.drift.check_step`): concrete steps of the suite are checked against "
                      "the same transition relation, so the encoding cannot drift from the code")
    if inv.id == "S1":
        checks.append("CrossHair (`properties.crosshair_checks`): chain hashes depend on the parent; key split, "
                      "match length")
    md += ["**Also checked by.**", ""] + [f"- {c}" for c in checks] + [""]
    bugs = [f"{b.id}: {b.title}" + (f" (seeded as {', '.join(f'`{x}`' for x in b.seeded)})" if b.seeded else "")
            + (f" (Z3 mutant `{b.z3_mutant}`)" if b.z3_mutant else "") + (f"; upstream: {b.upstream}" if b.upstream else "")
            for b in inv.bugs]
    md += ["**Bugs it catches.**", ""] + ([f"- {b}" for b in bugs] or ["- none recorded yet"])
    return "\n".join(md)


def write_reference(path: str | Path = REFERENCE) -> Path:
    path = ROOT / path if not Path(path).is_absolute() else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reference_md())
    return path


def load_steps(path: str | Path | None) -> dict | None:
    """Stateful step counts from a campaign summary ({'clean': {'steps': K}}) or {'steps': K, 'invariants': {...}}."""
    if not path:
        return None
    data = json.loads(Path(path).read_text())
    if "clean" in data and "steps" in data["clean"]:
        return {"steps": data["clean"]["steps"]}
    return {k: data[k] for k in ("steps", "invariants") if k in data}


def generate(out: str | Path = "reports/invariants", proofs: list[dict] | None = None, steps: dict | None = None,
             crosshair: list[dict] | None = None, replays: list[dict] | None = None) -> list[Path]:
    """Write index.md, index.html and <ID>.md under `out`; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    secs = sections(proofs, steps, crosshair, replays)
    meta = dict(when=time.strftime("%Y-%m-%d %H:%M:%S"), lemmas=LEMMA_STATEMENTS, crosshair=crosshair)
    written = [out / "index.md", out / "index.html"]
    written[0].write_text(render_md(secs, meta))
    written[1].write_text(render_html(secs, meta))
    for s in secs:
        p = out / f"{s['id']}.md"
        p.write_text(section_md(s) + "\n")
        written.append(p)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m properties.docs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="reports/invariants")
    ap.add_argument("--proofs", help="proof rows JSON (python -m properties.prove --json FILE); else proofs are run")
    ap.add_argument("--nodes", type=int, default=4, help="tree size for proofs run here (default 4)")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for proofs run here")
    ap.add_argument("--no-proofs", action="store_true")
    ap.add_argument("--campaign", help="campaign summary JSON with the stateful step count")
    ap.add_argument("--crosshair", action="store_true", help="run CrossHair (about 30 s) and include its table")
    ap.add_argument("--replay", action="store_true", help="replay each seeded bug's counterexample and include it")
    ap.add_argument("--write", metavar="PATH", help=f"write the committed reference (e.g. {REFERENCE}) and stop")
    ap.add_argument("--check", metavar="PATH", help="exit 1 when the reference at PATH differs from what --write writes")
    a = ap.parse_args(argv)
    if a.write:
        print(f"wrote {write_reference(a.write)}")
        return 0
    if a.check:
        path = ROOT / a.check if not Path(a.check).is_absolute() else Path(a.check)
        if not path.exists() or path.read_text() != reference_md():
            print(f"{a.check} is stale: run `python -m properties.docs --write {a.check}`")
            return 1
        print(f"{a.check} is up to date")
        return 0
    proofs = None
    if a.proofs:
        proofs = json.loads(Path(a.proofs).read_text())
    elif not a.no_proofs:
        from .prove import run_all

        proofs = run_all(a.nodes, a.budget, bugs=True)
    cross = None
    if a.crosshair:
        from .crosshair_checks import run

        cross = run(30.0)
    replays = None
    if a.replay:
        from .replay import replay_all

        replays = [r.as_dict() for r in replay_all()]
    paths = generate(a.out, proofs, load_steps(a.campaign), cross, replays)
    print(f"wrote {len(paths)} files under {a.out}/ ({paths[0].name}, {paths[1].name}, one page per invariant)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["generate", "sections", "checking_tests", "z3_instance", "inv_mod", "reference_md", "write_reference"]
