"""The main job and its reports: a test of the tests.

A seeded bug is hunted, shrunk and reported; the generated repro file fails under the bug and
passes on the clean cache; `refcache verify` writes summary.json as documented, runs its tasks
in worker processes, and its verdict is PASS (0) / FAIL (1) / INCOMPLETE (3) as documented."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from campaign.cli import main
from campaign.hunt import failure_check, hunt
from campaign.report import ascii_tree, build_report, dependents, replay
from stateful_tests.seeded_bugs import SEEDED_BUGS

ROOT = Path(__file__).resolve().parents[1]
BUG = "class3_resolve_mutates_record"  # found in well under a second


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("message, check", [
    ("invariants broken:\n  T3 (node 7): host-referenced node is no longer attached", "T3"),
    ("invariants broken at teardown: X1 (node 157): L2 mamba record holds", "X1"),
    ("prefetch req0 [1, 1] after [] -> 0 tokens: cache and model disagree:", "model:prefetch"),
    ("prefetch req1 never terminates", "X3"),
])
def test_failure_check_names_the_check(message, check):
    assert failure_check(message) == check


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    h = hunt("mamba/write_through", seed_=1, budget_s=60, shrink_s=10, patch=SEEDED_BUGS[BUG].patch())
    assert h.found, "the seeded bug was not detected"
    rep = build_report(h, BUG, f"Seeded bug {BUG}")
    assert rep is not None, "Hypothesis's minimized program did not replay"
    out = tmp_path_factory.mktemp("report")
    return h, rep, out, rep.write(out, BUG)


def test_hunt_detects_and_minimizes(found):
    h, rep, _, _ = found
    assert rep.replayed.check == "X1"
    assert 1 <= len(rep.rules) <= 8, rep.rules
    assert h.steps_run > 0 and h.seconds > 0


def test_report_pages_name_the_check_steps_and_trees(found):
    _, rep, out, files = found
    md = (out / files["markdown"]).read_text()
    for part in ("Check that fired:** `X1`", "## Minimized steps", "Tree before the failing step",
                 "Tree after the failing step", f"REFCACHE_SEEDED_BUG={BUG}"):
        assert part in md
    assert rep.rules[0] in md
    page = (out / files["html"]).read_text()
    assert 'class="mermaid"' in page and "graph TD" in page


def test_repro_fails_under_the_bug_and_passes_clean(found):
    _, _, out, files = found
    mod = _load(out / files["repro"])
    with SEEDED_BUGS[BUG].patch(), pytest.raises(AssertionError):
        mod.replay()
    mod.replay()  # the clean cache passes the same steps


def test_repro_is_a_standalone_pytest_file(found):
    _, _, out, files = found
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(out / files["repro"])]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "REFCACHE_SEEDED_BUG": BUG}
    bad = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout[-2000:]
    env.pop("REFCACHE_SEEDED_BUG")
    good = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout[-2000:]


def test_dependents_groups_a_definition_with_its_users():
    """Dropping `requests_0 = ...` alone leaves a program that does not replay; the minimizer
    tries it together with every line that uses it, transitively."""
    prog = ["requests_0 = state.first_request(tokens=[1, 1, 2, 2])",
            "requests_1 = state.insert_new(tokens=[3, 3])",
            "(nodes_0,) = state.match(extra=[], tokens=requests_0)",
            "state.settle()",
            "state.lock(node=nodes_0)",
            "state.insert(tokens=requests_1)",
            "requests_10 = state.insert_new(tokens=[4, 4])"]
    assert dependents(prog, 0) == [0, 2, 4]
    assert dependents(prog, 1) == [1, 5]
    assert dependents(prog, 3) == [3]
    assert dependents(prog, 6) == [6]


def test_replay_does_not_count_a_binding_mismatch_as_a_finding():
    """A shortened program can leave a rule returning fewer values than the line binds; that is
    the program not replaying, not the bug (the minimizer once kept such a program)."""
    prog = ["requests_0 = state.first_request(tokens=[2, 2, 3, 3])",
            "requests_1 = state.seed_storage(extra=[(1, 2), (3, 3)], keep=8, tokens=requests_0)",
            "nodes_0, nodes_1 = state.match(extra=[], tokens=requests_1)"]
    r = replay("full/write_through", prog, "class4_lock_host_only_bottom")
    assert not r.failed and "does not replay" in r.message, r


def test_replay_of_a_clean_program_passes():
    r = replay("full/write_through", ["requests_0 = state.first_request(tokens=[1, 1, 2, 2])",
                                      "state.settle()", "state.pressure()"])
    assert not r.failed, r.message


def test_ascii_tree_marks_the_named_node(found):
    _, rep, _, _ = found
    text = ascii_tree(rep.replayed.after, {next(iter(rep.replayed.after.nodes))})
    assert text.startswith("root")


def test_verify_writes_the_documented_summary(tmp_path):
    """Two worker processes: proofs, a hunt and clean slices run side by side and land in one
    summary; CrossHair is turned off, so the verdict must be INCOMPLETE (exit 3) and say so."""
    code = main(["verify", "--budget", "40", "--bugs", BUG, "--nodes", "2", "--no-crosshair", "--jobs", "2",
                 "--out", str(tmp_path), "--seed", "3"])
    s = json.loads((tmp_path / "summary.json").read_text())
    v = s["verdict"]
    assert code == 3 and v["status"] == "INCOMPLETE", v
    assert v["failed"] == [] and v["not_done"] == ["CrossHair contracts not checked (--no-crosshair)"], v
    assert set(s) >= {"clean", "proofs", "bugs", "jobs"} and s["jobs"] == 2
    assert s["proofs"] and all(p["status"] == "proved" and p["nodes"] == 2 for p in s["proofs"])
    assert s["clean"]["steps"] > 0 and s["clean"]["violations"] == 0
    assert sum(m["steps"] for m in s["machines"].values()) == s["clean"]["steps"]
    (b,) = s["bugs"]
    assert set(b) >= {"name", "detected", "seconds", "steps_minimized", "invariant", "report", "one_minimal"}
    assert b["detected"] and b["invariant"] == "X1" and (tmp_path / b["report"]).exists()
    md = (tmp_path / b["report_md"]).read_text()
    assert b["one_minimal"] is True and "1-minimal" in md
    assert f"-p no:cacheprovider {tmp_path / b['repro']}`" in md  # the replay command names the file in --out
    assert (tmp_path / "index.html").exists() and (tmp_path / "summary.md").exists()


def _summary(**over) -> dict:
    s = {"proofs": [{"invariant": "S1", "transition": "insert", "status": "proved"}],
         "crosshair": [{"function": "f", "status": "confirmed", "ok": True}],
         "bugs": [{"name": "b", "detected": True, "seconds": 1.0}], "clean": {"steps": 10, "violations": 0},
         "conformance": [], "task_errors": []}
    s.update(over)
    return s


@pytest.mark.parametrize("over, status, says", [
    ({}, "PASS", ""),
    ({"proofs": [{"invariant": "S1", "transition": "insert", "status": "skipped"}]}, "INCOMPLETE", "1 of 1 Z3 proofs"),
    ({"proofs": [{"invariant": "S1", "transition": "insert", "status": "counterexample"}]}, "FAIL", "S1/insert"),
    ({"crosshair": [{"function": "f", "status": "unknown", "ok": False}]}, "INCOMPLETE", "not settled"),
    ({"crosshair": [{"function": "f", "status": "counterexample", "ok": False}]}, "FAIL", "CrossHair counterexamples"),
    ({"bugs": [{"name": "b", "detected": False, "seconds": 9.0}]}, "FAIL", "not detected: b"),
    ({"clean": {"steps": 10, "violations": 2}}, "FAIL", "2 violations"),
    ({"clean": {"steps": 0, "violations": 0}}, "INCOMPLETE", "no steps"),
    ({"conformance": [{"target": "t", "skipped": "not installed"}]}, "INCOMPLETE", "t skipped"),
    ({"task_errors": ["task_hunt('b',): OSError: x"]}, "INCOMPLETE", "task crashed"),
])
def test_verdict_is_pass_only_when_everything_ran_and_held(over, status, says):
    from campaign.verify import judge

    got, failed, not_done = judge(_summary(**over), proofs=True, crosshair=True)
    assert got == status, (failed, not_done)
    assert says in " ".join(failed + not_done)


def test_verdict_counts_turned_off_phases_as_not_done():
    from campaign.verify import judge

    assert judge(_summary(proofs=[]), proofs=False, crosshair=True)[0] == "INCOMPLETE"
    assert judge(_summary(crosshair=[]), proofs=True, crosshair=False)[0] == "INCOMPLETE"


def test_minimized_program_is_one_minimal(found):
    """No single step of the reported program can be dropped with the failure kept."""
    _, rep, _, _ = found
    assert rep.one_minimal
    for i in range(len(rep.rules)):
        assert not replay(rep.machine, rep.rules[:i] + rep.rules[i + 1:], BUG).failed, i


def test_shrink_cap_replaces_hypothesis_false_five_minutes_warning():
    """Hypothesis says "more than five minutes" whenever its shrink cap fires, whatever the cap."""
    from hypothesis import reporting

    from campaign.hunt import SLOW_SHRINK_WARNING, shrink_cap

    seen, capped = [], []
    with reporting.with_reporter(seen.append), shrink_cap(3, lambda: capped.append(1)):
        reporting.report(f"WARNING: Hypothesis has {SLOW_SHRINK_WARNING} a failing test case")
        reporting.report("another line")
    assert capped == [1] and seen == ["another line"]


def test_verify_fails_when_a_bug_goes_undetected(tmp_path, monkeypatch):
    """A bug with a no-op patch cannot be detected: the verdict must say so (exit 1)."""
    import contextlib

    from stateful_tests.seeded_bugs import SeededBug

    monkeypatch.setitem(SEEDED_BUGS, "noop", SeededBug(0, "changes nothing", contextlib.nullcontext,
                                                       ("full/write_through",)))
    # one process: the patched registry is this process's own
    code = main(["verify", "--budget", "12", "--bugs", "noop", "--no-proofs", "--no-crosshair", "--jobs", "1",
                 "--out", str(tmp_path)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert code == 1 and s["verdict"]["status"] == "FAIL"
    assert s["bugs"][0]["detected"] is False and s["bugs"][0]["steps_searched"] > 0 and not s["task_errors"]
    assert any("not detected: noop" in f for f in s["verdict"]["failed"])


def test_unknown_bug_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "--bugs", "no_such_bug"])
    assert e.value.code == 2
    assert "unknown seeded bugs" in capsys.readouterr().err


def test_conformance_runner_replaces_the_false_shrink_warning_too():
    from campaign.hunt import SLOW_SHRINK_WARNING
    from conformance.runner import _honest

    line = _honest(f"WARNING: Hypothesis has {SLOW_SHRINK_WARNING} a failing test case", 45)
    assert "five minutes" not in line and "45 s cap" in line
    assert _honest("Falsifying example", 45) == "Falsifying example"


def test_workers_exit_when_the_campaign_is_killed():
    """`refcache verify` killed outright (SIGKILL, or SIGTERM, which skips its cleanup) must not
    leave its worker processes behind, each holding a core until its task ends and then idling."""
    import signal
    import time

    code = ("import os, sys, time\n"
            "from campaign import workers\n"
            "pool = workers.make_pool(2)\n"
            "pids = sorted({pool.submit(os.getpid).result() for _ in range(8)})\n"
            "print(' '.join(map(str, pids)), flush=True)\n"
            "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert pids, "the pool started no worker"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
            return f.read().split(")")[-1].split()[0] != "Z"

    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids), f"workers {pids} outlived their killed campaign"
