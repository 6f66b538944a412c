"""The pytest plugin and the public adapter API, as another project would use them: pytest in a
subprocess, in an empty directory, pointed at the worked example of docs/adapter.md (a small
cache that is not refcache) and at its buggy variant."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conformance import check_target, replay_operations
from conformance.check import fired_check, load_factory
from conformance.examples import dict_cache
from conformance.machine import Disagreement

pytestmark = pytest.mark.conformance
ROOT = Path(__file__).resolve().parent.parent
GOOD = "conformance.examples.dict_cache:make_target"
BUGGY = "conformance.examples.dict_cache:make_buggy_target"


def _pytest(tmp_path: Path, *args: str, autoload: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    if autoload:
        env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    else:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def _installed() -> list[str]:
    """Where the pytest11 entry point named refcache points, in every installed distribution (as
    pluggy scans them: a stale egg-info on sys.path must not hide the installed one)."""
    return [ep.value for d in metadata.distributions() for ep in d.entry_points
            if ep.group == "pytest11" and ep.name == "refcache"]


def test_entry_point_is_declared():
    declared = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points.pytest11]\nrefcache = "conformance.pytest_plugin"\n' in declared
    if not _installed():
        pytest.skip("refcache is not installed with its entry points here (pip install -e .)")
    assert set(_installed()) == {"conformance.pytest_plugin"}


def test_good_cache_passes_through_the_entry_point(tmp_path):
    if not _installed():
        pytest.skip("refcache is not installed with its entry points here (pip install -e .)")
    p = _pytest(tmp_path, "--refcache-target", GOOD, "--refcache-budget", "3", "--refcache-seed", "0", "-rA")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed" in p.stdout and "agrees with the model" in p.stdout


def test_buggy_cache_fails_with_the_check_and_the_operations(tmp_path):
    """Loaded with -p, plugin autoloading off (as in a locked-down CI)."""
    p = _pytest(tmp_path, "-p", "conformance.pytest_plugin", "--refcache-target", BUGGY, "--refcache-budget", "10",
                "--refcache-seed", "0", autoload=False)
    out = p.stdout
    assert p.returncode == 1, out + p.stderr
    assert "1 failed" in out
    assert "check that fired: model (evict):" in out and "lost device KV while locked" in out
    assert "minimized to 4 operations" in out and "lock(match #1)" in out
    assert "replay_operations(" in out


def test_bad_target_path_is_a_clear_failure(tmp_path):
    p = _pytest(tmp_path, "-p", "refcache", "--refcache-target", "no_such_pkg.adapter:Cache", autoload=False)
    assert p.returncode == 1
    assert "cannot use the target" in p.stdout and "no_such_pkg" in p.stdout


def test_without_the_option_the_plugin_adds_nothing(tmp_path):
    p = _pytest(tmp_path, "-p", "refcache", "--co", "-q", autoload=False)
    assert p.returncode == 5, p.stdout + p.stderr  # pytest's "no tests collected"


# ------------------------------------------------------------------ the API, in process
def test_check_target_finds_and_minimizes_the_seeded_bug():
    r = check_target(BUGGY, budget_s=10, seed=0)
    assert not r.passed and r.steps > 0
    assert r.check.startswith("model (evict)") and "while locked" in r.check
    assert r.operations is not None and len(r.operations) <= 6
    assert isinstance(replay_operations(BUGGY, r.operations), Disagreement)
    assert replay_operations(GOOD, r.operations) is None  # the same operations on the good cache agree


def test_check_target_accepts_a_class_and_rejects_what_is_not_a_target():
    r = check_target(dict_cache.DictCacheTarget, budget_s=0.5, seed=1)  # a Target subclass, zero-argument
    assert r.passed and r.steps > 0
    with pytest.raises(TypeError, match="not a conformance.Target"):
        check_target(lambda: object(), budget_s=0.1)
    with pytest.raises(ValueError, match="has no attribute"):
        load_factory("conformance.examples.dict_cache:nope")


def test_fired_check_names_each_kind():
    assert fired_check(Disagreement("x: lock (2,): target and model disagree:\n  lock locked (), model says (2,)")) \
        == "model (lock): lock locked (), model says (2,)"
    assert fired_check(Disagreement("x: after ['evict 2']: target checks fail:\n  R1: slots leaked")) \
        == "target's own check: R1: slots leaked"
    assert fired_check(KeyError("k")).startswith("the target raised KeyError")
