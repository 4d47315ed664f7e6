"""Random command sequences against the service: the invariants hold after every step.

Refused commands are fine (random input produces many) but must write nothing; a
`MachineError`, or any other exception that is not a `ContinuumError`, fails the test.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from continuum.adapters.memory import InMemoryEventStore
from continuum.application.ports import AppendResult
from continuum.application.service import PatientService
from continuum.domain import commands as c
from continuum.domain.errors import ContinuumError
from continuum.domain.machine import NEW, machine_for
from continuum.domain.patient import PatientState, new_state_after, replay
from continuum.domain.policy import Policy, PolicyRegistry
from continuum_events import (
    AgeGroup,
    AttendanceRecorded,
    DischargeReason,
    Disposition,
    EventVoided,
    LevelTransitioned,
    PatientAdmitted,
    PatientDischarged,
    PatientReadmitted,
    ReassessmentRecorded,
    VarianceReason,
    VoidReason,
)
from tests.support import T0, FixedClock, assessment

# Two registries over the same documents: the default policy for new episodes differs.
POLICIES = PolicyRegistry.bundled("asam-3")
ALT_POLICIES = PolicyRegistry.bundled("asam-4")
KEYS = ["pk-" + "a" * 20, "pk-" + "b" * 20]
TERMINAL = "discharged"
LEVELS = sorted({level.code for p in POLICIES.all() for level in p.levels} | {"9.9"})

# one in ten is off the policy's dimensions or scale
OFF_SCALE = ["00000", "0000005", "000050"]
# low ratings weigh more, so that aftercare and level 1 are often indicated
ratings_st = st.tuples(
    st.text(alphabet="0000001234", min_size=6, max_size=6),
    st.integers(min_value=0, max_value=9),
).map(lambda t: OFF_SCALE[t[1]] if t[1] < len(OFF_SCALE) else t[0])
# "fit": hours inside the band of the level the ratings indicate, so that moves often succeed
hours_st = st.sampled_from(["fit", "fit", "fit", "fit", None, 0, 8.5, 9, 19.5, 20, 40])
# "auto": a reason exactly when the level differs from the indicated one
variance_st = st.sampled_from(["auto", "auto", "auto", None, *VarianceReason])
# None: the level the latest assessment indicates, so that moves often succeed
# (the entry-only and end-of-line levels come up more: that is where moves are refused)
level_st = st.none() | st.none() | st.sampled_from([*LEVELS, *["0.5", "aftercare", "4-WM"] * 3])
# where a transition goes: the indicated level, any level, or one the table bars from here
goal_st = st.sampled_from(["indicated", "indicated", "any", "barred"])
# minutes before the service clock; negative is in the future
back_st = st.sampled_from([None] * 6 + [0, 30, 60 * 24, 60 * 24 * 3, -10])


def _policy_of(state: PatientState) -> Policy:
    if state.episode is None:
        return POLICIES.default
    return POLICIES.get(state.episode.policy.id, state.episode.policy.version)


def _active(state: PatientState) -> bool:
    return state.state not in (NEW, TERMINAL)


class PatientMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FixedClock(T0)
        self.store = InMemoryEventStore()
        self.services = [
            PatientService(self.store, POLICIES, clock=self.clock),
            PatientService(self.store, ALT_POLICIES, clock=self.clock),
        ]
        self.live: dict[str, PatientState] = {key: PatientState(stream_id=key) for key in KEYS}
        self.event_ids: dict[str, list[UUID]] = {key: [] for key in KEYS}
        self.outcomes: dict[str, int] = {"ok": 0, "refused": 0}

    # -- helpers --------------------------------------------------------------------------

    def _key(self, data: st.DataObject, suits: Callable[[PatientState], bool]) -> str:
        """A patient the command suits; any patient one time in five (or if none suits)."""
        keys = [key for key in KEYS if suits(self.live[key])]
        if not keys or data.draw(st.integers(min_value=0, max_value=4), label="any") == 0:
            keys = KEYS
        return data.draw(st.sampled_from(keys), label="key")

    def _when(self, minutes_back: int | None) -> dt.datetime | None:
        if minutes_back is None:
            return None
        return self.clock.now - dt.timedelta(minutes=minutes_back)

    def _indicated(self, key: str) -> str:
        latest = self.live[key].latest_assessment()
        return latest.indicated_level if latest is not None else "3.5"

    @staticmethod
    def _variance(
        variance: VarianceReason | str | None, level: str, indicated: str | None
    ) -> VarianceReason | None:
        if variance != "auto":
            return None if variance is None else VarianceReason(variance)
        return None if level == indicated else VarianceReason.CLINICAL_OVERRIDE

    def _goal(self, data: st.DataObject, key: str, goal: str) -> str:
        state = self.live[key]
        if goal == "indicated":
            return self._indicated(key)
        if goal == "barred":
            policy = _policy_of(state)
            moves = policy.allowed_moves
            barred = [
                code for code in policy.levels_by_code if state.state not in moves.get(code, ())
            ]
            if barred:
                return data.draw(st.sampled_from(barred), label="barred level")
        return data.draw(st.sampled_from(LEVELS), label="level")

    def _hours(
        self, key: str, hours: float | str | None, ratings: str, age: AgeGroup | None = None
    ) -> float | None:
        if hours != "fit":
            return None if hours is None else float(hours)
        state = self.live[key]
        policy = _policy_of(state)
        if state.episode is not None:
            age = age or state.episode.age_group
        try:
            level = policy.indicated_level(assessment(ratings).ratings)
        except ContinuumError:
            return 12.0
        band = policy.band_for(level, age or AgeGroup.ADULT)
        if band is None:
            return None
        low = band.min_hours or 0.0
        return low if band.below_hours is None else (low + band.below_hours) / 2

    def _do(self, key: str, command: c.Command, alt: bool = False) -> AppendResult | None:
        service = self.services[1 if alt else 0]
        head = self.store.head_position()
        stream = self.store.read_stream(key)
        try:
            result = service.handle(command)
        except ContinuumError:
            self.outcomes["refused"] += 1
            assert self.store.head_position() == head
            assert self.store.read_stream(key) == stream
            return None
        self.outcomes["ok"] += 1
        assert result.replayed is False
        assert result.stream_id == key
        assert len(result.events) == 1
        assert result.stream_version == len(stream) + 1
        assert self.store.read_stream(key) == [*stream, *result.events]
        assert self.store.head_position() == head + 1
        self.event_ids[key].extend(e.event_id for e in result.events)
        self.live[key] = new_state_after(self.live[key], result.events)
        return result

    # -- rules ----------------------------------------------------------------------------

    @initialize(ratings=st.text(alphabet="01234", min_size=6, max_size=6))
    def start(self, ratings: str) -> None:
        level = POLICIES.default.indicated_level(assessment(ratings).ratings)
        if level == "aftercare":
            level, ratings = "1", "100000"
        hours = self._hours(KEYS[0], "fit", ratings)
        result = self._do(
            KEYS[0],
            c.Admit(
                patient_key=KEYS[0],
                level=level,
                site="s1",
                age_group=AgeGroup.ADULT,
                assessment=assessment(ratings, hours),
            ),
        )
        assert result is not None
        assert self.live[KEYS[0]].state == level

    @rule(
        data=st.data(),
        level=level_st,
        ratings=ratings_st,
        hours=hours_st,
        variance=variance_st,
        age=st.sampled_from(list(AgeGroup)),
        back=back_st,
        alt=st.booleans(),
        wrong=st.integers(min_value=0, max_value=4),
    )
    def enter(
        self,
        data: st.DataObject,
        level: str | None,
        ratings: str,
        hours: float | str | None,
        variance: VarianceReason | str | None,
        age: AgeGroup,
        back: int | None,
        alt: bool,
        wrong: int,
    ) -> None:
        """Admit a new patient or readmit a discharged one (one time in five, the other)."""
        key = self._key(data, lambda s: not _active(s))
        before = self.live[key]
        admit = (before.state == NEW) != (wrong == 0)
        level = level or self._indicated(key)
        try:
            policy = (ALT_POLICIES if alt else POLICIES).default
            indicated: str | None = policy.indicated_level(assessment(ratings).ratings)
        except ContinuumError:
            indicated = None
        reason = self._variance(variance, level, indicated)
        command: c.Command
        if admit:
            command = c.Admit(
                patient_key=key,
                level=level,
                site="s1",
                age_group=age,
                assessment=assessment(ratings, self._hours(key, hours, ratings, age)),
                variance_reason=reason,
                occurred_at=self._when(back),
            )
        else:
            command = c.Readmit(
                patient_key=key,
                level=level,
                site="s2",
                assessment=assessment(ratings, self._hours(key, hours, ratings)),
                variance_reason=reason,
                occurred_at=self._when(back),
            )
        result = self._do(key, command, alt)
        if result is None:
            return
        event = result.events[0]
        assert isinstance(event, PatientAdmitted | PatientReadmitted)
        assert event.policy == (ALT_POLICIES if alt else POLICIES).default.ref
        assert self.live[key].state == event.data.placement.level
        assert list(self.live[key].assessments) == [event.event_id]
        if admit:
            assert before.state == NEW
            assert isinstance(event, PatientAdmitted)
            assert event.data.episode_number == 1
        else:
            assert before.state == TERMINAL
            assert isinstance(event, PatientReadmitted)
            assert before.episode is not None
            assert event.data.previous_episode_id == before.episode.episode_id
            assert event.data.episode_number == before.episode.number + 1

    @rule(data=st.data(), ratings=ratings_st, hours=hours_st, back=back_st)
    def reassess(
        self, data: st.DataObject, ratings: str, hours: float | str | None, back: int | None
    ) -> None:
        key = self._key(data, _active)
        before = self.live[key]
        result = self._do(
            key,
            c.RecordReassessment(
                patient_key=key,
                assessment=assessment(ratings, self._hours(key, hours, ratings)),
                occurred_at=self._when(back),
            ),
        )
        if result is None:
            return
        event = result.events[0]
        assert isinstance(event, ReassessmentRecorded)
        assert before.episode is not None
        assert event.policy == before.episode.policy
        assert event.data.level_at_assessment == before.state
        assert event.event_id in self.live[key].assessments
        assert self.live[key].state == before.state

    @rule(
        data=st.data(),
        goal=goal_st,
        site=st.none() | st.sampled_from(["s1", "s2"]),
        variance=variance_st,
        pick=st.none() | st.none() | st.integers(min_value=0, max_value=50),
        back=back_st,
        alt=st.booleans(),
    )
    def transition(
        self,
        data: st.DataObject,
        goal: str,
        site: str | None,
        variance: VarianceReason | str | None,
        pick: int | None,
        back: int | None,
        alt: bool,
    ) -> None:
        key = self._key(data, _active)
        reassessment_id = None
        if pick is not None:
            known = self.event_ids[key]
            reassessment_id = known[pick % len(known)] if known and pick else uuid4()
        before = self.live[key]
        level = self._goal(data, key, goal)
        result = self._do(
            key,
            c.Transition(
                patient_key=key,
                to_level=level,
                site=site,
                variance_reason=self._variance(variance, level, self._indicated(key)),
                reassessment_event_id=reassessment_id,
                occurred_at=self._when(back),
            ),
            alt,
        )
        if result is None:
            return
        event = result.events[0]
        assert isinstance(event, LevelTransitioned)
        assert before.episode is not None
        assert event.policy == before.episode.policy
        assert (event.data.from_level, event.data.from_site) == (before.state, before.site)
        assert event.data.reassessment_event_id in before.assessments
        assert self.live[key].state == event.data.placement.level
        policy = _policy_of(before)
        assert 0 <= event.data.reassessment_age_days <= policy.reassessment_window_days
        if event.data.placement.level != event.data.placement.indicated_level:
            assert event.data.placement.variance_reason is not None

    @rule(
        data=st.data(),
        day_offset=st.integers(min_value=-3, max_value=1),
        hours=st.sampled_from([0.5, 3, 8, 24]),
    )
    def attend(self, data: st.DataObject, day_offset: int, hours: float) -> None:
        key = self._key(data, _active)
        before = self.live[key]
        service_date = (self.clock.now + dt.timedelta(days=day_offset)).date()
        result = self._do(
            key, c.RecordAttendance(patient_key=key, service_date=service_date, hours=hours)
        )
        if result is None:
            return
        event = result.events[0]
        assert isinstance(event, AttendanceRecorded)
        assert (event.data.level, event.data.site) == (before.state, before.site)
        assert self.live[key].state == before.state

    @rule(
        data=st.data(),
        reason=st.sampled_from(list(DischargeReason)),
        disposition=st.sampled_from(list(Disposition)),
        back=back_st,
    )
    def discharge(
        self,
        data: st.DataObject,
        reason: DischargeReason,
        disposition: Disposition,
        back: int | None,
    ) -> None:
        key = self._key(data, _active)
        before = self.live[key]
        result = self._do(
            key,
            c.Discharge(
                patient_key=key,
                reason=reason,
                disposition=disposition,
                occurred_at=self._when(back),
            ),
        )
        if result is None:
            return
        event = result.events[0]
        assert isinstance(event, PatientDischarged)
        assert (reason == DischargeReason.DEATH) == (disposition == Disposition.EXPIRED)
        assert event.data.from_level == before.state
        assert self.live[key].state == TERMINAL

    @rule(
        data=st.data(),
        pick=st.integers(min_value=0, max_value=50),
        recent=st.booleans(),
        reason=st.sampled_from(list(VoidReason)),
    )
    def void(self, data: st.DataObject, pick: int, recent: bool, reason: VoidReason) -> None:
        """Void a known event (often a recent one), now and then an unknown id."""
        key = self._key(data, lambda s: s.exists)
        known = self.event_ids[key]
        if not known or pick == 0:
            target = uuid4()
        elif recent:
            target = known[-1 - pick % min(len(known), 3)]
        else:
            target = known[pick % len(known)]
        before = self.live[key]
        result = self._do(key, c.VoidEvent(patient_key=key, event_id=target, reason=reason))
        if result is None:
            return
        event = result.events[0]
        assert isinstance(event, EventVoided)
        assert target not in before.voided
        assert event.data.voided_event_type == before.event_types[target]
        assert event.data.voided_event_type != "EventVoided"
        assert target in self.live[key].voided
        assert target not in self.live[key].assessments
        if before.changes and before.changes[-1].event_id == target:
            assert self.live[key].state == before.changes[-1].before.state
        else:
            assert self.live[key].state == before.state

    @rule(minutes=st.sampled_from([1, 30, 60 * 6, 60 * 24, 60 * 24 * 3, 60 * 24 * 7, 60 * 24 * 9]))
    def advance(self, minutes: int) -> None:
        self.clock.advance(minutes=minutes)

    @rule(data=st.data(), minutes=st.sampled_from([-1, 0, 1, 60]))
    def advance_to_window_edge(self, data: st.DataObject, minutes: int) -> None:
        """Move the clock (never back) to where the latest assessment turns stale."""
        key = self._key(data, _active)
        state = self.live[key]
        latest = state.latest_assessment()
        if latest is None:
            return
        window = dt.timedelta(days=_policy_of(state).reassessment_window_days)
        self.clock.now = max(
            self.clock.now, latest.occurred_at + window + dt.timedelta(minutes=minutes)
        )

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def state_is_a_machine_state(self) -> None:
        for state in self.live.values():
            if state.episode is None:
                assert state.state == NEW
            assert state.state in machine_for(_policy_of(state)).states

    @invariant()
    def recorded_moves_are_allowed(self) -> None:
        for event in self.store.read_all(0, 100_000):
            if event.policy is None:
                continue
            policy = POLICIES.get(event.policy.id, event.policy.version)
            if isinstance(event, LevelTransitioned):
                assert event.data.from_level in policy.allowed_moves[event.data.placement.level]
            elif isinstance(event, PatientAdmitted | PatientReadmitted):
                assert event.data.placement.level in policy.admission_levels

    @invariant()
    def replay_equals_live(self) -> None:
        for key, live in self.live.items():
            rebuilt = replay(key, self.store.read_stream(key), POLICIES)
            assert _view(rebuilt) == _view(live)
            assert _view(self.services[1].load(key)) == _view(live)

    @invariant()
    def positions_are_dense(self) -> None:
        events = self.store.read_all(0, 100_000)
        assert [e.position for e in events] == list(range(1, len(events) + 1))


def _view(state: PatientState) -> dict[str, Any]:
    latest = state.latest_assessment()
    return {
        "state": state.state,
        "site": state.site,
        "program": state.program,
        "episode": state.episode,
        "episodes": state.episodes,
        "placed_at": state.placed_at,
        "assessments": list(state.assessments),
        "latest": latest.event_id if latest else None,
        "version": state.version,
        "voided": state.voided,
        "event_types": state.event_types,
    }


TestPatientMachine = PatientMachine.TestCase
TestPatientMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
