"""One raw feed message -> parsed, translated, run through the `PatientService`, idempotently.

No Kafka here: the consumer loop (`continuum.adapters.kafka.ingest`) calls `process` for each
record and decides what to do with its outcome or error.

Redelivery changes nothing: a message whose key `adt:<facility>:<control id>` is stored was
applied in full and is skipped before it is translated again (the patient's state has moved
on since, so a fresh translation could differ). A message interrupted between its commands
(reassessment then transition) is completed: the commands already done replay from their keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from continuum.application.service import CommandContext, PatientService
from continuum.domain.errors import ConcurrencyConflict
from continuum.ingest import hl7v2, json_form
from continuum.ingest.adt import AdtMessage
from continuum.ingest.errors import AdtParseError
from continuum.ingest.mapping import AdtMapping
from continuum.ingest.translate import Plan, translate
from continuum_events import Actor, ActorRole

log = logging.getLogger("continuum.ingest")

Status = Literal["applied", "duplicate", "no_change", "identity_updated"]
DEFAULT_ACTOR = Actor(id="adt-ingest", role=ActorRole.INTEGRATION)


@dataclass(frozen=True)
class Outcome:
    message: AdtMessage
    status: Status
    patient_key: str | None
    #: Events newly recorded (0 for a duplicate).
    events: int
    summary: str


def detect_format(raw: bytes | str | None) -> Literal["hl7v2", "json"]:
    """HL7 v2 starts with "MSH|" (MLLP framing and whitespace aside), JSON with "{"."""
    if raw is None:
        raise AdtParseError("empty message (no value)", rule="adt.empty", field="value")
    head = raw[:64].encode() if isinstance(raw, str) else raw[:64]
    head = head.lstrip(b"\x0b\xef\xbb\xbf \t\r\n")
    if head.startswith(b"MSH|"):
        return "hl7v2"
    if head.startswith(b"{"):
        return "json"
    if not head:
        raise AdtParseError("empty message", rule="adt.empty", field="value")
    raise AdtParseError(
        "unknown format: neither HL7 v2 (starts with MSH|) nor the JSON form (starts with {)",
        rule="adt.unknown_format",
        field="value",
    )


class AdtIngestor:
    def __init__(
        self,
        service: PatientService,
        mapping: AdtMapping,
        *,
        actor: Actor = DEFAULT_ACTOR,
        conflict_retries: int = 5,
    ) -> None:
        self.service = service
        self.store = service.store
        self.mapping = mapping
        self.actor = actor
        self.conflict_retries = conflict_retries

    def parse(self, raw: bytes | str | None) -> AdtMessage:
        kind = detect_format(raw)
        assert raw is not None
        if kind == "hl7v2":
            return hl7v2.parse(raw, self.mapping.tz)
        return json_form.parse(raw, self.mapping.tz)

    def process(self, raw: bytes | str | None) -> Outcome:
        """Parse, translate and apply one message. Raises a `ContinuumError` when the message
        cannot be used (parse, mapping or domain rule); other exceptions are not about the
        message (e.g. the database is down) and must not be treated as a bad message."""
        return self.apply(self.parse(raw))

    def apply(self, msg: AdtMessage) -> Outcome:
        if self.store.find_idempotent(msg.idempotency_key()) is not None:
            return Outcome(msg, "duplicate", None, 0, "already applied: nothing to do")
        for attempt in range(1, self.conflict_retries + 1):
            try:
                return self._apply(msg)
            except ConcurrencyConflict:
                # Someone else wrote to this patient between our read and our append.
                if attempt == self.conflict_retries:
                    raise
                log.info("%s: patient changed meanwhile, retrying (%d)", msg.describe(), attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _apply(self, msg: AdtMessage) -> Outcome:
        patient_key = self.store.patient_key_for_mrn(msg.mrn) if msg.mrn else None
        state = self.service.load(patient_key) if patient_key else None
        terminal = (
            self.service.policies.latest(state.episode.policy.id).terminal_state
            if state is not None and state.episode is not None
            else self.service.policies.default.terminal_state
        )
        plan = translate(
            msg, self.mapping, patient_key=patient_key, state=state, terminal_state=terminal
        )
        return self._run(msg, plan)

    def _run(self, msg: AdtMessage, plan: Plan) -> Outcome:
        if plan.identity_update is not None:
            key, identity = plan.identity_update
            self.store.update_identity(key, identity)
            return Outcome(msg, "identity_updated", key, 0, plan.summary)
        if not plan.steps:
            return Outcome(msg, "no_change", plan.patient_key, 0, plan.summary)
        context = CommandContext(actor=self.actor)
        previous = None
        recorded = 0
        for step in plan.steps:
            command = step.command
            if step.uses_previous_event and previous is not None:
                command = command.model_copy(
                    update={"reassessment_event_id": previous.events[0].event_id}
                )
            ctx = CommandContext(
                actor=context.actor,
                correlation_id=context.correlation_id,
                idempotency_key=step.idempotency_key,
            )
            previous = self.service.handle(command, ctx)
            recorded += 0 if previous.replayed else len(previous.events)
        assert previous is not None
        return Outcome(msg, "applied", previous.stream_id, recorded, plan.summary)
