"""Hypothesis profiles for the stateful suite, registered here and nowhere else.

REFCACHE_HYPOTHESIS_PROFILE picks one (default `ci`):
- ci: bounded and derandomized, so the whole stateful suite stays under 3 minutes on 2 cores;
- dev: more examples, random seeds, the example database on (for local work);
- deep: long runs for the campaign.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

ENV_VAR = "REFCACHE_HYPOTHESIS_PROFILE"
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=100, stateful_step_count=50, deadline=None, derandomize=True,
                          database=None, suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("dev", max_examples=200, stateful_step_count=60, deadline=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("deep", max_examples=5000, stateful_step_count=100, deadline=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)

# Hunting a seeded bug: same bounds as the profile, but stop at the first failure (no shrinking),
# so a detection test measures time-to-detection, not time-to-minimize.
DETECT_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)


def profile_name() -> str:
    return os.environ.get(ENV_VAR, "ci")


def current(**overrides) -> settings:
    """The chosen profile's settings, with `overrides`."""
    return settings(settings.get_profile(profile_name()), **overrides)
