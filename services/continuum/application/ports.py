"""Ports: what the application needs from the outside world. Adapters implement them."""

from __future__ import annotations

import abc
import datetime as dt
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from continuum.domain.commands import Identity
from continuum_events import PatientEvent, canonical_json


@dataclass(frozen=True)
class WireEvent:
    """An event in its canonical wire form, with the metadata a publisher needs."""

    position: int
    stream_id: str
    event_id: str
    event_type: str
    schema_version: int
    value: bytes


def shard_of(stream_id: str, count: int) -> int:
    """A patient's shard of `count` where a store has no way of its own (crc32 of the key)."""
    return zlib.crc32(stream_id.encode()) % count


@dataclass(frozen=True)
class AppendResult:
    stream_id: str
    stream_version: int
    events: tuple[PatientEvent, ...]
    #: True when an idempotency key matched: nothing new was written, `events` are the first run's.
    replayed: bool = False


class EventStore(abc.ABC):
    """The append-only event log: the source of truth.

    Guarantees every implementation must keep (tests/integration/test_event_store_contract.py):
    - `append` is atomic: all events (and the identity, and the idempotency record) or nothing.
    - `append` with a stale `expected_version` raises `ConcurrencyConflict(expected, actual)`.
    - an `idempotency_key` already used returns the first result and writes nothing.
    - `read_all(after)` returns committed events in dense global `position` order, and a
      reader tailing it never skips an event that a slower writer commits late.
    - nothing is updated or deleted.
    """

    @abc.abstractmethod
    def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[PatientEvent],
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        identity: Identity | None = None,
    ) -> AppendResult: ...

    @abc.abstractmethod
    def read_stream(self, stream_id: str) -> list[PatientEvent]:
        """One patient's events in stream_version order."""

    @abc.abstractmethod
    def read_all(self, after: int = 0, limit: int = 1000) -> list[PatientEvent]:
        """Committed events with position > `after`, in position order, at most `limit`."""

    def read_wire(self, after: int = 0, limit: int = 1000) -> list[WireEvent]:
        """Like `read_all`, in canonical wire form (stores may build it without validation)."""
        return [_wire(event) for event in self.read_all(after, limit)]

    def read_bodies(self, after: int = 0, limit: int = 1000) -> list[tuple[int, str, str | bytes]]:
        """(position, stream id, wire bytes) in position order. The bytes may carry
        `"position": null`: the caller takes the position from the triple (the projections'
        fast path; the stream id lets a shard skip other patients without decoding)."""
        return [(w.position, w.stream_id, w.value) for w in self.read_wire(after, limit)]

    def read_shard_bodies(
        self, after: int, upto: int, index: int, count: int
    ) -> list[tuple[int, str, str | bytes]]:
        """Like `read_bodies`, for the positions in (`after`, `upto`], but only the events of
        the patients in shard `index` of `count` (a parallel rebuild). Which patients make a
        shard is the store's own choice, the same on every call; this one: `shard_of`."""
        rows: list[tuple[int, str, str | bytes]] = []
        while after < upto:
            page = self.read_bodies(after, min(5_000, upto - after))
            if not page:
                break
            rows.extend(row for row in page if shard_of(row[1], count) == index)
            after = page[-1][0]
        return rows

    def iter_wire(self, after: int = 0, batch: int = 1000) -> Iterator[WireEvent]:
        while page := self.read_wire(after, batch):
            yield from page
            after = page[-1].position

    def iter_all(self, after: int = 0, batch: int = 1000) -> Iterator[PatientEvent]:
        """Every committed event after `after`, page by page."""
        while True:
            page = self.read_all(after, batch)
            if not page:
                return
            yield from page
            last = page[-1].position
            assert last is not None
            after = last

    @abc.abstractmethod
    def find_idempotent(self, key: str, request_hash: str | None = None) -> AppendResult | None:
        """The first result recorded under `key`, or None. A different request_hash raises."""

    @abc.abstractmethod
    def identity(self, stream_id: str) -> Identity | None:
        """Identifying data for a patient key (kept apart from events)."""

    @abc.abstractmethod
    def patient_key_for_mrn(self, mrn: str) -> str | None:
        """The patient key registered with this MRN, if any (for inbound hospital feeds)."""

    @abc.abstractmethod
    def update_identity(self, stream_id: str, identity: Identity) -> None:
        """Replace a patient's identifying data (demographics updates; never an event)."""

    @abc.abstractmethod
    def head_position(self) -> int:
        """The highest position assigned so far (0 for an empty log)."""

    @abc.abstractmethod
    def stream_ids(self) -> list[str]:
        """Every patient key that has events."""

    def sequence(self) -> int:
        """Give positions to committed events that have none yet (no-op where immediate)."""
        return 0


class Checkpoints(abc.ABC):
    """Durable positions of relays and consumers, by name."""

    @abc.abstractmethod
    def get(self, name: str) -> int:
        """The last position processed by `name` (0 if none)."""

    @abc.abstractmethod
    def put(self, name: str, position: int) -> None:
        """Record that `name` has processed everything up to `position`."""


def _wire(event: PatientEvent) -> WireEvent:
    assert event.position is not None
    return WireEvent(
        position=event.position,
        stream_id=event.stream_id,
        event_id=str(event.event_id),
        event_type=event.event_type,
        schema_version=event.schema_version,
        value=canonical_json(event),
    )


@dataclass(frozen=True)
class Seal:
    """One link of the hash chain over the log (continuum_events.chain): the event sealed at
    `position` and `chain_hash(hash at position - 1, position, its wire bytes)`."""

    position: int
    event_id: str
    hash: str


class SealConflict(Exception):
    """Another sealer already wrote a seal at one of these positions; nothing was written."""


class LogSeals(abc.ABC):
    """The sealed hash chain, insert-only (a row is never updated or deleted)."""

    @abc.abstractmethod
    def last(self) -> Seal | None:
        """The seal at the highest position, or None if nothing is sealed yet."""

    @abc.abstractmethod
    def read(self, after: int = 0, limit: int = 1000) -> list[Seal]:
        """Seals with position > `after`, in position order, at most `limit`."""

    @abc.abstractmethod
    def add(self, seals: Sequence[Seal]) -> None:
        """Write `seals` in one transaction: all or none. Raises `SealConflict` if any of
        their positions is already sealed."""

    def iter_seals(self, after: int = 0, batch: int = 1000) -> Iterator[Seal]:
        while page := self.read(after, batch):
            yield from page
            after = page[-1].position


@dataclass(frozen=True)
class AccessEntry:
    """One access to patient-level data: who, as what role, through which channel, did what
    to which patient or resource, when, for what purpose, and whether it was allowed."""

    at: dt.datetime
    subject: str
    role: str
    channel: str
    action: str
    resource: str
    purpose: str
    outcome: str
    patient_key: str | None = None
    token_id: str | None = None
    request_id: str | None = None
    #: How many records the access returned (a list, an export), when it is known.
    records: int | None = None
    #: Assigned by the log on insert.
    id: int | None = None


class AccessLog(abc.ABC):
    """The access log, insert-only: the application can add to it, never change it."""

    @abc.abstractmethod
    def record(self, entry: AccessEntry) -> None:
        """Append one entry; it is durable when this returns."""

    @abc.abstractmethod
    def query(
        self,
        *,
        patient_key: str | None = None,
        subject: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[AccessEntry]:
        """Entries matching every filter given, oldest first, with id > `after_id`."""
