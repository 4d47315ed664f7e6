"""A patient's state, rebuilt by folding their events; and the rules that decide commands.

`PatientState.apply` is the only way state changes, live or on replay, so a rebuilt patient
always equals the live one. `apply` trusts recorded outcomes and runs no guard: the policy may
have changed since. The `decide_*` functions check a command against the state and the policy
and return the events to record, or raise a specific `ContinuumError`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from uuid import UUID, uuid4

from pydantic import BaseModel

from continuum.domain import commands as c
from continuum.domain.errors import (
    Duplicate,
    HoursOutsideBand,
    InvalidClinicalTime,
    InvalidInput,
    InvalidStateForCommand,
    ReassessmentMissing,
    ReassessmentStale,
    TransitionNotAllowed,
    UnknownConsent,
    UnknownEvent,
    UnknownPatient,
    VarianceReasonRequired,
)
from continuum.domain.machine import NEW, PolicyMachine, machine_for
from continuum.domain.policy import Policy, PolicyRegistry
from continuum_events import (
    CONSENT_EVENTS,
    STATE_CHANGING_EVENTS,
    AgeGroup,
    Assessment,
    AttendanceRecorded,
    AttendanceRecordedData,
    ConsentGiven,
    ConsentGivenData,
    ConsentPurpose,
    ConsentRevoked,
    ConsentRevokedData,
    Direction,
    DischargeReason,
    Disposition,
    EventEnvelope,
    EventVoided,
    EventVoidedData,
    LevelTransitioned,
    LevelTransitionedData,
    PatientAdmitted,
    PatientAdmittedData,
    PatientDischarged,
    PatientDischargedData,
    PatientEvent,
    PatientReadmitted,
    PatientReadmittedData,
    Placement,
    PolicyRef,
    ReassessmentRecorded,
    ReassessmentRecordedData,
)
from continuum_events.consent import ORG_CODE_PATTERN

#: Clinical times may run this far ahead of the service clock (device clocks drift).
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Episode:
    episode_id: UUID
    number: int
    policy: PolicyRef
    age_group: AgeGroup
    admitted_at: dt.datetime


@dataclass(frozen=True)
class AssessmentRecord:
    event_id: UUID
    occurred_at: dt.datetime
    ratings: dict[str, str]
    indicated_level: str
    hours_scheduled: float | None


@dataclass(frozen=True)
class Snapshot:
    """What a placement change replaced; restored when that change is voided."""

    state: str
    site: str | None
    program: str | None
    episode: Episode | None
    assessments: dict[UUID, AssessmentRecord]
    placed_at: dt.datetime | None


@dataclass(frozen=True)
class PlacementChange:
    event_id: UUID
    event_type: str
    occurred_at: dt.datetime
    before: Snapshot


@dataclass(frozen=True)
class Consent:
    """One consent on the patient's record, as the log says (revocation included)."""

    consent_id: str
    recipient_org: str
    purposes: tuple[ConsentPurpose, ...]
    given_on: dt.date
    expires_on: dt.date | None
    document_ref: str
    event_id: UUID
    revoked_on: dt.date | None = None
    revoked_by: UUID | None = None

    def status(self, on: dt.date) -> str:
        """ "revoked", "expired" (after its expires_on) or "active", as of the date `on`."""
        if self.revoked_by is not None:
            return "revoked"
        if self.expires_on is not None and on > self.expires_on:
            return "expired"
        return "active"


