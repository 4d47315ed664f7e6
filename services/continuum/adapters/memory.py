"""An in-memory event store: for unit tests of the domain and application only.

It keeps the same contract as the SQL store (the contract test suite runs against both), but
nothing survives the process. Production code never wires it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

from continuum.application.disclosure import Disclosure, DisclosureConflict, DisclosureRecord
from continuum.application.ports import (
    AppendResult,
    Checkpoints,
    EventStore,
    LogSeals,
    Seal,
    SealConflict,
)
from continuum.domain.commands import Identity
from continuum.domain.errors import ConcurrencyConflict, Duplicate
from continuum_events import PatientEvent


class InMemoryEventStore(EventStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: list[PatientEvent] = []
        self._streams: dict[str, list[PatientEvent]] = {}
        self._ids: set[str] = set()
        self._idempotency: dict[str, tuple[str | None, AppendResult]] = {}
        self._identities: dict[str, Identity] = {}

    def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[PatientEvent],
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        identity: Identity | None = None,
    ) -> AppendResult:
        if not events:
            raise ValueError("append needs at least one event")
        for offset, event in enumerate(events, start=1):
            if event.stream_id != stream_id or event.stream_version != expected_version + offset:
                raise ValueError(
                    f"event {event.event_id} is for {event.stream_id} v{event.stream_version}; "
                    f"expected {stream_id} v{expected_version + offset}"
                )
        with self._lock:
            if idempotency_key is not None and idempotency_key in self._idempotency:
                prior = self.find_idempotent(idempotency_key, request_hash)
                assert prior is not None
                return prior
            stream = self._streams.get(stream_id, [])
            if len(stream) != expected_version:
                raise ConcurrencyConflict(stream_id, expected_version, len(stream))
            ids = [str(e.event_id) for e in events]
            if len(set(ids)) != len(ids) or any(i in self._ids for i in ids):
                raise Duplicate(
                    "an event with one of these event ids is already stored",
                    rule="event.duplicate_id",
                    field="event_id",
                )
            if identity is not None and identity.mrn is not None:
                for owner, known in self._identities.items():
                    if known.mrn == identity.mrn:
                        raise Duplicate(
                            f"MRN is already registered to patient {owner}",
                            rule="identity.duplicate_mrn",
                            field="identity.mrn",
                            patient=owner,
                        )
            placed = []
            for event in events:
                stored = event.model_copy(update={"position": len(self._log) + 1})
                self._log.append(stored)
                placed.append(stored)
                self._ids.add(str(event.event_id))
            self._streams[stream_id] = [*stream, *placed]
            if identity is not None:
                self._identities[stream_id] = identity
            result = AppendResult(stream_id, placed[-1].stream_version, tuple(placed))
            if idempotency_key is not None:
                self._idempotency[idempotency_key] = (
                    request_hash,
                    AppendResult(stream_id, result.stream_version, result.events, replayed=True),
                )
            return result

    def read_stream(self, stream_id: str) -> list[PatientEvent]:
        return list(self._streams.get(stream_id, []))

    def read_all(self, after: int = 0, limit: int = 1000) -> list[PatientEvent]:
        return self._log[after : after + limit]

    def find_idempotent(self, key: str, request_hash: str | None = None) -> AppendResult | None:
        found = self._idempotency.get(key)
        if found is None:
            return None
        first_hash, result = found
        if request_hash is not None and first_hash not in (None, request_hash):
            raise Duplicate(
                f"idempotency key {key!r} was already used for a different command",
                rule="idempotency.key_reused",
                field="idempotency_key",
            )
        return result

    def identity(self, stream_id: str) -> Identity | None:
        return self._identities.get(stream_id)

    def patient_key_for_mrn(self, mrn: str) -> str | None:
        return next((k for k, v in self._identities.items() if v.mrn == mrn), None)

    def update_identity(self, stream_id: str, identity: Identity) -> None:
        owner = self.patient_key_for_mrn(identity.mrn) if identity.mrn else None
        if owner not in (None, stream_id):
            raise Duplicate(
                f"MRN is already registered to patient {owner}",
                rule="identity.duplicate_mrn",
                field="identity.mrn",
            )
        self._identities[stream_id] = identity

    def head_position(self) -> int:
        return len(self._log)

    def stream_ids(self) -> list[str]:
        return sorted(self._streams)


class InMemoryCheckpoints(Checkpoints):
    """Named positions kept in a dict: for a relay over an in-memory log (tests, benchmarks)."""

    def __init__(self) -> None:
        self.saved: dict[str, int] = {}

    def get(self, name: str) -> int:
        return self.saved.get(name, 0)

    def put(self, name: str, position: int) -> None:
        self.saved[name] = position


class InMemoryLogSeals(LogSeals):
    """Seals kept in a dict: for unit tests of sealing and verification."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seals: dict[int, Seal] = {}

    def last(self) -> Seal | None:
        with self._lock:
            return self._seals[max(self._seals)] if self._seals else None

    def read(self, after: int = 0, limit: int = 1000) -> list[Seal]:
        with self._lock:
            positions = sorted(p for p in self._seals if p > after)[:limit]
            return [self._seals[p] for p in positions]

    def add(self, seals: Sequence[Seal]) -> None:
        with self._lock:
            taken = [s.position for s in seals if s.position in self._seals]
            if taken or len({s.position for s in seals}) != len(seals):
                raise SealConflict(f"positions already sealed: {taken}")
            self._seals.update((s.position, s) for s in seals)


class InMemoryDisclosureRecord(DisclosureRecord):
    """The disclosure record and checkpoints in lists and a dict: for unit tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[Disclosure] = []
        self._checkpoints: dict[str, int] = {}

    def record(
        self, disclosures: Sequence[Disclosure], *, checkpoint: str, expected: int, position: int
    ) -> None:
        with self._lock:
            current = self._checkpoints.get(checkpoint)
            if (current if current is not None else 0) != expected:
                raise DisclosureConflict(
                    f"checkpoint {checkpoint} is at {current}, expected {expected}",
                    checkpoint=checkpoint,
                    expected=expected,
                    actual=current,
                )
            taken = {(d.topic, d.partition, d.offset) for d in self._rows}
            new = [(d.topic, d.partition, d.offset) for d in disclosures]
            if len(set(new)) != len(new) or taken.intersection(new):
                raise DisclosureConflict("a message is already recorded", checkpoint=checkpoint)
            start = len(self._rows)
            self._rows.extend(replace(d, id=start + i) for i, d in enumerate(disclosures, 1))
            self._checkpoints[checkpoint] = position

    def checkpoint(self, name: str) -> int:
        with self._lock:
            return self._checkpoints.get(name, 0)

    def last_offsets(self, org: str, topic: str) -> dict[int, int]:
        with self._lock:
            offsets: dict[int, int] = {}
            for d in self._rows:
                if d.org == org and d.topic == topic:
                    offsets[d.partition] = max(offsets.get(d.partition, -1), d.offset)
            return offsets

    def query(
        self,
        *,
        org: str | None = None,
        patient_key: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[Disclosure]:
        with self._lock:
            return [
                d
                for d in self._rows
                if (d.id or 0) > after_id
                and (org is None or d.org == org)
                and (patient_key is None or d.patient_key == patient_key)
            ][:limit]
