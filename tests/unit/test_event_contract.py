"""The event contract: committed JSON Schemas are current, upcasting has a working slot,
and the envelope carries every field the issue names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from continuum_events import EVENT_TYPES, parse_event, upcasting
from continuum_events.schema import render, schema_documents
from tests.support import ENVELOPE_FIELDS

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "events" / "schemas"


def test_committed_schemas_match_the_models() -> None:
    documents = schema_documents()
    committed = {p.name for p in SCHEMA_DIR.glob("*.schema.json")}
    assert committed == set(documents), "run `continuum schemas export` and commit docs/"
    stale = [
        name
        for name, document in documents.items()
        if (SCHEMA_DIR / name).read_text(encoding="utf-8") != render(document)
    ]
    assert not stale, f"stale schemas {stale}: run `continuum schemas export` and commit docs/"


@pytest.mark.parametrize("model", EVENT_TYPES, ids=lambda m: m.EVENT_TYPE)
def test_every_event_type_carries_the_envelope(model: Any) -> None:
    schema = model.model_json_schema(mode="serialization")
    assert set(schema["properties"]) >= ENVELOPE_FIELDS
    assert schema["properties"]["event_type"]["const"] == model.EVENT_TYPE


def _attendance(version: int = 1, **data: Any) -> dict[str, Any]:
    return {
        "event_id": "0b0f4ad4-5b76-4b61-9f0e-2f3f6b0a4f10",
        "event_type": "AttendanceRecorded",
        "schema_version": version,
        "stream_id": "pk-abcdefghijklmnopqrst",
        "stream_version": 3,
        "position": 9,
        "occurred_at": "2026-03-01T10:00:00+00:00",
        "recorded_at": "2026-03-01T10:00:01+00:00",
        "actor": {"id": "cm-1", "role": "case_manager"},
        "correlation_id": "0b0f4ad4-5b76-4b61-9f0e-2f3f6b0a4f11",
        "causation_id": "0b0f4ad4-5b76-4b61-9f0e-2f3f6b0a4f12",
        "policy": None,
        "data": {
            "episode_id": "0b0f4ad4-5b76-4b61-9f0e-2f3f6b0a4f13",
            "service_date": "2026-03-01",
            "hours": 3.0,
            "level": "2.1",
            "site": "site-a",
            **data,
        },
    }


def test_upcaster_turns_an_old_version_into_the_current_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hypothetical v0 that stored minutes instead of hours.
    def v0_to_v1(raw: dict[str, Any]) -> dict[str, Any]:
        data = dict(raw["data"])
        data["hours"] = data.pop("minutes") / 60
        return {**raw, "schema_version": 1, "data": data}

    monkeypatch.setitem(upcasting.UPCASTERS, ("AttendanceRecorded", 0), v0_to_v1)
    old = _attendance(version=0)
    old["data"]["minutes"] = old["data"].pop("hours") * 60 + 30
    event = parse_event(old)
    assert event.schema_version == 1
    assert event.data.hours == pytest.approx(3.5)  # type: ignore[union-attr]


def test_upcaster_must_advance_exactly_one_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        upcasting.UPCASTERS, ("AttendanceRecorded", 0), lambda raw: {**raw, "schema_version": 5}
    )
    with pytest.raises(ValueError, match="must return v1"):
        parse_event(_attendance(version=0))


def test_unknown_version_without_upcaster_is_refused() -> None:
    with pytest.raises(ValidationError, match="schema_version"):
        parse_event(_attendance(version=7))


def test_events_refuse_free_text_and_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="site"):
        parse_event(_attendance(site="Mrs Smith's ward"))
    with pytest.raises(ValidationError, match="note"):
        parse_event(_attendance(note="patient said ..."))


def test_events_are_frozen() -> None:
    event = parse_event(_attendance())
    with pytest.raises(ValidationError):
        event.stream_version = 4  # type: ignore[misc]
    assert json.loads(event.model_dump_json())["data"]["level"] == "2.1"