@dataclass
class PatientState:
    """Everything the rules need about one patient, and nothing else."""

    stream_id: str
    version: int = 0
    state: str = NEW
    site: str | None = None
    program: str | None = None
    episode: Episode | None = None
    episodes: list[Episode] = field(default_factory=list)
    placed_at: dt.datetime | None = None
    assessments: dict[UUID, AssessmentRecord] = field(default_factory=dict)
    changes: list[PlacementChange] = field(default_factory=list)
    event_types: dict[UUID, str] = field(default_factory=dict)
    voided: set[UUID] = field(default_factory=set)
    #: Every consent the patient gave, by consent id, in the order given.
    consents: dict[str, Consent] = field(default_factory=dict)

    # -- queries ----------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        return self.version > 0

    def is_active(self, terminal: str) -> bool:
        return self.state not in (NEW, terminal)

    def latest_assessment(self) -> AssessmentRecord | None:
        if not self.assessments:
            return None
        # Ties on occurred_at go to the one recorded last (dict order is stream order).
        return max(reversed(self.assessments.values()), key=lambda a: a.occurred_at)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            state=self.state,
            site=self.site,
            program=self.program,
            episode=self.episode,
            assessments=dict(self.assessments),
            placed_at=self.placed_at,
        )

    # -- the fold ---------------------------------------------------------------------------

    def apply(self, event: PatientEvent, policies: PolicyRegistry | None = None) -> None:
        """Apply one recorded event. Runs no guard; trusts the recorded outcome."""
        if event.stream_version != self.version + 1:
            raise ValueError(
                f"event {event.event_id} has stream_version {event.stream_version}; "
                f"patient {self.stream_id} is at {self.version}"
            )
        self.version = event.stream_version
        self.event_types[event.event_id] = event.event_type
        match event:
            case PatientAdmitted() | PatientReadmitted():
                before = self.snapshot()
                data = event.data
                policy = event.policy or PolicyRef(id="unknown", version="unknown")
                self.episode = Episode(
                    episode_id=data.episode_id,
                    number=data.episode_number,
                    policy=policy,
                    age_group=data.age_group,
                    admitted_at=event.occurred_at,
                )
                self.episodes.append(self.episode)
                self._set_state(data.placement.level, event.policy, policies)
                self.site, self.program = data.placement.site, data.placement.program
                self.placed_at = event.occurred_at
                self.assessments = {event.event_id: _record(event.event_id, event, data.assessment)}
                self.changes.append(
                    PlacementChange(event.event_id, event.event_type, event.occurred_at, before)
                )
            case ReassessmentRecorded():
                self.assessments[event.event_id] = _record(
                    event.event_id, event, event.data.assessment
                )
            case LevelTransitioned():
                before = self.snapshot()
                placement = event.data.placement
                self._set_state(placement.level, event.policy, policies)
                self.site, self.program = placement.site, placement.program
                self.placed_at = event.occurred_at
                self.changes.append(
                    PlacementChange(event.event_id, event.event_type, event.occurred_at, before)
                )
            case PatientDischarged():
                before = self.snapshot()
                terminal = self._terminal(event.policy, policies)
                self._set_state(terminal, event.policy, policies)
                self.placed_at = event.occurred_at
                self.changes.append(
                    PlacementChange(event.event_id, event.event_type, event.occurred_at, before)
                )
            case AttendanceRecorded():
                pass
            case ConsentGiven():
                given = event.data
                self.consents[given.consent_id] = Consent(
                    consent_id=given.consent_id,
                    recipient_org=given.recipient_org,
                    purposes=tuple(given.purposes),
                    given_on=given.given_on,
                    expires_on=given.expires_on,
                    document_ref=given.document_ref,
                    event_id=event.event_id,
                )
            case ConsentRevoked():
                known = self.consents.get(event.data.consent_id)
                if known is not None:
                    self.consents[known.consent_id] = replace(
                        known, revoked_on=event.data.revoked_on, revoked_by=event.event_id
                    )
            case EventVoided():
                self._apply_void(event.data.voided_event_id, policies)

    def _apply_void(self, target: UUID, policies: PolicyRegistry | None) -> None:
        self.voided.add(target)
        self.assessments.pop(target, None)
        if self.changes and self.changes[-1].event_id == target:
            change = self.changes.pop()
            before = change.before
            if change.event_type in ("PatientAdmitted", "PatientReadmitted") and self.episodes:
                self.episodes.pop()
            self.state = before.state
            self.site, self.program = before.site, before.program
            self.episode = before.episode
            self.placed_at = before.placed_at
            if change.event_type in ("PatientAdmitted", "PatientReadmitted"):
                # the episode is gone: back to the previous episode's assessments
                self.assessments = {
                    k: v for k, v in before.assessments.items() if k not in self.voided
                }
            # otherwise the episode stands, and so do reassessments recorded after the change

    def _set_state(
        self, state: str, policy: PolicyRef | None, policies: PolicyRegistry | None
    ) -> None:
        machine = _machine_or_none(policy, policies)
        if machine is not None and state in machine.states:
            machine.set_state(self, state)
        else:  # the recorded policy is not loaded here: trust the record all the same
            self.state = state

    def _terminal(self, policy: PolicyRef | None, policies: PolicyRegistry | None) -> str:
        machine = _machine_or_none(policy, policies)
        return machine.terminal if machine is not None else "discharged"


