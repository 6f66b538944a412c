"""The campaign's front pages: index.html and summary.md from summary.json's content."""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path


def _tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table both pages show."""
    v = summary["verdict"]
    never = v.get("events_never_reached")
    out = [("Verdict", ["verdict", "clean cache", "bugs detected", "median time to detection", "elapsed",
                        "rare events never reached"],
            [[v.get("status", "-"), "no violation" if v["clean_ok"] else "VIOLATIONS", v["bugs_detected"],
              "-" if v["median_detection_s"] is None else f"{v['median_detection_s']:.1f} s", f"{v['elapsed_s']} s",
              "-" if never is None else ", ".join(never) or "none"]])]
    why = [["failed", x] for x in v.get("failed", [])] + [["not done", x] for x in v.get("not_done", [])]
    if why:
        out.append(("Why the verdict is not PASS", ["", "what"], why))
    if summary["bugs"]:
        out.append(("Seeded-bug detection", ["bug", "class", "detected", "time to detection", "minimized steps",
                                             "1-minimal", "check that fired", "machine", "report"],
                    [[b["name"], str(b["bug_class"]), "yes" if b["detected"] else "NO", f"{b['seconds']:.1f} s",
                      str(b["steps_minimized"] or "-"), ("yes" if b.get("one_minimal") else "no") if b["detected"] else "-",
                      b["invariant"] or "-", b["machine"] or "-", b.get("report") or ""]
                     for b in summary["bugs"]]))
    out.append(("Clean exploration", ["machine", "steps", "seconds", "violations"],
                [[m, str(r["steps"]), f"{r['seconds']:.1f}", str(r["violations"])]
                 for m, r in summary["machines"].items()]
                + [["all", str(summary["clean"]["steps"]), "", str(summary["clean"]["violations"])]]))
    out += _coverage_tables(summary.get("coverage"))
    if summary.get("conformance"):
        out.append(("Conformance targets", ["target", "steps", "disagreements", "note"],
                    [[c["target"], str(c.get("steps", 0)), str(c.get("violations", 0)),
                      c.get("skipped") or c.get("report") or ""] for c in summary["conformance"]]))
    if summary["clean_failures"]:
        out.append(("Clean-cache failures", ["machine", "check", "message", "report"],
                    [[f["machine"], f["invariant"], f["message"], f.get("report", "")] for f in summary["clean_failures"]]))
    if summary["proofs"]:
        by_inv: dict[str, dict[str, str]] = defaultdict(dict)
        transitions: list[str] = []
        for p in summary["proofs"]:
            if p["transition"] not in transitions:
                transitions.append(p["transition"])
            by_inv[p["invariant"]][p["transition"]] = f"{p['status']} ({p['seconds']:.1f}s)"
        nodes = summary["proofs"][0]["nodes"]
        out.append((f"Z3 inductive proofs (trees up to {nodes} nodes)", ["invariant", *transitions],
                    [[inv, *[row.get(t, "") for t in transitions]] for inv, row in by_inv.items()]))
    docs = summary.get("invariant_docs", "")
    if docs:
        out.append(("Invariant docs", ["for reviewers"], [[docs]]))
    if summary["crosshair"]:
        out.append(("CrossHair contracts", ["function", "expected", "status", "seconds"],
                    [[c["function"], c["expect"], c["status"], f"{c['seconds']:.1f}"] for c in summary["crosshair"]]))
    return out


def _coverage_tables(cov: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """Rare events reached, per-module branch coverage and rule counts of the clean exploration."""
    if not cov:
        return []
    desc = cov.get("descriptions", {})
    out = [("Rare events reached by the clean exploration (steps that went through each)",
            ["event", "reached", "what it is"],
            [[name, str(n) if n else "NEVER", desc.get(name, "")] for name, n in cov["events"].items()])]
    if cov.get("detector_errors"):
        out.append(("Event detector errors (an observer bug, not a cache bug)", ["error", "count"],
                    [[k, str(n)] for k, n in cov["detector_errors"].items()]))
    rows = [[m, f"{b['statements_covered']}/{b['statements']}", f"{b['statements_pct']:.1f}%",
             f"{b['branches_covered']}/{b['branches']}", f"{b['branches_pct']:.1f}%", str(b["partial_branches"])]
            for m, b in cov.get("branches", {}).items()]
    out.append(("Coverage of refcache/ by the clean exploration",
                ["module", "statements", "statements %", "branches", "branches %", "partial branches"],
                rows))
    out.append(("How coverage was measured", ["method", "line-by-line report"],
                [[cov.get("measured", ""), cov.get("report", "")]]))
    rules = cov.get("rules", {})
    if rules:
        machines = list(rules)
        names = sorted({r for counts in rules.values() for r in counts})
        out.append(("Rules run per machine (clean exploration)", ["rule", *machines],
                    [[r, *[str(rules[m].get(r, 0)) for m in machines]] for r in names]))
    return out


def write_index(out: Path, summary: dict) -> None:
    tables = _tables(summary)
    e = html.escape

    def cell(c: str) -> str:
        return f'<a href="{e(c)}">{e(c)}</a>' if c.endswith(".html") else e(c)

    body = "".join(
        f"<h2>{e(t)}</h2><table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>"
        + "".join(f"<tr>{''.join(f'<td>{cell(c)}</td>' for c in r)}</tr>" for r in rows) + "</table>"
        for t, head, rows in tables)
    (out / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>refcache verify</title>"
        "<style>body{font-family:sans-serif;max-width:90em;margin:auto} table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .5em;font-size:90%}</style>"
        f"<h1>refcache verify</h1><p>budget {summary['budget_s']} s, seed {summary['seed']}, device "
        f"{e(summary['device'])}</p>{body}")
    md = ["# refcache verify", "", f"budget {summary['budget_s']} s, seed {summary['seed']}, device {summary['device']}"]
    for t, head, rows in tables:
        md += ["", f"## {t}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(c.replace(".html", ".md") if c.endswith(".html") and not c.startswith("coverage/")
                                 else c for c in r) + " |"  # coverage.py's pages are HTML only
               for r in rows]
    (out / "summary.md").write_text("\n".join(md) + "\n")
