"""Sandboxes, checked child processes and the coverage map behind `benchmarks.mutation`.

A mutant is never written into the working tree: each worker owns a sandbox, a copy of the
project's files (tracked and untracked-but-not-ignored, as `git ls-files` lists them), writes the
mutant into the sandbox's `refcache/`, and runs its checks in child processes whose cwd and first
sys.path entry is the sandbox. Children report in JSON lines (see `benchmarks.mutation_child`); the
parent enforces a time limit per step (per machine, per test), so a mutant that loops forever is
stopped within one step's limit rather than a whole check's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import mutation_child

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / "build" / "mutation"  # build/ is git-ignored
TEST_DIRS = ("tests", "properties", "stateful_tests")
_SKIP_TOP = ("reports/", "build/", "gpu_tests/", ".venv/", ".git/")
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "reports", "gpu_tests", "*.egg-info", "__pycache__",
                                 ".hypothesis", ".pytest_cache", ".ruff_cache", ".coverage*", ".whl")


# ------------------------------------------------------------------------------------ sandboxes
def project_files(root: Path = REPO) -> list[str]:
    """The files a sandbox needs: what git tracks plus untracked files it does not ignore (other
    people's work in progress included), or, outside git, the tree minus the usual ignores."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
        files = sorted({f for f in out.split("\0") if f and (root / f).is_file()})
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            dirnames[:] = [d for d in dirnames if not _IGNORE(dirpath, [d])]
            files += [os.path.normpath(os.path.join(rel, f)) for f in filenames if not _IGNORE(dirpath, [f])]
    return [f for f in files if not f.startswith(_SKIP_TOP)]


def snapshot(dst: Path, rev: str | None = None, root: Path = REPO) -> Path:
    """A fixed copy of the project to mutate and test: the working tree (tracked and untracked,
    not ignored) or, with `rev`, a commit (`git archive`). Everything in a run (the mutants, the
    coverage map, every sandbox) comes from it, so edits made during a long run change nothing.
    The harness's own files are always the running ones (a spawned check imports them)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if rev is None:
        make_sandbox(dst.parent, root, project_files(root), name=dst.name)
    else:
        tar = subprocess.run(["git", "archive", "--format=tar", rev], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=tar, check=True)
        for top in _SKIP_TOP:
            shutil.rmtree(dst / top.rstrip("/"), ignore_errors=True)
    here = Path(__file__).resolve().parent
    (dst / "benchmarks").mkdir(exist_ok=True)
    for name in ("__init__.py", "mutation_child.py"):
        shutil.copyfile(here / name, dst / "benchmarks" / name)
    return dst


def make_sandbox(parent: Path, root: Path = REPO, files: list[str] | None = None, name: str = "repo") -> Path:
    """Copy the project into `parent/name` and return that path."""
    dst = Path(parent) / name
    for rel in files if files is not None else project_files(root):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
    return dst


class Sandbox:
    """One worker's copy of the project, where one mutant at a time is written and undone."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._original: dict[str, str] = {}

    def apply(self, relpath: str, text: str) -> None:
        target = self.path / relpath
        self._original.setdefault(relpath, target.read_text())
        target.write_text(text)
        self._clean(target.parent)

    def restore(self) -> None:
        for relpath, text in self._original.items():
            (self.path / relpath).write_text(text)
            self._clean((self.path / relpath).parent)
        self._original.clear()
        for junk in (".hypothesis", ".failures"):
            shutil.rmtree(self.path / junk, ignore_errors=True)

    @staticmethod
    def _clean(directory: Path) -> None:
        shutil.rmtree(directory / "__pycache__", ignore_errors=True)


# ------------------------------------------------------------------------------- child processes
def preload() -> None:
    """Import what every check needs but nothing of the project, so forked children skip it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    import hypothesis.stateful  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch

    torch.set_num_threads(1)
    for optional in ("z3", "crosshair.core_and_libs", "xdist", "pytest_cov"):
        try:
            __import__(optional)
        except Exception:  # noqa: BLE001 - a missing optional module only costs its import later
            pass
    loaded = [m for m in sys.modules if m.split(".")[0] in mutation_child.PROJECT_MODULES]
    if loaded:
        raise RuntimeError(f"the harness imported project modules {loaded[:5]}: forked checks would not see the mutant")


def can_fork() -> bool:
    """Forking is safe only from a process that holds none of the project's modules."""
    return hasattr(os, "fork") and not any(m.split(".")[0] in mutation_child.PROJECT_MODULES for m in sys.modules)


@dataclass
class Child:
    """One check in a child process: its messages, its current step and that step's deadline."""

    sandbox: Path
    request: dict[str, Any]
    mode: str = "fork"  # or "spawn"
    log: Path | None = None
    limit_for: Callable[[str], float] = lambda step: 120.0
    grace_s: float = 30.0
    pid: int = 0
    started: float = 0.0
    step: str = "start"
    deadline: float = 0.0
    messages: list[list[Any]] = field(default_factory=list)
    final: list[Any] | None = None
    timed_out: str | None = None
    exit_status: int | None = None
    eof: bool = False
    fd: int = -1
    _buf: bytes = b""
    _proc: subprocess.Popen | None = None

    def start(self) -> Child:
        r, w = os.pipe()
        req = {**self.request, "sandbox": str(self.sandbox), "repo_root": str(REPO)}
        self.started = time.monotonic()
        self.deadline = self.started + 120.0
        if self.mode == "fork":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child
                try:
                    os.close(r)
                    os.setpgrp()
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    if self.log is not None:
                        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        os.dup2(fd, 1)
                        os.dup2(fd, 2)
                    mutation_child.enter_sandbox(req["sandbox"], req["repo_root"])
                    mutation_child.run(req, w)
                finally:
                    os._exit(0)
            self.pid = pid
        else:
            out = open(self.log, "wb") if self.log is not None else None  # noqa: SIM115 - the child owns it
            # the sandbox first; other entries of the caller's PYTHONPATH (a --target install of the
            # tools) stay, the repository's own does not (it would shadow the mutant)
            kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                    if p and os.path.realpath(p) != os.path.realpath(REPO)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.sandbox), *kept]), "PYTHONDONTWRITEBYTECODE": "1"}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.mutation_child", json.dumps(req), str(w)], cwd=self.sandbox,
                pass_fds=(w,), stdout=out, stderr=subprocess.STDOUT if out else None, env=env, start_new_session=True)
            if out is not None:
                out.close()
            self.pid = self._proc.pid
        os.close(w)
        os.set_blocking(r, False)
        self.fd = r
        return self

    def fileno(self) -> int:
        return self.fd

    def pump(self, now: float | None = None) -> bool:
        """Read what arrived, enforce the deadline, reap the child; True once it is finished."""
        now = time.monotonic() if now is None else now
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            self.messages.append(msg)
            if msg[0] == "step":
                self.step = msg[1]
                self.deadline = now + (msg[2] if msg[2] is not None else self.limit_for(msg[1]))
            elif msg[0] in ("campaign", "result", "error"):
                self.final = msg
                self.deadline = now + self.grace_s
        if self._reap():
            return True
        if now > self.deadline:
            if self.final is None:
                self.timed_out = self.step
            self.kill()
            return True
        return False

    def _reap(self) -> bool:
        if self.exit_status is not None:
            return True
        if self._proc is not None:
            code = self._proc.poll()
            if code is None:
                return False
            self.exit_status = code
        else:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return False
            self.exit_status = os.waitstatus_to_exitcode(status)
        self._finish()
        return True

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._proc is not None:
            self.exit_status = self._proc.wait()
        elif self.exit_status is None:
            self.exit_status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        self._finish()

    def _finish(self) -> None:
        try:  # stragglers of the check (spawned ranks, subprocesses): its process group
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def run_child(child: Child) -> Child:
    """Start `child` and wait until it finishes (or is stopped at a step's deadline)."""
    import select

    child.start()
    while not child.pump():
        select.select([] if child.eof else [child], [], [], 0.2)
    return child