def _machine_or_none(
    policy: PolicyRef | None, policies: PolicyRegistry | None
) -> PolicyMachine | None:
    if policy is None or policies is None:
        return None
    try:
        return machine_for(policies.get(policy.id, policy.version))
    except Exception:
        return None


def _record(event_id: UUID, event: EventEnvelope, assessment: Assessment) -> AssessmentRecord:
    return AssessmentRecord(
        event_id=event_id,
        occurred_at=event.occurred_at,
        ratings=dict(assessment.ratings),
        indicated_level=assessment.indicated_level,
        hours_scheduled=assessment.hours_scheduled,
    )


def replay(
    stream_id: str, events: Iterable[PatientEvent], policies: PolicyRegistry | None = None
) -> PatientState:
    state = PatientState(stream_id=stream_id)
    for event in events:
        state.apply(event, policies)
    return state


# -- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """An event the domain decided to record; the application adds the envelope metadata."""

    event_type: type[EventEnvelope]
    data: BaseModel
    occurred_at: dt.datetime
    policy: PolicyRef | None
    event_id: UUID = field(default_factory=uuid4)


def _clinical_time(
    requested: dt.datetime | None, now: dt.datetime, *, not_before: dt.datetime | None, what: str
) -> dt.datetime:
    when = (requested or now).astimezone(dt.UTC)
    if when > now + CLOCK_SKEW:
        raise InvalidClinicalTime(
            f"occurred_at {when.isoformat()} is in the future (service time {now.isoformat()})",
            field="occurred_at",
            occurred_at=when.isoformat(),
            now=now.isoformat(),
        )
    if not_before is not None and when < not_before:
        raise InvalidClinicalTime(
            f"occurred_at {when.isoformat()} is before {what} at {not_before.isoformat()}",
            field="occurred_at",
            occurred_at=when.isoformat(),
            not_before=not_before.isoformat(),
        )
    return when


def _require_exists(state: PatientState) -> None:
    if not state.exists:
        raise UnknownPatient(
            f"no patient with key {state.stream_id}", field="patient_key", patient=state.stream_id
        )


def _require_active(state: PatientState, policy: Policy, command: str) -> Episode:
    _require_exists(state)
    if not state.is_active(policy.terminal_state) or state.episode is None:
        raise InvalidStateForCommand(
            f"cannot {command}: patient {state.stream_id} is {state.state}, not in care",
            patient=state.stream_id,
            state=state.state,
        )
    return state.episode


def _assessment(policy: Policy, given: c.AssessmentInput, field_prefix: str) -> Assessment:
    policy.validate_ratings(given.ratings, field=f"{field_prefix}.ratings")
    return Assessment(
        instrument=given.instrument,
        assessor_id=given.assessor_id,
        ratings=dict(given.ratings),
        indicated_level=policy.indicated_level(given.ratings),
        hours_scheduled=given.hours_scheduled,
        scores=dict(given.scores),
        source_ref=given.source_ref,
    )


def _check_variance(
    policy: Policy,
    *,
    provided: str,
    indicated: str,
    reason: object,
    authorization_ref: str | None,
) -> None:
    if provided != indicated and reason is None:
        raise VarianceReasonRequired(
            f"level {provided} differs from the indicated level {indicated}: a variance reason "
            "is required (patient_preference, no_slot, payer_decision, clinical_override)",
            field="variance_reason",
            policy=policy.label,
            provided=provided,
            indicated=indicated,
        )
    if provided == indicated and reason is not None:
        raise InvalidInput(
            f"variance_reason given but level {provided} is the indicated level",
            rule="placement.variance_reason_unexpected",
            field="variance_reason",
            policy=policy.label,
        )


def _check_band(
    policy: Policy, *, level: str, age_group: AgeGroup, hours: float | None, source: str
) -> None:
    band = policy.band_for(level, age_group)
    if band is None:
        return
    if hours is None:
        raise HoursOutsideBand(
            f"level {level} for {age_group.value}s needs {band.describe()} scheduled; "
            f"{source} records no hours_scheduled",
            field="hours_scheduled",
            policy=policy.label,
            level=level,
            band=band.describe(),
        )
    if not band.contains(hours):
        raise HoursOutsideBand(
            f"level {level} for {age_group.value}s needs {band.describe()}; "
            f"{source} schedules {hours:g} h/week",
            field="hours_scheduled",
            policy=policy.label,
            level=level,
            band=band.describe(),
            hours=hours,
        )


