"""What the projections need from a policy document, precomputed for speed.

Projections judge nothing: they read the policy only to rank levels (step-down or step-up,
skipped levels, readmission at the same or higher intensity), to know the reassessment window
the decision was held to, and the hours-per-week bands. Every event names the policy version
that judged it; that version is the one consulted.
"""

from __future__ import annotations

from dataclasses import dataclass

from continuum.domain.policy import Policy, PolicyRegistry
from continuum_events import AgeGroup


@dataclass(frozen=True)
class LevelView:
    code: str
    rank: int
    withdrawal_management: bool
    continuing_care: bool
    #: (age group) -> minimum hours per week, where the band has one
    min_hours: dict[str, float]


@dataclass(frozen=True)
class PolicyView:
    id: str
    version: str
    window_days: int
    terminal: str
    levels: dict[str, LevelView]

    @classmethod
    def of(cls, policy: Policy) -> PolicyView:
        levels = {}
        for level in policy.levels:
            min_hours = {
                age.value: band.min_hours
                for age, band in level.hours_per_week.items()
                if band.min_hours is not None
            }
            levels[level.code] = LevelView(
                code=level.code,
                rank=level.rank,
                withdrawal_management=level.withdrawal_management,
                continuing_care=level.setting == "continuing_care",
                min_hours=min_hours,
            )
        return cls(
            id=policy.id,
            version=policy.version,
            window_days=policy.reassessment_window_days,
            terminal=policy.terminal_state,
            levels=levels,
        )

    def rank(self, code: str) -> int | None:
        level = self.levels.get(code)
        return level.rank if level is not None else None

    def skipped(self, from_code: str, to_code: str) -> list[str]:
        """Continuum levels ranked strictly between two levels, most intensive first.

        Withdrawal management runs beside the continuum and aftercare after it, so a move
        into or out of a WM level skips nothing, and neither kind is counted as skipped.
        """
        a, b = self.levels.get(from_code), self.levels.get(to_code)
        if a is None or b is None or a.withdrawal_management or b.withdrawal_management:
            return []
        low, high = sorted((a.rank, b.rank))
        between = [
            level
            for level in self.levels.values()
            if low < level.rank < high
            and not level.withdrawal_management
            and not level.continuing_care
        ]
        return [level.code for level in sorted(between, key=lambda lv: -lv.rank)]

    def min_hours(self, code: str, age_group: str) -> float | None:
        level = self.levels.get(code)
        return level.min_hours.get(age_group) if level is not None else None


class PolicyViews:
    """PolicyView by (id, version), built on first use."""

    def __init__(self, registry: PolicyRegistry) -> None:
        self._registry = registry
        self._views: dict[tuple[str, str], PolicyView | None] = {}

    def get(self, policy: dict[str, str] | None) -> PolicyView | None:
        if policy is None:
            return None
        key = (policy["id"], policy["version"])
        try:
            return self._views[key]
        except KeyError:
            pass
        try:
            view: PolicyView | None = PolicyView.of(self._registry.get(*key))
        except Exception:  # a version not loaded here: ranks unknown, flags left empty
            view = None
        self._views[key] = view
        return view

    @property
    def default(self) -> PolicyView:
        return PolicyView.of(self._registry.default)


AGE_GROUPS = tuple(age.value for age in AgeGroup)
