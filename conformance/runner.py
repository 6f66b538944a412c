"""Run the conformance machine against a target for a time budget: `run_target`, and its CLI.

    python -m conformance.runner --target sglang-radix --budget 30 [--seed 0] [--json]
    python -m conformance.runner --all --budget 20
    python -m conformance.runner --list

A process can hold one sglang version, so a target needing a version other than the one this
process has loaded runs in a child process (same function, JSON back).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import replace

from hypothesis import HealthCheck, settings
from hypothesis import seed as hseed
from hypothesis.internal.conjecture import engine
from hypothesis.reporting import with_reporter
from hypothesis.stateful import get_state_machine_test

from .machine import ConformanceMachine, format_calls, machine_for, minimize, replay
from .targets import TargetSpec
from .targets import refcache as refcache_targets
from .targets import sglang as sglang_targets
from .targets import vllm as vllm_targets
from .targets.sglang import shim


def _merge(*registries: dict[str, TargetSpec]) -> dict[str, TargetSpec]:
    """One table of every engine's targets; a name registered twice is an error, not a silent override."""
    out: dict[str, TargetSpec] = {}
    for reg in registries:
        for name, spec in reg.items():
            if name in out:
                raise ValueError(f"target {name!r} is registered twice")
            out[name] = spec
    return out


# One registry per engine folder under conformance/targets/; a new engine adds its TARGETS here.
TARGETS: dict[str, TargetSpec] = _merge(refcache_targets.TARGETS, sglang_targets.TARGETS, vllm_targets.TARGETS)


def target_names() -> list[str]:
    return list(TARGETS)


def unavailable_reason(name: str) -> str:
    """'' when `name` can run here, else why not (one sentence)."""
    spec = TARGETS[name]
    if spec.requires:
        mod, _, fn = spec.requires.partition(":")
        return getattr(importlib.import_module(mod), fn)()
    if spec.sglang is None:
        return ""
    return shim.missing_reason(spec.sglang)


def available_targets() -> list[str]:
    return [n for n in TARGETS if not unavailable_reason(n)]


def make_factory(name: str):
    spec = TARGETS[name]
    obj = spec.resolve()
    return lambda: obj(*spec.args)


def needs_own_process(name: str) -> bool:
    """Whether target `name` cannot run in this process: it needs another sglang version than the
    one loaded here, or sglang modules for real that this process already imported as stand-ins
    (a pytest worker that ran other targets first). Building the target once tells."""
    need, have = TARGETS[name].sglang, shim.loaded()
    if need is None or have is None:
        return False
    if have.version != need:
        return True
    try:
        make_factory(name)().close()
    except shim.ShimError as e:
        if "own process" in str(e):
            return True
        raise
    return False


def _with_base(cls: type[ConformanceMachine], name: str) -> type[ConformanceMachine]:
    """`cls` (built by machine_for) rebased on the target's own machine class, where it has one."""
    spec = TARGETS[name]
    if spec.machine is None:
        return cls
    mod, _, attr = spec.machine.partition(":")
    base = getattr(importlib.import_module(mod), attr)
    return type(cls.__name__, (base,), {"FACTORY": staticmethod(cls.FACTORY)})


def machine(name: str) -> type[ConformanceMachine]:
    return _with_base(machine_for(make_factory(name), name), name)


def _settings(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large], print_blob=False)


def _run_here(name: str, budget_s: float, seed: int | None, steps_per_example: int = 40,
              shrink_s: float | None = None) -> dict:
    cls = machine(name)
    cls.steps_run = 0
    s = random.randrange(2**32) if seed is None else seed
    first_seed = s
    deadline = time.monotonic() + budget_s
    t0 = time.monotonic()
    # Shrinking is capped (Hypothesis' own cap is 300 s), so a bounded run stays bounded.
    if shrink_s is None:
        shrink_s = float(os.environ.get("CONFORMANCE_SHRINK_S", min(120, max(45, budget_s))))
    saved, engine.MAX_SHRINKING_SECONDS = engine.MAX_SHRINKING_SECONDS, max(1, int(shrink_s))
    try:
        report, examples, s = _explore(name, cls, s, deadline, steps_per_example, shrink_s)
    finally:
        engine.MAX_SHRINKING_SECONDS = saved  # other Hypothesis tests in this process keep theirs
    return {"target": name, "steps": cls.steps_run, "violations": 0 if report is None else 1,
            "failure_report": report, "seed": first_seed, "examples": examples,
            "elapsed_s": round(time.monotonic() - t0, 2), "sglang": TARGETS[name].sglang}


def _explore(name, cls, s, deadline, steps_per_example, shrink_s):
    report, examples = None, 0
    while time.monotonic() < deadline and report is None:
        out = io.StringIO()
        test = hseed(s)(get_state_machine_test(cls, settings=_settings(10, steps_per_example)))
        try:
            with with_reporter(lambda m, out=out, cap=shrink_s: out.write(_honest(str(m), cap) + "\n")):
                test()
        except Exception as e:  # a disagreement, a crash inside the target, or a flaky replay
            report = f"target {name}, seed {s}:\n" + describe(e) + out.getvalue()
            small = minimize(cls, list(cls.last_calls), min(20.0, shrink_s)) if cls.last_calls else None
            if small is not None:
                calls, err = small
                report = (f"target {name}, seed {s}: minimized to {len(calls)} operations (replayable with "
                          f"conformance.machine.replay):\n{format_calls(calls)}\n{type(err).__name__}: {err}\n\n"
                          f"--- as Hypothesis reported it:\n{report}")
        examples += 10
        s += 1
    return report, examples, s