def _placement_for_entry(
    policy: Policy,
    machine: PolicyMachine,
    state: PatientState,
    *,
    trigger: str,
    level: str,
    site: str,
    program: str | None,
    age_group: AgeGroup,
    assessment: Assessment,
    variance_reason: object,
    authorization_ref: str | None,
) -> Placement:
    policy.level(level)
    if not machine.may(state.state, f"{trigger}:{level}"):
        raise TransitionNotAllowed(
            f"{trigger} at level {level} is not allowed by policy {policy.label}; "
            f"entry levels: {', '.join(policy.admission_levels)}",
            field="level",
            policy=policy.label,
            level=level,
        )
    _check_variance(
        policy,
        provided=level,
        indicated=assessment.indicated_level,
        reason=variance_reason,
        authorization_ref=authorization_ref,
    )
    _check_band(
        policy,
        level=level,
        age_group=age_group,
        hours=assessment.hours_scheduled,
        source="the admission assessment",
    )
    return Placement.model_validate(
        {
            "level": level,
            "site": site,
            "program": program,
            "indicated_level": assessment.indicated_level,
            "variance_reason": variance_reason,
            "authorization_ref": authorization_ref,
        }
    )


def decide_admit(
    state: PatientState, cmd: c.Admit, policy: Policy, now: dt.datetime
) -> list[Decision]:
    if state.exists and state.state != NEW:  # NEW again once the admission was voided
        raise InvalidStateForCommand(
            f"patient {state.stream_id} already exists (state {state.state}); "
            "use readmit for a new episode",
            rule="patient.already_admitted",
            field="patient_key",
            patient=state.stream_id,
        )
    machine = machine_for(policy)
    when = _clinical_time(cmd.occurred_at, now, not_before=None, what="")
    assessment = _assessment(policy, cmd.assessment, "assessment")
    placement = _placement_for_entry(
        policy,
        machine,
        state,
        trigger="admit",
        level=cmd.level,
        site=cmd.site,
        program=cmd.program,
        age_group=cmd.age_group,
        assessment=assessment,
        variance_reason=cmd.variance_reason,
        authorization_ref=cmd.authorization_ref,
    )
    data = PatientAdmittedData(
        episode_id=uuid4(),
        episode_number=1,
        age_group=cmd.age_group,
        assessment=assessment,
        placement=placement,
    )
    return [Decision(PatientAdmitted, data, when, policy.ref)]


def decide_readmit(
    state: PatientState, cmd: c.Readmit, policy: Policy, now: dt.datetime
) -> list[Decision]:
    _require_exists(state)
    if state.state != policy.terminal_state or state.episode is None:
        raise InvalidStateForCommand(
            f"cannot readmit: patient {state.stream_id} is {state.state}; "
            "only a discharged patient starts a new episode",
            patient=state.stream_id,
            state=state.state,
        )
    machine = machine_for(policy)
    when = _clinical_time(cmd.occurred_at, now, not_before=state.placed_at, what="the discharge")
    age_group = cmd.age_group or state.episode.age_group
    assessment = _assessment(policy, cmd.assessment, "assessment")
    placement = _placement_for_entry(
        policy,
        machine,
        state,
        trigger="readmit",
        level=cmd.level,
        site=cmd.site,
        program=cmd.program,
        age_group=age_group,
        assessment=assessment,
        variance_reason=cmd.variance_reason,
        authorization_ref=cmd.authorization_ref,
    )
    data = PatientReadmittedData(
        episode_id=uuid4(),
        episode_number=max(e.number for e in state.episodes) + 1,
        age_group=age_group,
        assessment=assessment,
        placement=placement,
        previous_episode_id=state.episode.episode_id,
    )
    return [Decision(PatientReadmitted, data, when, policy.ref)]


def decide_reassessment(
    state: PatientState, cmd: c.RecordReassessment, policy: Policy, now: dt.datetime
) -> list[Decision]:
    episode = _require_active(state, policy, "record a reassessment")
    when = _clinical_time(cmd.occurred_at, now, not_before=episode.admitted_at, what="admission")
    assessment = _assessment(policy, cmd.assessment, "assessment")
    data = ReassessmentRecordedData(
        episode_id=episode.episode_id, level_at_assessment=state.state, assessment=assessment
    )
    return [Decision(ReassessmentRecorded, data, when, policy.ref)]


