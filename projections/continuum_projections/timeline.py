"""A patient's history as readable lines: what happened, when, on what evidence."""

from __future__ import annotations

from collections.abc import Sequence

from continuum_events import (
    AttendanceRecorded,
    ConsentGiven,
    ConsentRevoked,
    EventVoided,
    LevelTransitioned,
    PatientAdmitted,
    PatientDischarged,
    PatientEvent,
    PatientReadmitted,
    ReassessmentRecorded,
)


def summarize(event: PatientEvent) -> str:
    match event:
        case PatientAdmitted() | PatientReadmitted():
            entry = event.data
            verb = "admitted" if isinstance(event, PatientAdmitted) else "readmitted"
            text = (
                f"{verb} to {entry.placement.level} at {entry.placement.site} "
                f"(episode {entry.episode_number}, {entry.age_group.value}); "
                f"indicated {entry.placement.indicated_level}, "
                f"ratings {_ratings(entry.assessment.ratings)}"
            )
            placement = entry.placement
            return text + _variance(placement.variance_reason, placement.authorization_ref)
        case ReassessmentRecorded():
            a = event.data.assessment
            hours = f", {a.hours_scheduled:g} h/week" if a.hours_scheduled is not None else ""
            return (
                f"reassessed at {event.data.level_at_assessment} by {a.assessor_id} "
                f"({a.instrument}): ratings {_ratings(a.ratings)}, "
                f"indicated {a.indicated_level}{hours}"
            )
        case LevelTransitioned():
            move = event.data
            to = move.placement
            site = f" at {to.site}" if to.site != move.from_site else ""
            return (
                f"{move.direction.value.replace('_', '-')} {move.from_level} -> {to.level}{site}"
                f"; rests on reassessment {move.reassessment_event_id} "
                f"({move.reassessment_age_days:.1f} days old), indicated {to.indicated_level}"
                + _variance(to.variance_reason, to.authorization_ref)
            )
        case AttendanceRecorded():
            visit = event.data
            return f"attended {visit.hours:g} h on {visit.service_date} at {visit.level}"
        case PatientDischarged():
            exit_ = event.data
            return (
                f"discharged from {exit_.from_level}: {exit_.reason.value}, "
                f"disposition {exit_.disposition.value}"
            )
        case EventVoided():
            void = event.data
            return f"voided {void.voided_event_type} {void.voided_event_id} ({void.reason.value})"
        case ConsentGiven():
            consent = event.data
            until = f" until {consent.expires_on}" if consent.expires_on else ""
            return (
                f"consent {consent.consent_id} given on {consent.given_on} to "
                f"{consent.recipient_org} for {', '.join(p.value for p in consent.purposes)}"
                f"{until} (form {consent.document_ref})"
            )
        case ConsentRevoked():
            revoked = event.data
            return (
                f"consent {revoked.consent_id} to {revoked.recipient_org} revoked on "
                f"{revoked.revoked_on}"
            )
    return event.event_type  # pragma: no cover - every type is matched above


def _ratings(ratings: dict[str, str]) -> str:
    return " ".join(f"D{k}={v}" for k, v in sorted(ratings.items()))


def _variance(reason: object, authorization: str | None) -> str:
    text = ""
    if reason is not None:
        text += f"; variance: {getattr(reason, 'value', reason)}"
    if authorization:
        text += f"; authorization {authorization}"
    return text


def render(events: Sequence[PatientEvent]) -> list[str]:
    voided = {e.data.voided_event_id for e in events if isinstance(e, EventVoided)}
    lines = []
    for event in events:
        mark = "VOID " if event.event_id in voided else ""
        position = f"#{event.position}" if event.position is not None else "#-"
        policy = f" [{event.policy.id}@{event.policy.version}]" if event.policy else ""
        lines.append(
            f"{event.occurred_at:%Y-%m-%d %H:%M} v{event.stream_version:<3} {position:<8} "
            f"{mark}{summarize(event)}  ({event.event_id}; by {event.actor.id}/"
            f"{event.actor.role.value}){policy}"
        )
    return lines
