"""Every rule and every refusal of the commands, through the application service.

Each refusal is also checked to leave the event store exactly as it was.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import pytest

from continuum.adapters.memory import InMemoryEventStore
from continuum.application.ports import AppendResult
from continuum.application.service import CommandContext, PatientService
from continuum.domain import commands as c
from continuum.domain.errors import (
    ConcurrencyConflict,
    ContinuumError,
    Duplicate,
    HoursOutsideBand,
    InvalidClinicalTime,
    InvalidInput,
    InvalidStateForCommand,
    RatingOutOfRange,
    ReassessmentMissing,
    ReassessmentStale,
    TransitionNotAllowed,
    UnknownEvent,
    UnknownLevel,
    UnknownPatient,
    VarianceReasonRequired,
)
from continuum.domain.patient import replay
from continuum.domain.policy import PolicyRegistry
from continuum_events import (
    Actor,
    ActorRole,
    AgeGroup,
    AttendanceRecorded,
    Direction,
    DischargeReason,
    Disposition,
    EventVoided,
    LevelTransitioned,
    PatientAdmitted,
    PatientDischarged,
    PatientEvent,
    PatientReadmitted,
    PolicyRef,
    ReassessmentRecorded,
    VarianceReason,
    VoidReason,
)
from tests.support import ENVELOPE_FIELDS, FixedClock, assessment, day

ASAM3 = PolicyRef(id="asam-3", version="2026.1")
ASAM4 = PolicyRef(id="asam-4", version="2026.1")
UNKNOWN_KEY = "pk-" + "a" * 20

_REGISTRIES: dict[str, PolicyRegistry] = {}


def registry(default_id: str = "asam-3") -> PolicyRegistry:
    if default_id not in _REGISTRIES:
        _REGISTRIES[default_id] = PolicyRegistry.bundled(default_id)
    return _REGISTRIES[default_id]


@dataclass
class Env:
    clock: FixedClock
    store: InMemoryEventStore
    service: PatientService

    def handle(self, command: c.Command, ctx: CommandContext | None = None) -> AppendResult:
        return self.service.handle(command, ctx)

    def one(self, command: c.Command, ctx: CommandContext | None = None) -> Any:
        result = self.handle(command, ctx)
        assert len(result.events) == 1
        return result.events[0]

    def admit(
        self,
        level: str = "3.5",
        ratings: str = "001040",
        hours: float | None = None,
        *,
        site: str = "s1",
        age_group: AgeGroup = AgeGroup.ADULT,
        **kwargs: Any,
    ) -> PatientAdmitted:
        event = self.one(
            c.Admit(
                level=level,
                site=site,
                age_group=age_group,
                assessment=assessment(ratings, hours),
                **kwargs,
            )
        )
        assert isinstance(event, PatientAdmitted)
        return event

    def reassess(
        self, key: str, ratings: str, hours: float | None = None, **kwargs: Any
    ) -> ReassessmentRecorded:
        event = self.one(
            c.RecordReassessment(patient_key=key, assessment=assessment(ratings, hours), **kwargs)
        )
        assert isinstance(event, ReassessmentRecorded)
        return event

    def transition(self, key: str, to_level: str, **kwargs: Any) -> LevelTransitioned:
        event = self.one(c.Transition(patient_key=key, to_level=to_level, **kwargs))
        assert isinstance(event, LevelTransitioned)
        return event

    def discharge(
        self,
        key: str,
        reason: DischargeReason = DischargeReason.COMPLETED,
        disposition: Disposition = Disposition.HOME,
        **kwargs: Any,
    ) -> PatientDischarged:
        event = self.one(
            c.Discharge(patient_key=key, reason=reason, disposition=disposition, **kwargs)
        )
        assert isinstance(event, PatientDischarged)
        return event

    def readmit(
        self,
        key: str,
        level: str = "3.5",
        ratings: str = "001040",
        hours: float | None = None,
        **kwargs: Any,
    ) -> PatientReadmitted:
        event = self.one(
            c.Readmit(
                patient_key=key,
                level=level,
                site=kwargs.pop("site", "s1"),
                assessment=assessment(ratings, hours),
                **kwargs,
            )
        )
        assert isinstance(event, PatientReadmitted)
        return event

    def void(
        self, key: str, event_id: UUID, reason: VoidReason = VoidReason.ENTERED_IN_ERROR
    ) -> EventVoided:
        event = self.one(c.VoidEvent(patient_key=key, event_id=event_id, reason=reason))
        assert isinstance(event, EventVoided)
        return event

    def state(self, key: str) -> Any:
        return self.service.load(key)

    @contextmanager
    def refused(
        self, error: type[ContinuumError], match: str | None = None
    ) -> Iterator[pytest.ExceptionInfo[ContinuumError]]:
        """The block must raise `error`, and the store must not change."""
        head = self.store.head_position()
        streams = {key: self.store.read_stream(key) for key in self.store.stream_ids()}
        with pytest.raises(error, match=match) as info:
            yield info
        assert self.store.head_position() == head
        assert self.store.stream_ids() == sorted(streams)
        assert {key: self.store.read_stream(key) for key in streams} == streams


def make_env(default_id: str = "asam-3", store: InMemoryEventStore | None = None) -> Env:
    clock = FixedClock(day(0))
    store = store if store is not None else InMemoryEventStore()
    return Env(clock, store, PatientService(store, registry(default_id), clock=clock))


@pytest.fixture
def env() -> Env:
    return make_env()


# -- admit ------------------------------------------------------------------------------------


def test_admit(env: Env) -> None:
    event = env.admit("3.5", "001040", site="north", program="women")
    assert event.event_type == "PatientAdmitted"
    assert event.stream_version == 1
    assert event.position == 1
    assert event.occurred_at == day(0)
    assert event.policy == ASAM3
    data = event.data
    assert data.episode_number == 1
    assert data.age_group == AgeGroup.ADULT
    assert data.assessment.ratings == {"1": "0", "2": "0", "3": "1", "4": "0", "5": "4", "6": "0"}
    assert data.assessment.indicated_level == "3.5"
    assert (data.placement.level, data.placement.site, data.placement.program) == (
        "3.5",
        "north",
        "women",
    )
    assert data.placement.indicated_level == "3.5"
    assert data.placement.variance_reason is None
    state = env.state(event.stream_id)
    assert (state.state, state.site, state.program, state.version) == ("3.5", "north", "women", 1)
    assert state.episode.number == 1
    assert state.episode.policy == ASAM3
    assert list(state.assessments) == [event.event_id]
    assert env.store.stream_ids() == [event.stream_id]


def test_admit_with_a_given_patient_key(env: Env) -> None:
    event = env.admit(patient_key=UNKNOWN_KEY)
    assert event.stream_id == UNKNOWN_KEY


def test_admit_backdated(env: Env) -> None:
    env.clock.advance(days=3)
    event = env.admit(occurred_at=day(1))
    assert event.occurred_at == day(1)
    assert event.recorded_at == day(3)


def test_admit_unknown_level(env: Env) -> None:
    with env.refused(UnknownLevel, match="level '2.2' is not in policy asam-3@2026.1") as info:
        env.admit("2.2", "020000", 12)
    assert info.value.field == "level"


def test_admit_at_aftercare_is_not_allowed(env: Env) -> None:
    with env.refused(TransitionNotAllowed, match="admit at level aftercare is not allowed") as info:
        env.admit("aftercare", "000000")
    assert info.value.policy == "asam-3@2026.1"
    assert info.value.field == "level"


def test_admit_at_asam4_level_under_asam3(env: Env) -> None:
    with env.refused(UnknownLevel):
        env.admit("1.7", "100000")


@pytest.mark.parametrize(
    ("ratings", "field", "match"),
    [
        ("00104", "assessment.ratings", "missing 6"),
        ("0010400", "assessment.ratings", "unknown 7"),
        ("005000", "assessment.ratings.3", "rating for dimension 3 is '5'"),
        ("00104x", "assessment.ratings.6", "rating for dimension 6 is 'x'"),
    ],
)
def test_admit_ratings_not_on_the_policy(env: Env, ratings: str, field: str, match: str) -> None:
    with env.refused(RatingOutOfRange, match=match) as info:
        env.admit("3.5", ratings)
    assert info.value.field == field
    assert info.value.rule == "assessment.rating_out_of_range"


def test_admit_variance_reason_required(env: Env) -> None:
    with env.refused(
        VarianceReasonRequired, match="level 3.7 differs from the indicated level 3.5"
    ) as info:
        env.admit("3.7", "001040")
    assert info.value.field == "variance_reason"
    assert info.value.details == {"provided": "3.7", "indicated": "3.5"}


def test_admit_with_variance_reason(env: Env) -> None:
    event = env.admit(
        "3.7", "001040", variance_reason=VarianceReason.NO_SLOT, authorization_ref="auth-1"
    )
    placement = event.data.placement
    assert (placement.level, placement.indicated_level) == ("3.7", "3.5")
    assert placement.variance_reason == VarianceReason.NO_SLOT
    assert placement.authorization_ref == "auth-1"


def test_admit_variance_reason_refused_when_levels_agree(env: Env) -> None:
    with env.refused(InvalidInput, match="variance_reason given but level 3.5") as info:
        env.admit("3.5", "001040", variance_reason=VarianceReason.PATIENT_PREFERENCE)
    assert info.value.rule == "placement.variance_reason_unexpected"
    assert type(info.value) is InvalidInput


@pytest.mark.parametrize(
    ("level", "ratings", "hours", "age"),
    [
        ("2.1", "020000", 9, AgeGroup.ADULT),
        ("2.1", "020000", 19.5, AgeGroup.ADULT),
        ("2.1", "020000", 6, AgeGroup.ADOLESCENT),
        ("2.5", "000300", 20, AgeGroup.ADULT),
        ("2.5", "000300", 35, AgeGroup.ADOLESCENT),
        ("1", "100000", 8.5, AgeGroup.ADULT),
        ("1", "100000", 0, AgeGroup.ADULT),
        ("1", "100000", 5, AgeGroup.ADOLESCENT),
    ],
)
def test_admit_hours_inside_band(
    env: Env, level: str, ratings: str, hours: float, age: AgeGroup
) -> None:
    event = env.admit(level, ratings, hours, age_group=age)
    assert event.data.placement.level == level
    assert event.data.assessment.hours_scheduled == hours


@pytest.mark.parametrize(
    ("level", "ratings", "hours", "age", "match"),
    [
        ("2.1", "020000", 8.5, AgeGroup.ADULT, "needs >= 9 and < 20 h/week; .* schedules 8.5"),
        ("2.1", "020000", 20, AgeGroup.ADULT, "needs >= 9 and < 20 h/week; .* schedules 20"),
        ("2.1", "020000", 5, AgeGroup.ADOLESCENT, "needs >= 6 and < 20 h/week"),
        ("2.5", "000300", 19.5, AgeGroup.ADULT, "level 2.5 for adults needs >= 20 h/week"),
        ("1", "100000", 9, AgeGroup.ADULT, "level 1 for adults needs < 9 h/week"),
        ("1", "100000", 6, AgeGroup.ADOLESCENT, "level 1 for adolescents needs < 6 h/week"),
        ("2.1", "020000", None, AgeGroup.ADULT, "records no hours_scheduled"),
        ("2.5", "000300", None, AgeGroup.ADULT, "records no hours_scheduled"),
        ("1", "100000", None, AgeGroup.ADOLESCENT, "records no hours_scheduled"),
    ],
)
def test_admit_hours_outside_band(
    env: Env, level: str, ratings: str, hours: float | None, age: AgeGroup, match: str
) -> None:
    with env.refused(HoursOutsideBand, match=match) as info:
        env.admit(level, ratings, hours, age_group=age)
    assert info.value.field == "hours_scheduled"
    assert info.value.details["level"] == level


def test_admit_in_the_future(env: Env) -> None:
    with env.refused(InvalidClinicalTime, match="is in the future") as info:
        env.admit(occurred_at=day(0) + dt.timedelta(minutes=6))
    assert info.value.field == "occurred_at"


def test_admit_within_clock_skew(env: Env) -> None:
    event = env.admit(occurred_at=day(0) + dt.timedelta(minutes=5))
    assert event.occurred_at == day(0) + dt.timedelta(minutes=5)


def test_admit_twice(env: Env) -> None:
    key = env.admit().stream_id
    with env.refused(InvalidStateForCommand, match="already exists") as info:
        env.admit(patient_key=key)
    assert info.value.rule == "patient.already_admitted"


# -- reassessment ---------------------------------------------------------------------------


def test_reassessment(env: Env) -> None:
    admitted = env.admit()
    key = admitted.stream_id
    env.clock.advance(days=2)
    event = env.reassess(key, "020000", 12)
    assert event.occurred_at == day(2)
    assert event.policy == ASAM3
    assert event.stream_version == 2
    assert event.data.episode_id == admitted.data.episode_id
    assert event.data.level_at_assessment == "3.5"
    assert event.data.assessment.indicated_level == "2.1"
    assert event.data.assessment.hours_scheduled == 12
    state = env.state(key)
    assert state.state == "3.5"
    assert set(state.assessments) == {admitted.event_id, event.event_id}
    assert state.latest_assessment().event_id == event.event_id


def test_reassessment_before_admission(env: Env) -> None:
    env.clock.advance(days=2)
    key = env.admit(occurred_at=day(1)).stream_id
    with env.refused(InvalidClinicalTime, match="is before admission") as info:
        env.reassess(key, "020000", 12, occurred_at=day(0.5))
    assert info.value.field == "occurred_at"


def test_reassessment_of_an_unknown_patient(env: Env) -> None:
    with env.refused(UnknownPatient, match=f"no patient with key {UNKNOWN_KEY}") as info:
        env.reassess(UNKNOWN_KEY, "020000", 12)
    assert info.value.field == "patient_key"


def test_reassessment_of_a_discharged_patient(env: Env) -> None:
    key = env.admit().stream_id
    env.discharge(key)
    with env.refused(
        InvalidStateForCommand, match="cannot record a reassessment: .* is discharged"
    ):
        env.reassess(key, "020000", 12)


def test_reassessment_ratings_checked(env: Env) -> None:
    key = env.admit().stream_id
    with env.refused(RatingOutOfRange) as info:
        env.reassess(key, "0200009")
    assert info.value.field == "assessment.ratings"


def test_reassessment_in_the_future(env: Env) -> None:
    key = env.admit().stream_id
    with env.refused(InvalidClinicalTime, match="in the future"):
        env.reassess(key, "020000", 12, occurred_at=day(1))


# -- transition -------------------------------------------------------------------------------


def test_step_down(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=3)
    reassessed = env.reassess(key, "020000", 12)
    env.clock.advance(days=1)
    event = env.transition(key, "2.1")
    data = event.data
    assert event.policy == ASAM3
    assert data.direction == Direction.STEP_DOWN
    assert (data.from_level, data.from_site) == ("3.5", "s1")
    assert (data.placement.level, data.placement.site) == ("2.1", "s1")
    assert data.placement.indicated_level == "2.1"
    assert data.reassessment_event_id == reassessed.event_id
    assert data.reassessment_occurred_at == day(3)
    assert data.reassessment_age_days == 1.0
    assert data.ratings == reassessed.data.assessment.ratings
    assert data.hours_scheduled == 12
    state = env.state(key)
    assert (state.state, state.site, state.placed_at, state.version) == ("2.1", "s1", day(4), 3)


def test_step_up(env: Env) -> None:
    key = env.admit("2.1", "020000", 12).stream_id
    env.clock.advance(days=1)
    env.reassess(key, "003000")
    event = env.transition(key, "3.7", site="s9")
    assert event.data.direction == Direction.STEP_UP
    assert event.data.from_level == "2.1"
    assert event.data.placement.site == "s9"
    assert env.state(key).state == "3.7"


def test_lateral_site_change(env: Env) -> None:
    key = env.admit("3.5", "001040", site="north").stream_id
    env.clock.advance(days=2)
    event = env.transition(key, "3.5", site="south")
    assert event.data.direction == Direction.LATERAL
    assert (event.data.from_site, event.data.placement.site) == ("north", "south")
    state = env.state(key)
    assert (state.state, state.site) == ("3.5", "south")


def test_lateral_program_change(env: Env) -> None:
    key = env.admit("3.5", "001040", program="p1").stream_id
    env.clock.advance(hours=5)
    event = env.transition(key, "3.5", program="p2")
    assert event.data.direction == Direction.LATERAL
    assert (event.data.placement.site, event.data.placement.program) == ("s1", "p2")


def test_transition_to_the_same_level_and_site(env: Env) -> None:
    key = env.admit("3.5", "001040", site="north").stream_id
    env.clock.advance(days=1)
    with env.refused(InvalidStateForCommand, match="already at 3.5 at north") as info:
        env.transition(key, "3.5", site="north")
    assert info.value.rule == "transition.no_change"
    with env.refused(InvalidStateForCommand, match="nothing to move"):
        env.transition(key, "3.5")


def test_transition_not_allowed_from_detox_to_aftercare(env: Env) -> None:
    key = env.admit("4-WM", "400000").stream_id
    env.clock.advance(days=1)
    env.reassess(key, "000000")
    with env.refused(
        TransitionNotAllowed, match="step-down from 4-WM to aftercare is not allowed"
    ) as info:
        env.transition(key, "aftercare")
    assert info.value.details == {"from_level": "4-WM", "to_level": "aftercare"}
    assert info.value.policy == "asam-3@2026.1"


@pytest.mark.parametrize(
    ("level", "ratings", "hours"),
    [("1", "100000", 4), ("3.5", "001040", None), ("aftercare", None, None)],
)
def test_nothing_moves_to_early_intervention(
    env: Env, level: str, ratings: str | None, hours: float | None
) -> None:
    if level == "aftercare":
        key = env.admit("1", "100000", 4).stream_id
        env.clock.advance(days=1)
        env.reassess(key, "000000")
        env.transition(key, "aftercare")
    else:
        key = env.admit(level, ratings or "", hours).stream_id
    env.clock.advance(days=1)
    env.reassess(key, "000000")
    with env.refused(TransitionNotAllowed, match=f"from {level} to 0.5 is not allowed"):
        env.transition(key, "0.5", variance_reason=VarianceReason.CLINICAL_OVERRIDE)


def test_early_intervention_allows_a_lateral_move(env: Env) -> None:
    key = env.admit("0.5", "000000", variance_reason=VarianceReason.CLINICAL_OVERRIDE).stream_id
    env.clock.advance(days=1)
    event = env.transition(key, "0.5", site="s2", variance_reason=VarianceReason.CLINICAL_OVERRIDE)
    assert event.data.direction == Direction.LATERAL


def test_transition_to_an_unknown_level(env: Env) -> None:
    key = env.admit().stream_id
    with env.refused(UnknownLevel) as info:
        env.transition(key, "2.2")
    assert info.value.field == "to_level"


def test_transition_stale_reassessment(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=12)
    with env.refused(ReassessmentStale) as info:
        env.transition(key, "2.1")
    assert (
        "step-down to 2.1 needs a reassessment within 7 days; latest is 12 days old"
        in info.value.message
    )
    assert info.value.rule == "reassessment.stale"
    assert info.value.details["window_days"] == 7
    assert info.value.details["age_days"] == 12.0


def test_transition_exactly_seven_days_is_fresh(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    reassessed = env.reassess(key, "020000", 12)
    env.clock.advance(days=7)
    event = env.transition(key, "2.1")
    assert event.data.reassessment_event_id == reassessed.event_id
    assert event.data.reassessment_age_days == 7.0


def test_transition_seven_days_and_a_minute_is_stale(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.reassess(key, "020000", 12)
    env.clock.advance(days=7, minutes=1)
    with env.refused(ReassessmentStale, match="latest is 7 days old"):
        env.transition(key, "2.1")


def test_transition_backdated_to_within_the_window(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.reassess(key, "020000", 12)
    env.clock.advance(days=30)
    event = env.transition(key, "2.1", occurred_at=day(6))
    assert event.occurred_at == day(6)
    assert event.data.reassessment_age_days == 6.0


def test_latest_assessment_wins_a_tie_on_clinical_time(env: Env) -> None:
    # An assessment recorded later at the same clinical instant is the latest one, always
    # (not whichever event id happens to sort last).
    for _ in range(8):
        key = env.admit("3.5", "001040").stream_id
        reassessed = env.reassess(key, "020000", 12, occurred_at=day(0))
        assert env.state(key).latest_assessment().event_id == reassessed.event_id
        event = env.transition(key, "2.1")
        assert event.data.reassessment_event_id == reassessed.event_id


def test_transition_with_an_unknown_reassessment_id(env: Env) -> None:
    key = env.admit().stream_id
    missing = uuid4()
    with env.refused(ReassessmentMissing, match=f"reassessment {missing} is not a current") as info:
        env.transition(key, "3.5", site="s2", reassessment_event_id=missing)
    assert info.value.field == "reassessment_event_id"
    assert info.value.rule == "reassessment.missing"


def test_transition_with_an_explicit_older_reassessment(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=1)
    older = env.reassess(key, "020000", 12)
    env.clock.advance(days=1)
    env.reassess(key, "001040")
    env.clock.advance(days=1)
    event = env.transition(key, "2.1", reassessment_event_id=older.event_id)
    assert event.data.reassessment_event_id == older.event_id
    assert event.data.placement.indicated_level == "2.1"
    assert event.data.reassessment_age_days == 2.0


def test_transition_reassessment_dated_after_the_transition(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=5)
    env.reassess(key, "020000", 12)
    with env.refused(ReassessmentStale, match="is dated after the step-down") as info:
        env.transition(key, "2.1", occurred_at=day(4))
    assert info.value.rule == "reassessment.after_transition"


def test_transition_before_the_current_placement(env: Env) -> None:
    env.clock.advance(days=2)
    key = env.admit("3.5", "001040", occurred_at=day(2)).stream_id
    with env.refused(InvalidClinicalTime, match="is before the current placement") as info:
        env.transition(key, "3.5", site="s2", occurred_at=day(1))
    assert info.value.field == "occurred_at"


def test_transition_in_the_future(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    with env.refused(InvalidClinicalTime, match="in the future"):
        env.transition(key, "3.5", site="s2", occurred_at=day(1))


def test_transition_variance_reason_required(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.reassess(key, "020000", 12)
    with env.refused(
        VarianceReasonRequired, match="level 2.5 differs from the indicated level 2.1"
    ):
        env.transition(key, "2.5")


def test_transition_variance_reason_unexpected(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.reassess(key, "020000", 12)
    with env.refused(InvalidInput) as info:
        env.transition(key, "2.1", variance_reason=VarianceReason.PAYER_DECISION)
    assert info.value.rule == "placement.variance_reason_unexpected"


def test_transition_with_variance_reason(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.reassess(key, "020000", 25)
    event = env.transition(key, "2.5", variance_reason=VarianceReason.PAYER_DECISION)
    assert event.data.placement.indicated_level == "2.1"
    assert event.data.placement.variance_reason == VarianceReason.PAYER_DECISION


def test_transition_hours_outside_band(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    reassessed = env.reassess(key, "020000", 8)
    with env.refused(HoursOutsideBand, match=f"reassessment {reassessed.event_id} schedules 8"):
        env.transition(key, "2.1")


def test_transition_band_uses_the_episode_age_group(env: Env) -> None:
    key = env.admit("3.5", "001040", age_group=AgeGroup.ADOLESCENT).stream_id
    env.reassess(key, "020000", 7)
    event = env.transition(key, "2.1")
    assert event.data.hours_scheduled == 7


def test_transition_of_a_patient_not_in_care(env: Env) -> None:
    with env.refused(UnknownPatient):
        env.transition(UNKNOWN_KEY, "2.1")
    key = env.admit().stream_id
    env.discharge(key)
    with env.refused(InvalidStateForCommand, match="cannot transition to 3.5: .* is discharged"):
        env.transition(key, "3.5", site="s2")


# -- attendance -----------------------------------------------------------------------------


def test_attendance(env: Env) -> None:
    key = env.admit("2.1", "020000", 12, site="north").stream_id
    env.clock.advance(days=2)
    event = env.one(c.RecordAttendance(patient_key=key, service_date=day(1).date(), hours=3.5))
    assert isinstance(event, AttendanceRecorded)
    assert event.policy is None
    assert event.occurred_at == day(2)
    data = event.data
    assert (data.service_date, data.hours, data.level, data.site) == (
        dt.date(2026, 1, 6),
        3.5,
        "2.1",
        "north",
    )
    state = env.state(key)
    assert (state.state, state.version) == ("2.1", 2)


def test_attendance_in_the_future(env: Env) -> None:
    key = env.admit("2.1", "020000", 12).stream_id
    with env.refused(InvalidClinicalTime, match="service_date 2026-01-06 is in the future") as info:
        env.handle(c.RecordAttendance(patient_key=key, service_date=day(1).date(), hours=2))
    assert info.value.field == "service_date"


def test_attendance_before_the_placement(env: Env) -> None:
    env.clock.advance(days=3)
    key = env.admit("2.1", "020000", 12).stream_id
    with env.refused(InvalidClinicalTime, match="is before the current placement at 2.1"):
        env.handle(c.RecordAttendance(patient_key=key, service_date=day(2).date(), hours=2))


def test_attendance_of_a_patient_not_in_care(env: Env) -> None:
    with env.refused(UnknownPatient):
        env.handle(c.RecordAttendance(patient_key=UNKNOWN_KEY, service_date=day(0).date(), hours=2))
    key = env.admit("2.1", "020000", 12).stream_id
    env.discharge(key)
    with env.refused(InvalidStateForCommand, match="cannot record attendance"):
        env.handle(c.RecordAttendance(patient_key=key, service_date=day(0).date(), hours=2))


# -- discharge --------------------------------------------------------------------------------


def test_discharge(env: Env) -> None:
    admitted = env.admit("3.5", "001040", site="north")
    key = admitted.stream_id
    env.clock.advance(days=20)
    event = env.discharge(key, DischargeReason.DROPPED_OUT, Disposition.LEFT_AGAINST_ADVICE)
    assert event.policy == ASAM3
    data = event.data
    assert data.episode_id == admitted.data.episode_id
    assert (data.from_level, data.from_site) == ("3.5", "north")
    assert (data.reason, data.disposition) == (
        DischargeReason.DROPPED_OUT,
        Disposition.LEFT_AGAINST_ADVICE,
    )
    state = env.state(key)
    assert (state.state, state.placed_at, state.version) == ("discharged", day(20), 2)


def test_discharge_death_with_expired(env: Env) -> None:
    key = env.admit().stream_id
    event = env.discharge(key, DischargeReason.DEATH, Disposition.EXPIRED)
    assert event.data.reason == DischargeReason.DEATH


@pytest.mark.parametrize(
    ("reason", "disposition"),
    [
        (DischargeReason.DEATH, Disposition.HOME),
        (DischargeReason.DEATH, Disposition.OTHER),
        (DischargeReason.COMPLETED, Disposition.EXPIRED),
        (DischargeReason.OTHER, Disposition.EXPIRED),
    ],
)
def test_discharge_death_and_expired_go_together(
    env: Env, reason: DischargeReason, disposition: Disposition
) -> None:
    key = env.admit().stream_id
    with env.refused(InvalidInput, match="reason death goes with disposition exp") as info:
        env.discharge(key, reason, disposition)
    assert info.value.rule == "discharge.reason_disposition_mismatch"
    assert info.value.field == "disposition"


def test_discharge_twice(env: Env) -> None:
    key = env.admit().stream_id
    env.discharge(key)
    with env.refused(InvalidStateForCommand, match="cannot discharge: .* is discharged"):
        env.discharge(key)


def test_discharge_before_the_placement(env: Env) -> None:
    env.clock.advance(days=2)
    key = env.admit(occurred_at=day(2)).stream_id
    with env.refused(InvalidClinicalTime, match="before the current placement"):
        env.discharge(key, occurred_at=day(1))


def test_discharge_unknown_patient(env: Env) -> None:
    with env.refused(UnknownPatient):
        env.discharge(UNKNOWN_KEY)


# -- readmit ----------------------------------------------------------------------------------


def test_readmit_starts_a_new_episode(env: Env) -> None:
    admitted = env.admit("3.5", "001040")
    key = admitted.stream_id
    env.clock.advance(days=3)
    env.reassess(key, "020000", 12)
    env.clock.advance(days=1)
    env.discharge(key)
    env.clock.advance(days=2)
    event = env.readmit(key, "2.1", "020000", 10)
    data = event.data
    assert event.policy == ASAM3
    assert data.episode_number == 2
    assert data.previous_episode_id == admitted.data.episode_id
    assert data.episode_id != admitted.data.episode_id
    assert data.age_group == AgeGroup.ADULT  # carried over from the last episode
    state = env.state(key)
    assert (state.state, state.version) == ("2.1", 4)
    assert state.episode.number == 2
    assert [e.number for e in state.episodes] == [1, 2]
    assert list(state.assessments) == [event.event_id]

    env.clock.advance(days=3)
    env.discharge(key)
    again = env.readmit(key, "2.1", "020000", 10)
    assert again.data.episode_number == 3
    assert again.data.previous_episode_id == data.episode_id


def test_readmit_assessment_is_what_the_next_transition_rests_on(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=3)
    old = env.reassess(key, "020000", 12)  # indicates 2.1, but belongs to episode 1
    env.clock.advance(days=1)
    env.discharge(key)
    env.clock.advance(days=1)
    readmitted = env.readmit(key, "3.5", "001040")
    env.clock.advance(days=1)
    with env.refused(VarianceReasonRequired, match="indicated level 3.5"):
        env.transition(key, "2.1")
    with env.refused(ReassessmentMissing, match="earlier episode"):
        env.transition(key, "2.1", reassessment_event_id=old.event_id)
    event = env.transition(key, "3.5", site="s2")
    assert event.data.reassessment_event_id == readmitted.event_id
    assert event.data.episode_id == readmitted.data.episode_id


def test_readmit_can_change_the_age_group(env: Env) -> None:
    key = env.admit("3.5", "001040", age_group=AgeGroup.ADOLESCENT).stream_id
    env.discharge(key)
    event = env.readmit(key, "2.1", "020000", 10, age_group=AgeGroup.ADULT)
    assert event.data.age_group == AgeGroup.ADULT


def test_readmit_an_active_patient(env: Env) -> None:
    key = env.admit().stream_id
    with env.refused(InvalidStateForCommand, match="cannot readmit: .* is 3.5"):
        env.readmit(key)


def test_readmit_unknown_patient(env: Env) -> None:
    with env.refused(UnknownPatient):
        env.readmit(UNKNOWN_KEY)


def test_readmit_before_the_discharge(env: Env) -> None:
    key = env.admit().stream_id
    env.clock.advance(days=5)
    env.discharge(key)
    with env.refused(InvalidClinicalTime, match="before the discharge"):
        env.readmit(key, occurred_at=day(4))


def test_readmit_checks_entry_rules(env: Env) -> None:
    key = env.admit().stream_id
    env.discharge(key)
    with env.refused(TransitionNotAllowed, match="readmit at level aftercare"):
        env.readmit(key, "aftercare", "000000")
    with env.refused(VarianceReasonRequired):
        env.readmit(key, "3.7", "001040")
    with env.refused(HoursOutsideBand):
        env.readmit(key, "2.1", "020000", 30)


# -- void -----------------------------------------------------------------------------------


def test_void_a_reassessment_falls_back_to_the_previous_one(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=2)
    first = env.reassess(key, "020000", 12)
    env.clock.advance(days=1)
    second = env.reassess(key, "001040")
    void = env.void(key, second.event_id)
    assert void.policy is None
    assert void.data.voided_event_id == second.event_id
    assert void.data.voided_event_type == "ReassessmentRecorded"
    state = env.state(key)
    assert second.event_id not in state.assessments
    assert state.voided == {second.event_id}
    env.clock.advance(days=1)
    event = env.transition(key, "2.1")
    assert event.data.reassessment_event_id == first.event_id
    with env.refused(ReassessmentMissing):
        env.transition(key, "3.5", reassessment_event_id=second.event_id)


def test_void_a_reassessment_leaves_none_fresh(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=10)
    fresh = env.reassess(key, "020000", 12)
    env.transition(key, "2.1")
    env.reassess(key, "020000", 12)
    env.void(key, fresh.event_id)
    state = env.state(key)
    assert fresh.event_id not in state.assessments
    assert state.state == "2.1"  # the transition that rested on it stands


def test_void_a_reassessment_then_transition_is_stale(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=10)
    fresh = env.reassess(key, "020000", 12)
    env.void(key, fresh.event_id)
    with env.refused(ReassessmentStale, match="latest is 10 days old"):
        env.transition(key, "2.1")


def test_void_a_transition_restores_level_and_site(env: Env) -> None:
    key = env.admit("3.5", "001040", site="north", program="p1").stream_id
    env.clock.advance(days=1)
    env.reassess(key, "020000", 12)
    moved = env.transition(key, "2.1", site="south", program="p2")
    void = env.void(key, moved.event_id)
    assert void.data.voided_event_type == "LevelTransitioned"
    state = env.state(key)
    assert (state.state, state.site, state.program, state.placed_at) == (
        "3.5",
        "north",
        "p1",
        day(0),
    )
    # and the patient can move again from where they were
    event = env.transition(key, "2.1", site="east")
    assert (event.data.from_level, event.data.from_site) == ("3.5", "north")


def test_void_a_transition_keeps_later_reassessments(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=1)
    moved = env.transition(key, "3.5", site="s2")
    env.clock.advance(days=1)
    later = env.reassess(key, "020000", 12)
    env.void(key, moved.event_id)
    state = env.state(key)
    assert (state.state, state.site) == ("3.5", "s1")
    assert later.event_id in state.assessments
    event = env.transition(key, "2.1", reassessment_event_id=later.event_id)
    assert event.data.reassessment_event_id == later.event_id


def test_void_the_admission(env: Env) -> None:
    key = env.admit().stream_id
    env.clock.advance(hours=1)
    admitted_id = env.state(key).changes[-1].event_id
    env.void(key, admitted_id, VoidReason.WRONG_PATIENT)
    state = env.state(key)
    assert (state.state, state.site, state.episode, state.episodes) == ("new", None, None, [])
    assert state.assessments == {}
    assert state.version == 2
    with env.refused(InvalidStateForCommand):
        env.reassess(key, "001040")
    with env.refused(InvalidStateForCommand, match="cannot readmit: .* is new"):
        env.readmit(key)


def test_admit_again_after_the_admission_was_voided(env: Env) -> None:
    admitted = env.admit("3.5", "001040")
    key = admitted.stream_id
    env.clock.advance(days=1)
    env.void(key, admitted.event_id, VoidReason.WRONG_DATE)
    again = env.admit("2.1", "020000", 12, patient_key=key, occurred_at=day(0.5))
    assert again.stream_version == 3
    assert again.data.episode_number == 1
    state = env.state(key)
    assert (state.state, state.placed_at) == ("2.1", day(0.5))
    assert [e.episode_id for e in state.episodes] == [again.data.episode_id]
    assert list(state.assessments) == [again.event_id]
    with env.refused(InvalidStateForCommand, match="already exists"):
        env.admit(patient_key=key)


def test_void_a_discharge_returns_to_care(env: Env) -> None:
    key = env.admit("3.5", "001040", site="north").stream_id
    env.clock.advance(days=1)
    discharged = env.discharge(key)
    env.void(key, discharged.event_id)
    state = env.state(key)
    assert (state.state, state.site, state.placed_at) == ("3.5", "north", day(0))
    assert state.episode.number == 1


def test_void_a_readmission_returns_to_discharged(env: Env) -> None:
    admitted = env.admit()
    key = admitted.stream_id
    env.clock.advance(days=1)
    env.discharge(key)
    readmitted = env.readmit(key)
    env.void(key, readmitted.event_id)
    state = env.state(key)
    assert state.state == "discharged"
    assert state.episode.episode_id == admitted.data.episode_id
    assert [e.number for e in state.episodes] == [1]
    again = env.readmit(key)
    assert again.data.episode_number == 2


def test_void_of_a_non_latest_placement_change(env: Env) -> None:
    admitted = env.admit("3.5", "001040")
    key = admitted.stream_id
    env.clock.advance(days=1)
    moved = env.transition(key, "3.5", site="s2")
    with env.refused(InvalidStateForCommand, match=f"void {moved.event_id} first") as info:
        env.void(key, admitted.event_id)
    assert info.value.rule == "void.not_latest_change"
    assert info.value.details == {"latest": str(moved.event_id)}


def test_void_twice(env: Env) -> None:
    key = env.admit().stream_id
    reassessed = env.reassess(key, "001040")
    env.void(key, reassessed.event_id)
    with env.refused(Duplicate, match=f"event {reassessed.event_id} is already voided") as info:
        env.void(key, reassessed.event_id)
    assert info.value.rule == "void.already_voided"


def test_void_of_a_void(env: Env) -> None:
    key = env.admit().stream_id
    reassessed = env.reassess(key, "001040")
    void = env.void(key, reassessed.event_id)
    with env.refused(InvalidStateForCommand, match="a void cannot be voided") as info:
        env.void(key, void.event_id)
    assert info.value.rule == "void.of_void"


def test_void_an_unknown_event(env: Env) -> None:
    key = env.admit().stream_id
    missing = uuid4()
    with env.refused(UnknownEvent, match=f"has no event {missing}") as info:
        env.void(key, missing)
    assert info.value.field == "event_id"


def test_void_an_event_of_another_patient(env: Env) -> None:
    first = env.admit()
    second = env.admit()
    with env.refused(UnknownEvent):
        env.void(second.stream_id, first.event_id)


def test_void_for_an_unknown_patient(env: Env) -> None:
    with env.refused(UnknownPatient):
        env.void(UNKNOWN_KEY, uuid4())


def test_void_an_attendance(env: Env) -> None:
    key = env.admit("2.1", "020000", 12).stream_id
    attended = env.one(c.RecordAttendance(patient_key=key, service_date=day(0).date(), hours=2))
    env.void(key, attended.event_id, VoidReason.DUPLICATE)
    state = env.state(key)
    assert state.state == "2.1"
    assert state.voided == {attended.event_id}


# -- concurrency and idempotency --------------------------------------------------------------


def test_expected_version_matches(env: Env) -> None:
    key = env.admit().stream_id
    event = env.one(
        c.RecordReassessment(patient_key=key, assessment=assessment("001040"), expected_version=1)
    )
    assert event.stream_version == 2


def test_expected_version_mismatch(env: Env) -> None:
    key = env.admit().stream_id
    env.reassess(key, "001040")
    with env.refused(ConcurrencyConflict, match="expected version 1, actual 2") as info:
        env.handle(
            c.RecordReassessment(
                patient_key=key, assessment=assessment("001040"), expected_version=1
            )
        )
    assert (info.value.stream_id, info.value.expected, info.value.actual) == (key, 1, 2)
    assert info.value.rule == "stream.version_conflict"


def test_expected_version_on_admit(env: Env) -> None:
    with env.refused(ConcurrencyConflict) as info:
        env.handle(
            c.Admit(
                patient_key=UNKNOWN_KEY,
                level="3.5",
                site="s1",
                age_group=AgeGroup.ADULT,
                assessment=assessment("001040"),
                expected_version=3,
            )
        )
    assert (info.value.expected, info.value.actual) == (3, 0)


def test_idempotency_key_replays_the_first_result(env: Env) -> None:
    command = c.Admit(
        level="3.5", site="s1", age_group=AgeGroup.ADULT, assessment=assessment("001040")
    )
    first = env.handle(command, CommandContext(idempotency_key="req-1"))
    assert first.replayed is False
    head = env.store.head_position()
    env.clock.advance(days=1)
    again = env.handle(command, CommandContext(idempotency_key="req-1"))
    assert again.replayed is True
    assert again.stream_id == first.stream_id
    assert again.stream_version == first.stream_version == 1
    assert [e.event_id for e in again.events] == [e.event_id for e in first.events]
    assert env.store.head_position() == head
    assert env.store.stream_ids() == [first.stream_id]


def test_idempotency_key_with_another_command(env: Env) -> None:
    key = env.admit().stream_id
    ctx = CommandContext(idempotency_key="req-2")
    env.handle(c.RecordReassessment(patient_key=key, assessment=assessment("001040")), ctx)
    with env.refused(Duplicate, match="'req-2' was already used for a different command") as info:
        env.handle(c.RecordReassessment(patient_key=key, assessment=assessment("020000", 12)), ctx)
    assert info.value.rule == "idempotency.key_reused"


def test_refused_command_does_not_consume_the_idempotency_key(env: Env) -> None:
    key = env.admit().stream_id
    ctx = CommandContext(idempotency_key="req-3")
    with env.refused(VarianceReasonRequired):
        env.handle(c.Transition(patient_key=key, to_level="2.1"), ctx)
    env.reassess(key, "020000", 12)
    result = env.handle(c.Transition(patient_key=key, to_level="2.1"), ctx)
    assert result.replayed is False
    assert result.events[0].data.placement.level == "2.1"


# -- policy switch ----------------------------------------------------------------------------


def test_an_open_episode_keeps_its_policy() -> None:
    store = InMemoryEventStore()
    old = make_env("asam-3", store)
    new = make_env("asam-4", store)
    key = old.admit("3.7-WM", "300000").stream_id

    fresh = new.admit("3.5", "000040")
    assert fresh.policy == ASAM4
    assert fresh.data.assessment.indicated_level == "3.5"
    with new.refused(UnknownLevel, match="asam-4@2026.1"):
        new.admit("3.7-WM", "300000")

    # the asam-3 patient's open episode is judged by asam-3 even under the asam-4 service
    reassessed = new.reassess(key, "200000")
    assert reassessed.policy == ASAM3
    assert reassessed.data.assessment.indicated_level == "2-WM"
    moved = new.transition(key, "2-WM")
    assert moved.policy == ASAM3
    assert new.state(key).state == "2-WM"
    discharged = new.discharge(key)
    assert discharged.policy == ASAM3

    # a new episode is judged by the service's default policy
    readmitted = new.readmit(key, "2.7", "200000")
    assert readmitted.policy == ASAM4
    state = new.state(key)
    assert [e.policy for e in state.episodes] == [ASAM3, ASAM4]
    assert state.state == "2.7"
    # and old level codes are no longer known in it
    with new.refused(UnknownLevel):
        new.transition(key, "2-WM", variance_reason=VarianceReason.CLINICAL_OVERRIDE)
    # the asam-3 service, too, keeps the asam-4 episode on asam-4
    again = old.reassess(key, "000040")
    assert again.policy == ASAM4
    assert again.data.assessment.indicated_level == "3.5"


# -- the envelope -----------------------------------------------------------------------------


DECISION_EVENTS = {
    "PatientAdmitted",
    "PatientReadmitted",
    "ReassessmentRecorded",
    "LevelTransitioned",
    "PatientDischarged",
}


def test_every_event_carries_the_envelope(env: Env) -> None:
    actor = Actor(id="cm-12", role=ActorRole.CASE_MANAGER)
    correlation = uuid4()
    contexts: dict[UUID, CommandContext] = {}

    def run(command: c.Command) -> PatientEvent:
        ctx = CommandContext(actor=actor, correlation_id=correlation, command_id=uuid4())
        event = env.one(command, ctx)
        contexts[event.event_id] = ctx
        return event

    admitted = run(
        c.Admit(level="3.5", site="s1", age_group=AgeGroup.ADULT, assessment=assessment("001040"))
    )
    key = admitted.stream_id
    env.clock.advance(days=1)
    reassessed = run(c.RecordReassessment(patient_key=key, assessment=assessment("020000", 12)))
    run(c.Transition(patient_key=key, to_level="2.1"))
    env.clock.advance(hours=3)
    run(c.RecordAttendance(patient_key=key, service_date=day(1).date(), hours=3))
    run(
        c.VoidEvent(
            patient_key=key, event_id=reassessed.event_id, reason=VoidReason.ENTERED_IN_ERROR
        )
    )
    env.clock.advance(days=2)
    run(
        c.Discharge(patient_key=key, reason=DischargeReason.COMPLETED, disposition=Disposition.HOME)
    )
    run(c.Readmit(patient_key=key, level="3.5", site="s1", assessment=assessment("001040")))

    events = env.store.read_stream(key)
    assert [e.event_type for e in events] == [
        "PatientAdmitted",
        "ReassessmentRecorded",
        "LevelTransitioned",
        "AttendanceRecorded",
        "EventVoided",
        "PatientDischarged",
        "PatientReadmitted",
    ]
    assert env.store.read_all() == events
    for number, event in enumerate(events, start=1):
        assert set(type(event).model_fields) == ENVELOPE_FIELDS
        dumped = event.to_json_dict()
        assert set(dumped) == ENVELOPE_FIELDS
        ctx = contexts[event.event_id]
        assert isinstance(event.event_id, UUID)
        assert event.event_type == type(event).EVENT_TYPE
        assert event.schema_version == 1
        assert event.stream_id == key
        assert event.stream_version == number
        assert event.position == number
        assert event.occurred_at.tzinfo is not None
        assert event.recorded_at == event.occurred_at  # no command here was backdated
        assert event.actor == actor
        assert event.correlation_id == correlation
        assert event.causation_id == ctx.command_id
        if event.event_type in DECISION_EVENTS:
            assert event.policy == ASAM3
        else:
            assert event.policy is None
    assert len({e.event_id for e in events}) == len(events)
    assert len({e.causation_id for e in events}) == len(events)


def test_default_context(env: Env) -> None:
    event = env.admit()
    assert event.actor == Actor(id="system", role=ActorRole.SYSTEM)
    assert event.causation_id != event.correlation_id


def test_recorded_at_is_service_time(env: Env) -> None:
    env.clock.advance(days=2)
    event = env.admit(occurred_at=day(1) + dt.timedelta(hours=3))
    assert event.recorded_at == day(2)
    assert event.occurred_at == day(1) + dt.timedelta(hours=3)


def test_occurred_at_is_normalised_to_utc(env: Env) -> None:
    env.clock.advance(days=1)
    plus_two = dt.timezone(dt.timedelta(hours=2))
    event = env.admit(occurred_at=dt.datetime(2026, 1, 5, 12, 0, tzinfo=plus_two))
    assert event.occurred_at == dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.UTC)
    assert event.occurred_at.utcoffset() == dt.timedelta(0)


def test_replay_equals_the_live_state(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=1)
    env.reassess(key, "020000", 12)
    moved = env.transition(key, "2.1")
    env.void(key, moved.event_id)
    state = env.state(key)
    rebuilt = replay(key, env.store.read_stream(key), registry())
    assert rebuilt == state
    assert rebuilt.state == "3.5"


def test_stale_named_reassessment_says_it_was_the_named_one(env: Env) -> None:
    key = env.admit("3.5", "001040").stream_id
    env.clock.advance(days=1)
    old = env.reassess(key, "001200", 12)
    env.clock.advance(days=9)
    env.reassess(key, "001200", 12)
    with env.refused(ReassessmentStale, match="the one named is 9 days old"):
        env.transition(key, "2.1", reassessment_event_id=old.event_id)