def direction_of(policy: Policy, from_level: str, to_level: str) -> Direction:
    before, after = policy.level(from_level).rank, policy.level(to_level).rank
    if after < before:
        return Direction.STEP_DOWN
    if after > before:
        return Direction.STEP_UP
    return Direction.LATERAL


def decide_transition(
    state: PatientState, cmd: c.Transition, policy: Policy, now: dt.datetime
) -> list[Decision]:
    episode = _require_active(state, policy, f"transition to {cmd.to_level}")
    machine = machine_for(policy)
    when = _clinical_time(
        cmd.occurred_at, now, not_before=state.placed_at, what="the current placement"
    )
    policy.level(cmd.to_level, field="to_level")
    site = cmd.site or state.site or ""
    program = cmd.program if cmd.program is not None else state.program
    if cmd.to_level == state.state and site == state.site and program == state.program:
        raise InvalidStateForCommand(
            f"patient {state.stream_id} is already at {cmd.to_level} at {site}: nothing to move",
            rule="transition.no_change",
            field="to_level",
            patient=state.stream_id,
        )
    direction = direction_of(policy, state.state, cmd.to_level)
    move = direction.value.replace("_", "-")
    if not machine.may(state.state, f"move:{cmd.to_level}"):
        allowed = sorted(d for d, src in policy.allowed_moves.items() if state.state in src)
        raise TransitionNotAllowed(
            f"{move} from {state.state} to {cmd.to_level} is not allowed by policy "
            f"{policy.label}; allowed from {state.state}: {', '.join(allowed) or 'none'}",
            field="to_level",
            policy=policy.label,
            from_level=state.state,
            to_level=cmd.to_level,
        )
    window = policy.reassessment_window_days
    if cmd.reassessment_event_id is not None:
        chosen = state.assessments.get(cmd.reassessment_event_id)
        if chosen is None:
            raise ReassessmentMissing(
                f"reassessment {cmd.reassessment_event_id} is not a current reassessment of "
                f"patient {state.stream_id} in this episode (unknown, voided or earlier episode)",
                field="reassessment_event_id",
                policy=policy.label,
            )
    else:
        chosen = state.latest_assessment()
        if chosen is None:
            raise ReassessmentMissing(
                f"{move} to {cmd.to_level} needs a reassessment within {window} days; "
                "this episode has none",
                field="reassessment_event_id",
                policy=policy.label,
            )
    age = when - chosen.occurred_at
    age_days = age.total_seconds() / 86400
    if age_days < 0:
        raise ReassessmentStale(
            f"reassessment {chosen.event_id} on {chosen.occurred_at.date()} is dated after the "
            f"{move} at {when.isoformat()}",
            rule="reassessment.after_transition",
            field="occurred_at",
            policy=policy.label,
        )
    if age > dt.timedelta(days=window):
        raise ReassessmentStale(
            f"{move} to {cmd.to_level} needs a reassessment within {window} days; "
            f"{'the one named' if cmd.reassessment_event_id else 'latest'} is "
            f"{int(age_days)} days old (reassessment {chosen.event_id} on "
            f"{chosen.occurred_at.date()})",
            field="reassessment_event_id",
            policy=policy.label,
            window_days=window,
            age_days=round(age_days, 2),
            reassessment_event_id=str(chosen.event_id),
        )
    _check_variance(
        policy,
        provided=cmd.to_level,
        indicated=chosen.indicated_level,
        reason=cmd.variance_reason,
        authorization_ref=cmd.authorization_ref,
    )
    _check_band(
        policy,
        level=cmd.to_level,
        age_group=episode.age_group,
        hours=chosen.hours_scheduled,
        source=f"reassessment {chosen.event_id}",
    )
    placement = Placement(
        level=cmd.to_level,
        site=site,
        program=program,
        indicated_level=chosen.indicated_level,
        variance_reason=cmd.variance_reason,
        authorization_ref=cmd.authorization_ref,
    )
    data = LevelTransitionedData(
        episode_id=episode.episode_id,
        from_level=state.state,
        from_site=state.site or site,
        direction=direction,
        placement=placement,
        reassessment_event_id=chosen.event_id,
        reassessment_occurred_at=chosen.occurred_at,
        reassessment_age_days=round(age_days, 4),
        ratings=dict(chosen.ratings),
        hours_scheduled=chosen.hours_scheduled,
    )
    return [Decision(LevelTransitioned, data, when, policy.ref)]


