"""Command handlers: load the patient, let the domain decide, append the events.

The same service backs every entrypoint (CLI now; HTTP and Kafka consumers later).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

from continuum.application.observe import CommandObserver, NoObserver
from continuum.application.ports import AppendResult, EventStore
from continuum.domain import commands as c
from continuum.domain import patient as p
from continuum.domain.errors import ConcurrencyConflict, ContinuumError, UnknownPatient
from continuum.domain.policy import Policy, PolicyRegistry
from continuum_events import Actor, ActorRole, PatientEvent, parse_event

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_patient_key(token: bytes | None = None) -> str:
    """A random pseudonymous key: 'pk-' and 20 base32 characters (100 bits)."""
    raw = token if token is not None else secrets.token_bytes(15)
    return "pk-" + base64.b32encode(raw).decode("ascii").lower()[:20]


def unknown_patient(stream_id: str) -> UnknownPatient:
    return UnknownPatient(
        f"no patient with key {stream_id}", field="patient_key", patient=stream_id
    )


@dataclass(frozen=True)
class CommandContext:
    """Who asks, and how this command relates to others."""

    actor: Actor = field(default_factory=lambda: Actor(id="system", role=ActorRole.SYSTEM))
    correlation_id: UUID = field(default_factory=uuid4)
    command_id: UUID = field(default_factory=uuid4)
    idempotency_key: str | None = None


_DECIDERS: dict[
    type[Any], Callable[[p.PatientState, Any, Policy, dt.datetime], list[p.Decision]]
] = {
    c.Admit: p.decide_admit,
    c.Readmit: p.decide_readmit,
    c.RecordReassessment: p.decide_reassessment,
    c.Transition: p.decide_transition,
    c.RecordAttendance: p.decide_attendance,
    c.Discharge: p.decide_discharge,
    c.VoidEvent: p.decide_void,
    c.GiveConsent: p.decide_give_consent,
    c.RevokeConsent: p.decide_revoke_consent,
}


class PatientService:
    def __init__(
        self,
        store: EventStore,
        policies: PolicyRegistry,
        clock: Clock = utc_now,
        *,
        observer: CommandObserver | None = None,
    ) -> None:
        self.store = store
        self.policies = policies
        self.clock = clock
        #: Told of every command accepted or refused (metrics); does nothing by default.
        self.observer: CommandObserver = observer or NoObserver()

    # -- commands ---------------------------------------------------------------------------

    def handle(
        self,
        command: c.Command,
        ctx: CommandContext | None = None,
        *,
        authorize: Callable[[p.PatientState], None] | None = None,
    ) -> AppendResult:
        """Decide `command` on the patient's current state and append the outcome.

        `authorize`, if given, is called with the state loaded for the decision (also before
        an idempotent replay is returned) and may raise to refuse: a caller that must check
        the patient's site reads the stream once, not twice."""
        name = type(command).__name__
        try:
            result = self._handle(command, ctx or CommandContext(), authorize)
        except ContinuumError as exc:
            self.observer.refused(name, exc.rule)
            raise
        self.observer.handled(name, replayed=result.replayed)
        return result

    def _handle(
        self,
        command: c.Command,
        ctx: CommandContext,
        authorize: Callable[[p.PatientState], None] | None,
    ) -> AppendResult:
        fingerprint = _fingerprint(command)
        if ctx.idempotency_key is not None:
            prior = self.store.find_idempotent(ctx.idempotency_key, fingerprint)
            if prior is not None:
                if authorize is not None:
                    authorize(self.load(prior.stream_id))
                return prior
        stream_id = getattr(command, "patient_key", None) or new_patient_key()
        state = self.load(stream_id)
        if authorize is not None:
            authorize(state)
        if command.expected_version is not None and command.expected_version != state.version:
            raise ConcurrencyConflict(stream_id, command.expected_version, state.version)
        policy = self.policy_for(state, command)
        now = self.clock()
        decisions = _DECIDERS[type(command)](state, command, policy, now)
        events = [
            self._envelope(stream_id, state.version + i + 1, decision, ctx, now)
            for i, decision in enumerate(decisions)
        ]
        return self.store.append(
            stream_id,
            state.version,
            events,
            idempotency_key=ctx.idempotency_key,
            request_hash=fingerprint,
            identity=command.identity if isinstance(command, c.Admit) else None,
        )

    # -- queries ----------------------------------------------------------------------------

    def load(self, stream_id: str) -> p.PatientState:
        return p.replay(stream_id, self.store.read_stream(stream_id), self.policies)

    def history(self, stream_id: str) -> list[PatientEvent]:
        events = self.store.read_stream(stream_id)
        if not events:
            raise unknown_patient(stream_id)
        return events

    def policy_for(self, state: p.PatientState, command: c.Command) -> Policy:
        """New episodes use the default policy; an open episode keeps its own policy id."""
        if isinstance(command, c.Admit | c.Readmit) or state.episode is None:
            return self.policies.default
        return self.policies.latest(state.episode.policy.id)

    def _envelope(
        self,
        stream_id: str,
        version: int,
        decision: p.Decision,
        ctx: CommandContext,
        now: dt.datetime,
    ) -> PatientEvent:
        return parse_event(
            {
                "event_id": decision.event_id,
                "event_type": decision.event_type.EVENT_TYPE,
                "schema_version": decision.event_type.SCHEMA_VERSION,
                "stream_id": stream_id,
                "stream_version": version,
                "position": None,
                "occurred_at": decision.occurred_at,
                "recorded_at": now,
                "actor": ctx.actor,
                "correlation_id": ctx.correlation_id,
                "causation_id": ctx.command_id,
                "policy": decision.policy,
                "data": decision.data,
            }
        )


def _fingerprint(command: c.Command) -> str:
    body = type(command).__name__ + command.model_dump_json()
    return hashlib.sha256(body.encode("utf-8")).hexdigest()
