"""Helpers shared by the test suites: synthetic inputs, a controllable clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from continuum.domain import commands as c

T0 = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)


class FixedClock:
    """A clock the test moves by hand."""

    def __init__(self, now: dt.datetime = T0 + dt.timedelta(days=365)) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


def assessment(ratings: str | Sequence[str], hours: float | None = None) -> c.AssessmentInput:
    """`assessment("001040", 12)`: six dimension ratings as a string, hours per week."""
    return c.AssessmentInput(
        instrument="asam-ca",
        assessor_id="clin-7",
        ratings={str(i + 1): str(r) for i, r in enumerate(ratings)},
        hours_scheduled=hours,
    )


def day(n: float) -> dt.datetime:
    """Clinical time n days after T0."""
    return T0 + dt.timedelta(days=n)
