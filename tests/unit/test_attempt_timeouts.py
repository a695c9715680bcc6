"""Dynamic per-attempt timeouts (issue #13 item 6): pure logic of explorer/attempt_timeouts.py; the real-Ray proof
is tests/runtime/test_scheduler.py::test_a_dynamic_timeout_cuts_a_straggler_s_first_attempt_and_its_retry_completes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from explorer import config
from explorer.attempt_timeouts import AttemptTimeouts


def spec(**fields: object) -> config.DynamicTimeoutSpec:
    return config.DynamicTimeoutSpec.model_validate({"minSamples": 4, "factor": 3, "minSeconds": 2, **fields})


def test_without_a_spec_every_attempt_gets_the_static_limit() -> None:
    timeouts = AttemptTimeouts(900, None)
    for _ in range(50):
        timeouts.observe("rollout", 1.0)
    assert timeouts.timeout("rollout", 0) == 900 and timeouts.percentile("rollout") is None


def test_first_attempts_get_factor_times_the_percentile_once_enough_are_seen() -> None:
    timeouts = AttemptTimeouts(900, spec(percentile=0.75))
    for seconds in (4.0, 1.0, 3.0):
        timeouts.observe("rollout", seconds)
    assert timeouts.timeout("rollout", 0) == 900  # 3 < minSamples
    timeouts.observe("rollout", 2.0)
    assert timeouts.percentile("rollout") == 3.0  # nearest rank: the 3rd of [1, 2, 3, 4]
    assert timeouts.timeout("rollout", 0) == 9.0
    assert timeouts.timeout("rollout", 1) == 900  # a retry gets the full limit: long tasks still finish
    assert timeouts.timeout("eval", 0) == 900  # kinds are apart: eval tasks may be longer


def test_the_limit_stays_within_min_seconds_and_the_static_limit() -> None:
    fast = AttemptTimeouts(900, spec())
    slow = AttemptTimeouts(60, spec())
    for _ in range(4):
        fast.observe("rollout", 0.1)
        slow.observe("rollout", 100.0)
    assert fast.timeout("rollout", 0) == 2 and slow.timeout("rollout", 0) == 60


def test_the_window_forgets_old_attempts() -> None:
    timeouts = AttemptTimeouts(900, spec(window=4, percentile=1.0))
    for seconds in (50.0, 50.0, 50.0, 50.0, 1.0, 1.0, 1.0, 1.0):
        timeouts.observe("rollout", seconds)
    assert timeouts.percentile("rollout") == 1.0


def test_a_window_smaller_than_min_samples_is_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match=r"minSamples \(8\) must not exceed window \(4\)"):
        spec(minSamples=8, window=4)
