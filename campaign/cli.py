"""`refcache verify`: run the verification campaign within a time budget and write reports.

With no flags it shows the whole product: the Z3 proofs for trees up to 6 nodes, the CrossHair
contracts, a hunt for every seeded bug, and clean exploration of every machine, on every core,
within 300 s (enough on a 2-core machine). Verdict and exit status: PASS (0) only when every
proof ran and held, every chosen bug was found and the clean cache showed no violation; FAIL (1)
when a check failed; INCOMPLETE (3) when nothing failed but some work was not done (it says
what); 2 is a usage error."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .workers import default_jobs

DEFAULT_BUDGET_S = 300.0


def _bugs(arg: str) -> list[str]:
    from stateful_tests.seeded_bugs import SEEDED_BUGS

    if arg == "none":
        return []
    if arg == "all":
        return list(SEEDED_BUGS)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in SEEDED_BUGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown seeded bugs {unknown}; known: {', '.join(SEEDED_BUGS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="refcache", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="run the verification campaign and write reports", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock seconds to spend (default {DEFAULT_BUDGET_S:.0f}: every proof and every seeded bug "
                        "on a 2-core machine, the rest of the time exploring the clean cache)")
    v.add_argument("--bugs", type=_bugs, default="all", metavar="none|all|NAME,...",
                   help="seeded bugs to hunt (default all)")
    v.add_argument("--jobs", type=int, default=default_jobs(),
                   help=f"worker processes (default: all cores, {default_jobs()} here); 1 runs everything in this process")
    v.add_argument("--out", type=Path, default=Path("reports/out"), help="report folder (default reports/out)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default=os.environ.get("REFCACHE_DEVICE", "cpu"), choices=["cpu", "cuda"])
    v.add_argument("--nodes", type=int, default=6,
                   help="tree size bound for the Z3 proofs (default 6: all 522 in about 50 s of one core)")
    v.add_argument("--target", action="append", default=[], metavar="NAME",
                   help="also run the conformance machine against a target (repeatable; e.g. sglang-radix)")
    v.add_argument("--cluster", metavar="ADDRESS",
                   help="run the tasks on a Dask cluster: a scheduler address (tcp://host:8786) or local:N for N "
                        "local worker processes; --jobs is then the cluster's thread count (needs the cluster extra)")
    v.add_argument("--no-proofs", action="store_true", help="skip the Z3 proofs")
    v.add_argument("--no-crosshair", action="store_true", help="skip the CrossHair checks")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    os.environ["REFCACHE_DEVICE"] = args.device  # the machines read it
    if args.target:
        from conformance.runner import TARGETS

        unknown = [t for t in args.target if t not in TARGETS]
        if unknown:
            p.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    from .cluster import ClusterError
    from .verify import verify

    try:
        return verify(args.budget, args.out, args.seed, args.bugs, args.device, args.nodes,
                      proofs=not args.no_proofs, crosshair=not args.no_crosshair, targets=args.target, jobs=args.jobs,
                      cluster=args.cluster)
    except ClusterError as e:
        p.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
