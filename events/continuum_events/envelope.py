"""The envelope every event carries, stored or exported."""

from __future__ import annotations

from typing import Any, ClassVar
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from continuum_events.codes import ActorRole, Code, PatientKey


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Actor(Frozen):
    """Who caused the event: an id from the caller's identity provider and a role."""

    id: Code
    role: ActorRole


class PolicyRef(Frozen):
    """The policy document, by id and version, whose rules judged the event."""

    id: Code
    version: Code


class EventEnvelope(Frozen):
    """Metadata common to every event.

    `stream_id` is the pseudonymous patient key; `stream_version` numbers that patient's events
    from 1 without gaps; `position` is the global order assigned once the event's transaction has
    committed (dense, from 1). `position` is null only for an event read from its own stream in the
    instant between its commit and its sequencing; every event read by position, exported or
    published has one. `occurred_at` is clinical time, `recorded_at` system time.
    """

    EVENT_TYPE: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1

    event_id: UUID
    event_type: str
    schema_version: int = Field(ge=1)
    stream_id: PatientKey
    stream_version: int = Field(ge=1)
    position: int | None = Field(default=None, ge=1)
    occurred_at: AwareDatetime
    recorded_at: AwareDatetime
    actor: Actor
    correlation_id: UUID
    causation_id: UUID
    policy: PolicyRef | None = None
    data: Any

    def to_json_dict(self) -> dict[str, Any]:
        """The envelope as JSON-compatible data (the export and wire form)."""
        return self.model_dump(mode="json")