def decide_attendance(
    state: PatientState, cmd: c.RecordAttendance, policy: Policy, now: dt.datetime
) -> list[Decision]:
    episode = _require_active(state, policy, "record attendance")
    when = _clinical_time(cmd.occurred_at, now, not_before=None, what="")
    if cmd.service_date > (now + CLOCK_SKEW).date():
        raise InvalidClinicalTime(
            f"service_date {cmd.service_date} is in the future",
            field="service_date",
            service_date=str(cmd.service_date),
        )
    if state.placed_at is not None and cmd.service_date < state.placed_at.date():
        raise InvalidClinicalTime(
            f"service_date {cmd.service_date} is before the current placement at "
            f"{state.state} began on {state.placed_at.date()}",
            field="service_date",
            service_date=str(cmd.service_date),
        )
    data = AttendanceRecordedData(
        episode_id=episode.episode_id,
        service_date=cmd.service_date,
        hours=cmd.hours,
        level=state.state,
        site=state.site or "",
    )
    return [Decision(AttendanceRecorded, data, when, None)]


def decide_discharge(
    state: PatientState, cmd: c.Discharge, policy: Policy, now: dt.datetime
) -> list[Decision]:
    episode = _require_active(state, policy, "discharge")
    machine = machine_for(policy)
    when = _clinical_time(
        cmd.occurred_at, now, not_before=state.placed_at, what="the current placement"
    )
    if not machine.may(state.state, "discharge"):  # pragma: no cover - every level may
        raise TransitionNotAllowed(
            f"discharge from {state.state} is not allowed by policy {policy.label}",
            policy=policy.label,
        )
    if (cmd.reason == DischargeReason.DEATH) != (cmd.disposition == Disposition.EXPIRED):
        raise InvalidInput(
            f"discharge reason {cmd.reason.value} and disposition {cmd.disposition.value} "
            "disagree: reason death goes with disposition exp, and only it",
            rule="discharge.reason_disposition_mismatch",
            field="disposition",
        )
    data = PatientDischargedData(
        episode_id=episode.episode_id,
        from_level=state.state,
        from_site=state.site or "",
        reason=cmd.reason,
        disposition=cmd.disposition,
    )
    return [Decision(PatientDischarged, data, when, policy.ref)]


def decide_void(
    state: PatientState, cmd: c.VoidEvent, policy: Policy, now: dt.datetime
) -> list[Decision]:
    _require_exists(state)
    when = _clinical_time(cmd.occurred_at, now, not_before=None, what="")
    target_type = state.event_types.get(cmd.event_id)
    if target_type is None:
        raise UnknownEvent(
            f"patient {state.stream_id} has no event {cmd.event_id}",
            field="event_id",
            event_id=str(cmd.event_id),
        )
    if cmd.event_id in state.voided:
        raise Duplicate(
            f"event {cmd.event_id} is already voided",
            rule="void.already_voided",
            field="event_id",
            event_id=str(cmd.event_id),
        )
    if target_type == EventVoided.EVENT_TYPE:
        raise InvalidStateForCommand(
            "a void cannot be voided; record the voided fact again instead",
            rule="void.of_void",
            field="event_id",
        )
    if target_type in CONSENT_EVENTS:
        raise InvalidStateForCommand(
            "a consent is ended by revoking it, never voided: what was disclosed under it "
            "stays accounted for",
            rule="void.consent_event",
            field="event_id",
            event_id=str(cmd.event_id),
        )
    if target_type in STATE_CHANGING_EVENTS:
        latest = state.changes[-1].event_id if state.changes else None
        if latest != cmd.event_id:
            raise InvalidStateForCommand(
                f"only the latest placement change can be voided; void {latest} first",
                rule="void.not_latest_change",
                field="event_id",
                latest=str(latest),
            )
    data = EventVoidedData(
        voided_event_id=cmd.event_id,
        voided_event_type=target_type,
        reason=cmd.reason,
        episode_id=state.episode.episode_id if state.episode else None,
    )
    return [Decision(EventVoided, data, when, None)]


# -- consent -------------------------------------------------------------------------------

_ORG_CODE = re.compile(ORG_CODE_PATTERN)


