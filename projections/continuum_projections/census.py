"""Census: active patients by level (and by site), folded from the event log.

Voids are honoured by the domain's own fold (`PatientState.apply`): a voided transition puts
the patient back where they were, exactly as the service itself sees it.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from continuum.domain.machine import NEW
from continuum.domain.patient import PatientState
from continuum.domain.policy import PolicyRegistry
from continuum_events import PatientEvent

TERMINAL_STATES = frozenset({"discharged"})


@dataclass
class CensusProjection:
    """Keeps every patient's folded state; answers the census at the last event applied."""

    policies: PolicyRegistry | None = None
    patients: dict[str, PatientState] = field(default_factory=dict)
    position: int = 0

    def apply(self, event: PatientEvent) -> None:
        state = self.patients.get(event.stream_id)
        if state is None:
            state = self.patients[event.stream_id] = PatientState(stream_id=event.stream_id)
        state.apply(event, self.policies)
        if event.position is not None:
            self.position = event.position

    def apply_all(self, events: Iterable[PatientEvent]) -> CensusProjection:
        for event in events:
            self.apply(event)
        return self

    def active(self) -> list[PatientState]:
        return [
            s for s in self.patients.values() if s.state != NEW and s.state not in TERMINAL_STATES
        ]

    def snapshot(self, as_of: dt.datetime, level_order: Iterable[str] = ()) -> Census:
        active = self.active()
        counts = Counter(s.state for s in active)
        levels = {code: counts.get(code, 0) for code in level_order}
        for code in sorted(counts):
            levels.setdefault(code, counts[code])
        by_site: dict[str, dict[str, int]] = {}
        for state in active:
            site = by_site.setdefault(state.site or "", {})
            site[state.state] = site.get(state.state, 0) + 1
        return Census(
            as_of=as_of,
            position=self.position,
            levels=levels,
            sites={s: dict(sorted(v.items())) for s, v in sorted(by_site.items())},
            total=len(active),
        )


@dataclass(frozen=True)
class Census:
    as_of: dt.datetime
    position: int
    levels: dict[str, int]
    sites: dict[str, dict[str, int]]
    total: int

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of.isoformat(),
            "position": self.position,
            "levels": self.levels,
            "sites": self.sites,
            "total": self.total,
        }