# ------------------------------------------------------------------------------------ coverage map
def fingerprint(root: Path = REPO, files: list[str] | None = None) -> str:
    """What the line -> tests map depends on: every Python file a sandbox gets (but the harness's own)
    and pyproject.toml (pytest's configuration)."""
    h = hashlib.sha256()
    for rel in files if files is not None else project_files(root):
        if (rel.endswith(".py") and not rel.startswith(("benchmarks/", "conformance/"))) or rel == "pyproject.toml":
            h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def load_coverage_map(path: Path, fp: str) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("fingerprint") == fp and data.get("version") == 1 else None


def compute_coverage_map(path: Path, jobs: int, root: Path = REPO, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the unit tests once under coverage.py with one context per test (pytest-cov's
    `--cov-context=test`, spread over `jobs` xdist workers) and keep, for each line of
    `refcache/`, the tests that ran it, plus each test's duration (the per-test time limit later)."""
    from coverage import CoverageData

    files = project_files(root)
    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="refcache-covmap-") as tmp:
        sb = make_sandbox(Path(tmp), root, files)
        env = {**os.environ, "PYTHONPATH": str(sb), "COVERAGE_FILE": str(sb / ".coverage"), "PYTHONDONTWRITEBYTECODE": "1",
               mutation_child.DURATIONS_ENV: str(sb / "durations.json"), "REFCACHE_HYPOTHESIS_PROFILE": "ci",
               "REFCACHE_FAILURE_REPORTS": str(sb / ".failures")}
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "benchmarks.mutation_child",
               "--cov=refcache", "--cov-context=test", "--cov-report=", "-q", "-o", "addopts=",
               "--ignore=tests/test_mutation_harness.py", *(["-n", str(jobs)] if jobs > 1 else []), *TEST_DIRS]
        log = path.with_suffix(".log")
        echo(f"[mutation] computing the coverage map: {' '.join(cmd[2:])} (log: {log})")
        with open(log, "w") as out:
            rc = subprocess.run(cmd, cwd=sb, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        try:
            runs = json.loads((sb / "durations.json").read_text())
        except OSError as e:
            raise RuntimeError(f"the coverage run (exit {rc}) left no durations; see {log}") from e
        passed = {t for t, o in runs["outcomes"].items() if o == "passed"}
        failed = sorted(t for t, o in runs["outcomes"].items() if o == "failed")
        data = CoverageData(str(sb / ".coverage"))
        data.read()
        tests = sorted(passed)
        index = {t: i for i, t in enumerate(tests)}
        lines: dict[str, dict[str, list[int]]] = {}
        for measured in data.measured_files():
            rel = os.path.relpath(measured, sb)
            if not rel.startswith("refcache" + os.sep):
                continue
            per_line = {}
            for ln, contexts in data.contexts_by_lineno(measured).items():
                ids = sorted({index[c.rsplit("|", 1)[0]] for c in contexts if c and c.rsplit("|", 1)[0] in index})
                if ids:
                    per_line[str(ln)] = ids
            lines[rel.replace(os.sep, "/")] = per_line
    cmap = {"version": 1, "fingerprint": fingerprint(root, files), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": round(time.perf_counter() - t0, 1), "jobs": jobs, "pytest_exit": rc, "tests": tests,
            "durations": {t: round(runs["durations"].get(t, 0.0), 3) for t in tests}, "failed": failed, "lines": lines}
    path.write_text(json.dumps(cmap))
    echo(f"[mutation] coverage map: {len(tests)} passing tests over {sum(map(len, lines.values()))} lines of refcache/ "
         f"in {cmap['seconds']:.0f} s" + (f"; {len(failed)} failing tests left out: {failed[:5]}" if failed else ""))
    return cmap
