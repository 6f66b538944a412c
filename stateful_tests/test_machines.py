"""Every machine (component mix x write policy) under the chosen Hypothesis profile."""

from __future__ import annotations

import pytest
from hypothesis.stateful import run_state_machine_as_test

from stateful_tests.machines import MACHINES
from stateful_tests.profiles import current


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_machine(name):
    run_state_machine_as_test(MACHINES[name], settings=current())
