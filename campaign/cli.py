"""`refcache verify`: run the verification campaign within a time budget and write reports."""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from pathlib import Path

from .random_walk import CONFIGS, run_walk, small_config


def verify(budget: float, out: Path, seed: int, device: str, steps_per_walk: int = 300) -> int:
    """Random walks over every configuration, round-robin, until the budget is spent."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    per_config = {name: {"steps": 0, "walks": 0, "violations": []} for name in CONFIGS}
    s = seed
    total = 0
    while time.monotonic() < deadline:
        for name in CONFIGS:
            if time.monotonic() >= deadline:
                break
            res = run_walk(small_config(name, device), s, steps_per_walk)
            rec = per_config[name]
            rec["steps"] += res.steps
            rec["walks"] += 1
            total += res.steps
            if res.violations:
                rec["violations"].append({"seed": s, "violations": [str(v) for v in res.violations],
                                          "steps": res.log})
            left = max(0.0, deadline - time.monotonic())
            print(f"\r[verify] {total:>8} steps  {sum(len(r['violations']) for r in per_config.values())} failing walks"
                  f"  {left:5.0f}s left  ({name}, seed {s})      ", end="", file=sys.stderr, flush=True)
        s += 1
    print(file=sys.stderr)
    n_viol = sum(len(r["violations"]) for r in per_config.values())
    summary = {"clean": {"steps": total, "violations": n_viol}, "proofs": [], "bugs": [],
               "machines": per_config, "device": device, "seed": seed, "budget_s": budget}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{r['walks']}</td><td>{r['steps']}</td>"
                   f"<td>{len(r['violations'])}</td></tr>" for n, r in per_config.items())
    fails = "".join(f"<h3>{html.escape(n)} seed {v['seed']}</h3><pre>{html.escape(chr(10).join(v['violations']))}"
                    f"\n\n{html.escape(chr(10).join(v['steps'][-20:]))}</pre>"
                    for n, r in per_config.items() for v in r["violations"])
    (out / "index.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>refcache verify</title><h1>refcache verify</h1>"
        f"<p>{total} steps on {device}, {n_viol} failing walks.</p><table border=1>"
        f"<tr><th>machine</th><th>walks</th><th>steps</th><th>failing</th></tr>{rows}</table>{fails}")
    md = ["# refcache verify", "", f"{total} steps on {device}, {n_viol} failing walks.", "",
          "| machine | walks | steps | failing |", "|---|---|---|---|"]
    md += [f"| {n} | {r['walks']} | {r['steps']} | {len(r['violations'])} |" for n, r in per_config.items()]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print(f"[verify] {total} steps, {n_viol} failing walks; reports in {out}/")
    return 0 if n_viol == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="refcache", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="run the verification campaign and write reports")
    v.add_argument("--budget", type=float, default=120.0, help="seconds to spend (default 120)")
    v.add_argument("--out", type=Path, default=Path("reports/out"), help="report folder (default reports/out)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    return verify(args.budget, args.out, args.seed, args.device)


if __name__ == "__main__":
    sys.exit(main())
