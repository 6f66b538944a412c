"""`refcache verify`: run the verification campaign within a time budget and write reports."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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
    v = sub.add_parser("verify", help="run the verification campaign and write reports")
    v.add_argument("--budget", type=float, default=120.0, help="seconds to spend (default 120)")
    v.add_argument("--bugs", type=_bugs, default=[], metavar="none|all|NAME,...",
                   help="seeded bugs to hunt (default none)")
    v.add_argument("--out", type=Path, default=Path("reports/out"), help="report folder (default reports/out)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default=os.environ.get("REFCACHE_DEVICE", "cpu"), choices=["cpu", "cuda"])
    v.add_argument("--nodes", type=int, default=5,
                   help="tree size bound for the Z3 proofs (default 5: all of them in about 35 s on one core)")
    v.add_argument("--target", action="append", default=[], metavar="NAME",
                   help="also run the conformance machine against a target (repeatable; e.g. sglang-radix)")
    v.add_argument("--no-proofs", action="store_true", help="skip the Z3 proofs")
    v.add_argument("--no-crosshair", action="store_true", help="skip the CrossHair checks")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    os.environ["REFCACHE_DEVICE"] = args.device  # the machines read it
    if args.target:
        from conformance.runner import TARGETS

        unknown = [t for t in args.target if t not in TARGETS]
        if unknown:
            p.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    from .verify import verify

    return verify(args.budget, args.out, args.seed, args.bugs, args.device, args.nodes,
                  proofs=not args.no_proofs, crosshair=not args.no_crosshair, targets=args.target)


if __name__ == "__main__":
    sys.exit(main())
