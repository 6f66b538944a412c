"""The child side of `benchmarks.mutation`: one kill check of one mutant, inside a sandbox copy of the repo.

A child is either forked from the harness, which preloaded torch, Hypothesis and pytest (so a check
does not pay ~2 s of imports), or started as `python -m benchmarks.mutation_child REQUEST_JSON FD`
(under pytest, whose process already holds the real `refcache` and must not be forked). Either way
it runs with the sandbox as its working directory and first on sys.path, so `refcache` is the
sandbox's (possibly mutated) copy. It reports to the parent in JSON lines on a pipe:
`["step", what, seconds]` whenever something with its own time limit starts (seconds null: the
parent looks the limit up), then one final message (`killed`, `survived`, `error` or `result`).

This module imports nothing of the project at import time: it is imported before the sandbox is on
sys.path (by the harness, and as the `-p` pytest plugin that records test durations for the
coverage map).
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import time
import traceback
from typing import Any

# top-level names of the project: a forked child must not inherit any of them from the harness
PROJECT_MODULES = ("refcache", "campaign", "models", "stateful_tests", "properties", "tests", "conformance",
                   "conftest", "helpers")
DURATIONS_ENV = "REFCACHE_MUTATION_DURATIONS"


class CosmicRayTestingException(Exception):
    """What cosmic-ray's ExceptionReplacer puts in an `except` clause; defined in builtins for the
    mutant (cosmic-ray's own runner does the same), so such a clause catches nothing."""


class Sender:
    """JSON lines to the parent over a pipe."""

    def __init__(self, fd: int):
        self.fd = fd

    def __call__(self, *msg: Any) -> None:
        data = (json.dumps(list(msg), default=str) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]


def enter_sandbox(sandbox: str, repo_root: str | None = None) -> None:
    """Make `sandbox` the project this process imports: cwd, first on sys.path, no bytecode written
    (a mutant and the original often have the same size and mtime second, so a .pyc could be stale)."""
    os.chdir(sandbox)
    drop = {os.path.realpath(p) for p in (repo_root, "") if p is not None}
    sys.path[:] = [sandbox] + [p for p in sys.path if os.path.realpath(p or ".") not in drop and p != sandbox]
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_MODULES]:
        del sys.modules[name]
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    os.environ["REFCACHE_HYPOTHESIS_PROFILE"] = "ci"
    os.environ["REFCACHE_FAILURE_REPORTS"] = os.path.join(sandbox, ".failures")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    builtins.CosmicRayTestingException = CosmicRayTestingException  # type: ignore[attr-defined]


def run(request: dict[str, Any], fd: int) -> None:
    """Run one check; every outcome, including an exception, ends in one final message."""
    send = Sender(fd)
    try:
        if request["phase"] == "campaign":
            _campaign(request, send)
        elif request["phase"] == "tests":
            _tests(request, send)
        else:
            raise ValueError(f"unknown phase {request['phase']!r}")
    except BaseException as e:  # noqa: BLE001 - an exception escaping the check is a finding
        send("error", f"{type(e).__name__}: {e}"[:2000], traceback.format_exc()[-4000:])
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass


def _campaign(req: dict[str, Any], send: Sender) -> None:
    """The clean campaign, short: each machine for about `budget` seconds (`hunt`, in slices of
    `examples` examples), stopping at the first detection unless told to run them all."""
    send("step", "import", req.get("import_s", 120))
    import torch

    torch.set_num_threads(1)
    from campaign.hunt import hunt
    from stateful_tests.machines import MACHINES

    first = [n for n in req.get("machines") or [] if n in MACHINES]
    names = first + [n for n in MACHINES if n not in first]
    send("machines", list(MACHINES))
    found = []
    for name in names:
        send("step", f"campaign:{name}", req["budget"] + req.get("slack", 10.0))
        t0 = time.perf_counter()
        # hunt checks its budget between slices of min(max_examples, 25) examples; a slice of 25
        # takes ~3-6 s, so smaller slices keep a 1 s budget near 1 s
        h = hunt(name, req["seed"], req["budget"], shrink_s=1, max_examples=req.get("examples", 25))
        if req.get("verbose"):
            print(f"[mutation] {name}: {'FOUND ' + h.invariant if h.found else 'nothing'} in {time.perf_counter() - t0:.1f} s"
                  f" ({h.steps_run} steps)", file=sys.stderr, flush=True)
        if h.found:
            found.append({"machine": name, "check": h.invariant, "error": h.error.splitlines()[0][:500] if h.error else "",
                          "error_type": h.error_type, "seconds": round(time.perf_counter() - t0, 2),
                          "program": h.rules[:40]})
            if req.get("stop_first", True):
                break
    send("campaign", found)


class _TestProgress:
    """pytest plugin for a check: announces each test (its time limit is the parent's) and keeps
    the first failure."""

    def __init__(self, send: Sender):
        self.send = send
        self.failed: list[dict[str, str]] = []

    def pytest_collection_finish(self, session: Any) -> None:
        self.send("collected", len(session.items))

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self.send("step", nodeid, None)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed and not self.failed:
            self.failed.append({"test": report.nodeid, "when": report.when,
                                "error": str(getattr(report, "longreprtext", ""))[-1500:]})

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed and not self.failed:
            self.failed.append({"test": report.nodeid or "<collection>", "when": "collect",
                                "error": str(getattr(report, "longreprtext", ""))[-1500:]})


def _tests(req: dict[str, Any], send: Sender) -> None:
    """`pytest -x -q -p no:cacheprovider IDS` in this process, in the order given (fastest first)."""
    send("step", "collect", req.get("collect_s", 180))
    import torch

    torch.set_num_threads(1)
    import pytest

    plugin = _TestProgress(send)
    args = ["-p", "no:cacheprovider", "-p", "no:randomly", *req.get("pytest_args", ["-x", "-q"]), *req["ids"]]
    rc = pytest.main(args, plugins=[plugin])
    send("result", int(rc), plugin.failed[:1])


# --------------------------------------------------------------- pytest plugin for the mapping run
_durations: dict[str, float] = {}
_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report: Any) -> None:
    """Per-test wall time (setup + call + teardown) and outcome, for the coverage map's run."""
    if not os.environ.get(DURATIONS_ENV):
        return
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if report.failed or (report.when == "call" and report.skipped) or report.nodeid not in _outcomes:
        _outcomes[report.nodeid] = "failed" if report.failed else "skipped" if report.skipped else "passed"


def pytest_sessionfinish(session: Any) -> None:
    out = os.environ.get(DURATIONS_ENV)
    if not out or hasattr(session.config, "workerinput"):  # xdist workers: their reports reach the controller
        return
    with open(out, "w") as f:
        json.dump({"durations": _durations, "outcomes": _outcomes}, f)


def main(argv: list[str] | None = None) -> int:
    """Spawn mode: `python -m benchmarks.mutation_child REQUEST_JSON FD`, cwd = the sandbox."""
    argv = sys.argv[1:] if argv is None else argv
    request, fd = json.loads(argv[0]), int(argv[1])
    enter_sandbox(request["sandbox"], request.get("repo_root"))
    run(request, fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
