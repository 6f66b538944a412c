"""pytest plugin: run refcache's conformance suite against your own cache in your own CI.

    pytest --refcache-target mypkg.adapter:make_target [--refcache-budget 30] [--refcache-seed 0]

With `--refcache-target` (repeatable), the session gets one test item per target, named
`refcache-conformance[<target>]`: it builds the target from the dotted path (a
`conformance.Target` subclass or a zero-argument factory returning one), runs the conformance
machine against the abstract model for the budget, and fails with the check that fired and the
minimized operations. Without the option the plugin adds nothing, so having it installed costs
a pytest run one import. Registered through the `pytest11` entry point of the refcache
distribution; with plugin autoloading disabled, pass `-p conformance.pytest_plugin`.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("refcache", "refcache conformance (your cache against refcache's abstract model)")
    g.addoption("--refcache-target", action="append", default=[], metavar="MODULE:ATTR",
                help="a conformance.Target subclass or zero-argument factory to check (repeatable)")
    g.addoption("--refcache-budget", type=float, default=30.0, metavar="SECONDS",
                help="seconds of exploration per target (default 30; shrinking a failure adds at most about as much)")
    g.addoption("--refcache-seed", type=int, default=None, metavar="N",
                help="Hypothesis seed (default: a random one, printed with the result)")


class ConformanceFailure(Exception):
    """The target disagreed with the model; the message is the full report."""


class ConformanceItem(pytest.Item):
    """One target, checked for the budget."""

    def __init__(self, *, spec: str, budget: float, seed: int | None, **kw) -> None:
        super().__init__(**kw)
        self.spec, self.budget, self.seed = spec, budget, seed
        self.add_marker("refcache_conformance")

    def runtest(self) -> None:
        from conformance.check import check_target

        r = check_target(self.spec, budget_s=self.budget, seed=self.seed)
        self.user_properties += [("steps", r.steps), ("seed", r.seed), ("check", r.check)]
        if not r.passed:
            raise ConformanceFailure(r.report())
        self.add_report_section("call", "refcache", r.report())  # steps and seed, shown with -rA

    def repr_failure(self, excinfo, style=None):  # noqa: ANN001 - pytest's signature
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        if isinstance(excinfo.value, (TypeError, ValueError)) and str(excinfo.value).startswith("target "):
            return f"refcache conformance: cannot use the target: {excinfo.value}"  # a bad path or adapter
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.session.path / "refcache-conformance", None, f"refcache conformance: {self.spec}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "refcache_conformance: the conformance check --refcache-target added")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, so they apply to these items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    opt = config.getoption
    new = []
    for spec in dict.fromkeys(opt("refcache_target")):
        name = f"refcache-conformance[{spec}]"
        new.append(ConformanceItem.from_parent(session, name=name, nodeid=f"refcache::{name}", spec=spec,
                                               budget=opt("refcache_budget"), seed=opt("refcache_seed")))
    if new:  # reported as collected, so the terminal's counts (and -k's "deselected") add up
        config.hook.pytest_collectreport(report=pytest.CollectReport("refcache", "passed", None, new))
        items.extend(new)