def _honest(message: str, cap_s: float) -> str:
    """Hypothesis says it "spent more than five minutes" shrinking whenever its cap fires, and
    our cap is much shorter: say what happened instead."""
    if "spent more than five minutes working to shrink" in message:
        return f"(Hypothesis's shrinking stopped at this run's {cap_s:.0f} s cap; the operation-level pass follows)"
    return message


def describe(e: BaseException) -> str:
    """Each failure Hypothesis found: its error and its minimized steps (the exception notes)."""
    errs = list(getattr(e, "exceptions", None) or [e])  # an ExceptionGroup when Hypothesis found several
    parts = []
    for i, x in enumerate(errs, 1):
        tb = traceback.extract_tb(x.__traceback__)
        where = next((f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(tb) if "/sglang/" in f.filename
                      or "/refcache/" in f.filename), None)
        head = f"--- failure {i}/{len(errs)}: {type(x).__name__}: {x}" + (f"\n    (raised at {where})" if where else "")
        notes = "\n".join(getattr(x, "__notes__", []))
        parts.append(f"{head}\n{notes}\n")
    return "\n".join(parts)


def run_target(name: str, budget_s: float, seed: int | None = None, shrink_s: float | None = None) -> dict:
    """Run the conformance machine against `name` for about `budget_s` seconds.

    Returns {target, steps, violations, failure_report (str or None), seed, examples, elapsed_s,
    sglang} — or the same with steps=0 and `skipped` (the reason) when the target's sglang
    version is not installed. Stops at the first disagreement, after Hypothesis shrank it (for at most
    `shrink_s` seconds: default max(45, budget_s) capped at 120, or $CONFORMANCE_SHRINK_S) and a
    replay minimizer took out the steps it kept but did not need."""
    if name not in TARGETS:
        raise KeyError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    why = unavailable_reason(name)
    if why:
        return {"target": name, "steps": 0, "violations": 0, "failure_report": None, "skipped": why,
                "sglang": TARGETS[name].sglang}
    if needs_own_process(name):
        return _run_child(name, budget_s, seed, shrink_s)
    return _run_here(name, budget_s, seed, shrink_s=shrink_s)


def strict_machine(name: str) -> type[ConformanceMachine]:
    """The machine for `name` with the target's allowances lifted: it judges what bounded runs skip."""
    make = make_factory(name)

    def strict():
        t = make()
        t.info = replace(t.info, allow=frozenset())
        return t

    return _with_base(machine_for(strict, name), name)


def replay_calls(name: str, calls: list, strict: bool = False) -> str | None:
    """Replay recorded operations on target `name` (in a child process when this one holds another
    sglang version); returns "ErrorType: message" for the disagreement or target error, or None."""
    if needs_own_process(name):
        cmd = ["--replay", json.dumps(calls), "--target", name] + (["--strict"] if strict else [])
        p = _child(cmd, 600)
        out = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if not out:
            raise RuntimeError(f"replay child failed (rc {p.returncode}): {p.stderr[-3000:]}")
        return json.loads(out[-1])["error"]
    err = replay(strict_machine(name) if strict else machine(name), [tuple(c) for c in calls])
    return None if err is None else f"{type(err).__name__}: {err}"


def _child(args: list[str], timeout: float, module: str = "conformance.runner") -> subprocess.CompletedProcess:
    """`python -m module args` in a fresh process that imports this project."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=root, env=env, timeout=timeout)


def _run_child(name: str, budget_s: float, seed: int | None, shrink_s: float | None = None) -> dict:
    cmd = ["--target", name, "--budget", str(budget_s), "--json"] + ([] if shrink_s is None else ["--shrink", str(shrink_s)])
    if seed is not None:
        cmd += ["--seed", str(seed)]
    p = _child(cmd, budget_s + 600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode not in (0, 1) or not lines:
        return {"target": name, "steps": 0, "violations": 1, "sglang": TARGETS[name].sglang,
                "failure_report": f"child process failed (rc {p.returncode}):\n{p.stderr[-4000:]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", choices=list(TARGETS), help="repeatable")
    ap.add_argument("--all", action="store_true", help="every target that is installed here")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per target")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--shrink", type=float, default=None, help="seconds Hypothesis may spend shrinking a failure")
    ap.add_argument("--json", action="store_true", help="one JSON line per target")
    ap.add_argument("--replay", help="a JSON list of recorded operations to replay on the one --target")
    ap.add_argument("--strict", action="store_true", help="with --replay: lift the target's allowances")
    ap.add_argument("--list", action="store_true", help="list every target: name, what it is, whether it runs here")
    a = ap.parse_args(argv)
    if a.list:
        width = max(map(len, TARGETS))
        for n, spec in TARGETS.items():
            why = unavailable_reason(n)
            print(f"{n:{width}}  {spec.what}  [{'available' if not why else 'unavailable: ' + why}]")
        return 0
    if a.replay:
        print(json.dumps({"error": replay_calls(a.target[0], json.loads(a.replay), a.strict)}))
        return 0
    names = (a.target or []) + (target_names() if a.all else [])
    if not names:
        ap.error("give --target NAME or --all")
    bad = 0
    for n in dict.fromkeys(names):
        r = run_target(n, a.budget, a.seed, a.shrink)
        bad += r["violations"]
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            state = "skipped: " + r["skipped"] if "skipped" in r else \
                ("DIVERGES" if r["violations"] else "agrees with the model")
            print(f"{n:24} {r['steps']:>7} steps  {state}", flush=True)
            if r.get("failure_report"):
                print(r["failure_report"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
