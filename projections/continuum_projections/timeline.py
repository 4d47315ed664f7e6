"""A patient's history as readable lines: what happened, when, on what evidence."""

from __future__ import annotations

from collections.abc import Sequence

from continuum_events import (
    AttendanceRecorded,
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
            d = event.data
            verb = "admitted" if isinstance(event, PatientAdmitted) else "readmitted"
            text = (
                f"{verb} to {d.placement.level} at {d.placement.site} "
                f"(episode {d.episode_number}, {d.age_group.value}); "
                f"indicated {d.placement.indicated_level}, ratings {_ratings(d.assessment.ratings)}"
            )
            return text + _variance(d.placement.variance_reason, d.placement.authorization_ref)
        case ReassessmentRecorded():
            a = event.data.assessment
            hours = f", {a.hours_scheduled:g} h/week" if a.hours_scheduled is not None else ""
            return (
                f"reassessed at {event.data.level_at_assessment} by {a.assessor_id} "
                f"({a.instrument}): ratings {_ratings(a.ratings)}, "
                f"indicated {a.indicated_level}{hours}"
            )
        case LevelTransitioned():
            d = event.data
            site = f" at {d.placement.site}" if d.placement.site != d.from_site else ""
            return (
                f"{d.direction.value.replace('_', '-')} {d.from_level} -> {d.placement.level}{site}"
                f"; rests on reassessment {d.reassessment_event_id} "
                f"({d.reassessment_age_days:.1f} days old), indicated {d.placement.indicated_level}"
                + _variance(d.placement.variance_reason, d.placement.authorization_ref)
            )
        case AttendanceRecorded():
            d = event.data
            return f"attended {d.hours:g} h on {d.service_date} at {d.level}"
        case PatientDischarged():
            d = event.data
            return (
                f"discharged from {d.from_level}: {d.reason.value}, disposition {d.disposition.value}"
            )
        case EventVoided():
            d = event.data
            return f"voided {d.voided_event_type} {d.voided_event_id} ({d.reason.value})"
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
