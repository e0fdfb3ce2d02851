"""Hypothesis settings for the fuzzers: deterministic and bounded in `make test`; `make fuzz` multiplies the
cases (CONVEYOR_FUZZ_SCALE) and draws fresh ones each run."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

SCALE = int(os.environ.get("CONVEYOR_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int, **more: Any) -> settings:
    """`examples` cases (times the scale); the same cases on every run unless scaled up."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        derandomize=SCALE == 1,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        **more,
    )