def check_org_code(org: str) -> None:
    """Raise InvalidInput (rule consent.org_malformed) unless `org` is a recipient org code."""
    if not _ORG_CODE.fullmatch(org):
        shown = org if len(org) <= 70 else org[:67] + "..."
        raise InvalidInput(
            f"recipient organization code {shown!r} is malformed: use lowercase letters, digits "
            "and inner hyphens, at most 63 characters (e.g. hie-north); the code names the "
            "organization's disclosure topic",
            rule="consent.org_malformed",
            field="recipient_org",
        )


def decide_give_consent(
    state: PatientState, cmd: c.GiveConsent, policy: Policy, now: dt.datetime
) -> list[Decision]:
    """A consent may be given in any state, a discharged patient's included: it governs the
    disclosure of the record, not the care."""
    _require_exists(state)
    check_org_code(cmd.recipient_org)
    when = _clinical_time(cmd.occurred_at, now, not_before=None, what="")
    if cmd.consent_id in state.consents:
        raise Duplicate(
            f"patient {state.stream_id} already has a consent {cmd.consent_id}: consent ids "
            "are never reused",
            rule="consent.id_used",
            field="consent_id",
            consent_id=cmd.consent_id,
        )
    if not cmd.purposes:
        raise InvalidInput(
            "a consent names at least one purpose: "
            + ", ".join(purpose.value for purpose in ConsentPurpose),
            rule="consent.no_purpose",
            field="purposes",
        )
    today = (now + CLOCK_SKEW).date()
    given_on = cmd.given_on or now.date()
    if given_on > today:
        raise InvalidClinicalTime(
            f"given_on {given_on} is in the future (service date {now.date()})",
            rule="consent.given_in_future",
            field="given_on",
            given_on=str(given_on),
        )
    if cmd.expires_on is not None and cmd.expires_on < given_on:
        raise InvalidInput(
            f"expires_on {cmd.expires_on} is before given_on {given_on}",
            rule="consent.expires_before_given",
            field="expires_on",
            given_on=str(given_on),
            expires_on=str(cmd.expires_on),
        )
    data = ConsentGivenData(
        consent_id=cmd.consent_id,
        recipient_org=cmd.recipient_org,
        purposes=[purpose for purpose in ConsentPurpose if purpose in cmd.purposes],
        given_on=given_on,
        expires_on=cmd.expires_on,
        document_ref=cmd.document_ref,
    )
    return [Decision(ConsentGiven, data, when, None)]


def decide_revoke_consent(
    state: PatientState, cmd: c.RevokeConsent, policy: Policy, now: dt.datetime
) -> list[Decision]:
    _require_exists(state)
    when = _clinical_time(cmd.occurred_at, now, not_before=None, what="")
    consent = state.consents.get(cmd.consent_id)
    if consent is None:
        raise UnknownConsent(
            f"patient {state.stream_id} has no consent {cmd.consent_id}",
            field="consent_id",
            consent_id=cmd.consent_id,
        )
    if consent.revoked_by is not None:
        raise Duplicate(
            f"consent {cmd.consent_id} was already revoked on {consent.revoked_on}",
            rule="consent.already_revoked",
            field="consent_id",
            consent_id=cmd.consent_id,
            revoked_on=str(consent.revoked_on),
        )
    revoked_on = cmd.revoked_on or now.date()
    if revoked_on > (now + CLOCK_SKEW).date():
        raise InvalidClinicalTime(
            f"revoked_on {revoked_on} is in the future (service date {now.date()})",
            rule="consent.revoked_in_future",
            field="revoked_on",
            revoked_on=str(revoked_on),
        )
    if revoked_on < consent.given_on:
        raise InvalidClinicalTime(
            f"revoked_on {revoked_on} is before the consent was given on {consent.given_on}",
            rule="consent.revoked_before_given",
            field="revoked_on",
            revoked_on=str(revoked_on),
            given_on=str(consent.given_on),
        )
    data = ConsentRevokedData(
        consent_id=consent.consent_id,
        recipient_org=consent.recipient_org,
        revoked_on=revoked_on,
    )
    return [Decision(ConsentRevoked, data, when, None)]


def new_state_after(state: PatientState, events: Iterable[PatientEvent]) -> PatientState:
    """A copy of `state` with `events` applied (the live path after an append)."""
    copy = replace(
        state,
        episodes=list(state.episodes),
        assessments=dict(state.assessments),
        changes=list(state.changes),
        event_types=dict(state.event_types),
        voided=set(state.voided),
        consents=dict(state.consents),
    )
    for event in events:
        copy.apply(event)
    return copy
