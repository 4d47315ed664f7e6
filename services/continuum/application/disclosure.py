"""Disclosure to one recipient organization, under its patients' consents (42 CFR Part 2).

Putting an event on a topic another organization reads is a disclosure: it needs the
patient's consent, and each one carries the prescribed notice and the consent's scope
(DOMAIN.md section 5, docs/consent.md). `DisclosurePublisher` does that for one organization:

- It reads the log in global position order and keeps, from the log itself (`ConsentBook`),
  which of the organization's consents are in force for each patient.
- An event is disclosed when its patient holds a consent to the organization in force at that
  point of the log: given at an earlier position (the `ConsentGiven` itself is disclosed, so
  the recipient learns the consent's scope), not revoked at an earlier position (the
  `ConsentRevoked` itself is the last event disclosed under it), not expired on the date the
  event was recorded. Consent events for other organizations are never disclosed.
- Each message goes to the organization's own topic; each disclosure is recorded in the
  insert-only disclosure record (`DisclosureRecord`) together with the publisher's checkpoint,
  in one transaction, after the broker acknowledged the batch.

Crash behaviour. A crash between the broker's acknowledgement and that transaction leaves
messages on the topic that the record does not know. On start the publisher reads its topic
after the last recorded offset of every partition; a message it finds there whose bytes are
exactly those of an event it is about to disclose is recorded where it lies instead of being
sent again. So a restart neither loses a record nor, normally, sends twice. A duplicate (same
`event_id`, identical bytes) can still reach the topic if the dead process's last request
reaches the broker after the restarted publisher has read the topic; recipients de-duplicate
on the `event_id` header, as on the events topic.

Run one publisher per organization: the checkpoint is compare-and-set, so a second one fails
with `DisclosureConflict` instead of recording the same events twice.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from continuum.application.ports import EventStore, WireEvent
from continuum.application.relay import PollingWaiter, PublishInterrupted, Waiter
from continuum.domain.errors import ContinuumError, InvalidInput
from continuum.domain.patient import check_org_code

log = logging.getLogger("continuum.disclosure")

#: The notice every disclosure carries: the short form 42 CFR 2.32(a)(2) allows.
PART2_NOTICE = "42 CFR part 2 prohibits unauthorized use or disclosure of these records."
#: The topic of each organization's disclosures; "{org}" is its code.
DEFAULT_TOPIC_PATTERN = "continuum.disclosure.{org}.v1"
CHECKPOINT_PREFIX = "disclosure:"

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")
_GIVEN, _REVOKED = "ConsentGiven", "ConsentRevoked"


def disclosure_topic(org: str, pattern: str = DEFAULT_TOPIC_PATTERN) -> str:
    """The topic the organization `org` receives its disclosures on."""
    check_org_code(org)
    if pattern.count("{org}") != 1:
        raise InvalidInput(
            f"disclosure topic pattern {pattern!r} must contain {{org}} exactly once",
            rule="disclosure.topic_pattern",
            field="disclosure_topic_pattern",
        )
    topic = pattern.replace("{org}", org)
    if not _TOPIC_NAME.fullmatch(topic):
        raise InvalidInput(
            f"disclosure topic {topic!r} is not a valid Kafka topic name (letters, digits, "
            "'.', '_', '-'; at most 249 characters)",
            rule="disclosure.topic_pattern",
            field="disclosure_topic_pattern",
        )
    return topic


def checkpoint_name(org: str) -> str:
    """The checkpoint (in the store's checkpoints table) of the organization's publisher."""
    return CHECKPOINT_PREFIX + org


# -- what is disclosed, under which consent -------------------------------------------------


@dataclass(frozen=True)
class GoverningConsent:
    """The consent an event is disclosed under."""

    consent_id: str
    purposes: tuple[str, ...]


@dataclass(frozen=True)
class Outgoing:
    """One event to disclose and the consent it is disclosed under."""

    event: WireEvent
    consent: GoverningConsent


@dataclass
class _Held:
    consent_id: str
    purposes: tuple[str, ...]
    expires_on: dt.date | None


class ConsentBook:
    """The consents one organization holds, per patient, kept from the log.

    Feed it every event in position order (`observe`); it answers, for each, the consent the
    event may be disclosed under, or None. Only consents to this organization are kept."""

    def __init__(self, org: str) -> None:
        self.org = org
        self._held: dict[str, list[_Held]] = {}

    def observe(self, event: WireEvent, *, decide: bool = True) -> GoverningConsent | None:
        """Apply `event`; return the consent in force for it (None when `decide` is False)."""
        if event.event_type in (_GIVEN, _REVOKED):
            body = orjson.loads(event.value)
            data = body["data"]
            if data["recipient_org"] != self.org:
                return None  # another organization's consent: never disclosed here
            held = self._held.setdefault(event.stream_id, [])
            if event.event_type == _GIVEN:
                expires = data.get("expires_on")
                held.append(
                    _Held(
                        consent_id=data["consent_id"],
                        purposes=tuple(data["purposes"]),
                        expires_on=dt.date.fromisoformat(expires) if expires else None,
                    )
                )
                return self._governing(held, body) if decide else None
            # The revocation is the last event disclosed under the consent it revokes; if that
            # one has already expired, under whichever other consent is still in force.
            revoked = [h for h in held if h.consent_id == data["consent_id"]]
            governing = (
                (self._governing(revoked, body) or self._governing(held, body)) if decide else None
            )
            held[:] = [h for h in held if h.consent_id != data["consent_id"]]
            if not held:
                del self._held[event.stream_id]
            return governing
        if not decide:
            return None
        consents = self._held.get(event.stream_id)
        if not consents:
            return None
        return self._governing(consents, orjson.loads(event.value))

    @staticmethod
    def _governing(held: list[_Held], body: dict[str, object]) -> GoverningConsent | None:
        """The most recently given consent in force on the day the event was recorded."""
        recorded_on = dt.date.fromisoformat(str(body["recorded_at"])[:10])
        for consent in reversed(held):
            if consent.expires_on is None or recorded_on <= consent.expires_on:
                return GoverningConsent(consent.consent_id, consent.purposes)
        return None

    def patients(self) -> int:
        """Patients holding at least one unrevoked consent to the organization."""
        return len(self._held)


# -- the record -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Disclosure:
    """One message disclosed to an organization: which event, under which consent, where."""

    org: str
    patient_key: str
    event_id: str
    position: int
    consent_id: str
    topic: str
    partition: int
    offset: int
    disclosed_at: dt.datetime
    #: Assigned by the record on insert.
    id: int | None = None


class DisclosureConflict(ContinuumError):
    """The checkpoint moved under this publisher: another one runs for the same organization."""

    rule = "disclosure.concurrent_publisher"


class DisclosureRecord(abc.ABC):
    """The disclosure record (an accounting of disclosures), insert-only, with the
    publishers' checkpoints. Implemented by adapters/sql/disclosures.py and adapters/memory.py.
    """

    @abc.abstractmethod
    def record(
        self, disclosures: Sequence[Disclosure], *, checkpoint: str, expected: int, position: int
    ) -> None:
        """In one transaction: insert `disclosures` and move the checkpoint `checkpoint` from
        `expected` to `position`. Raise `DisclosureConflict` (writing nothing) if the
        checkpoint is not at `expected`."""

    @abc.abstractmethod
    def checkpoint(self, name: str) -> int:
        """The checkpoint's position (0 if none)."""

    @abc.abstractmethod
    def last_offsets(self, org: str, topic: str) -> dict[int, int]:
        """Partition -> the highest offset recorded for `org` on `topic`."""

    @abc.abstractmethod
    def query(
        self,
        *,
        org: str | None = None,
        patient_key: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[Disclosure]:
        """Disclosures matching every filter given, in the order recorded, id > `after_id`."""


# -- the bus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """Where the broker put a message."""

    partition: int
    offset: int


@dataclass(frozen=True)
class FoundMessage:
    """A message read back from the organization's topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    event_id: str | None
    timestamp: dt.datetime | None = None


class DisclosureChannel(abc.ABC):
    """One organization's topic. The Kafka adapter is adapters/kafka/disclosure.py."""

    topic: str

    @abc.abstractmethod
    def send(self, batch: Sequence[Outgoing], stop: threading.Event) -> list[Delivery]:
        """Send in order, keyed by patient, with the disclosure headers; block until the broker
        acknowledged every message (waiting out outages) and return where each landed, in
        batch order. Raise `PublishInterrupted` if `stop` is set first."""

    @abc.abstractmethod
    def read_after(self, offsets: dict[int, int]) -> list[FoundMessage]:
        """Every message after `offsets` (partition -> last offset known; a partition missing
        there from its beginning) up to the topic's current end."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# -- the publisher --------------------------------------------------------------------------


@dataclass
class DisclosureStats:
    disclosed: int = 0  # messages recorded as disclosed (sent, or found after a restart)
    recovered: int = 0  # of them: found on the topic after a restart, not sent again
    foreign: int = 0  # messages on the topic this publisher did not plan (left, reported)
    batches: int = 0
    checkpoint: int = 0
    head: int = 0

    @property
    def lag(self) -> int:
        return max(0, self.head - self.checkpoint)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DisclosurePublisher:
    """Discloses the log to one organization under its patients' consents (module doc)."""

    def __init__(
        self,
        store: EventStore,
        record: DisclosureRecord,
        channel: DisclosureChannel,
        *,
        org: str,
        batch_size: int = 2_000,
        waiter: Waiter | None = None,
        idle_timeout: float = 5.0,
        clock: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        check_org_code(org)
        self.store = store
        self.record = record
        self.channel = channel
        self.org = org
        self.topic = channel.topic
        self.name = checkpoint_name(org)
        self.batch_size = batch_size
        self.waiter = waiter or PollingWaiter(0.2)
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.stats = DisclosureStats(checkpoint=record.checkpoint(self.name))
        self._book = ConsentBook(org)
        self._position = 0
        #: Messages found on the topic at start, by event id; None until started.
        self._found: dict[str, FoundMessage] | None = None

    def start(self) -> None:
        """Rebuild the consent state up to the checkpoint from the log, then read the topic
        after the last recorded offsets (what a crash may have left unrecorded)."""
        checkpoint = self.record.checkpoint(self.name)
        self._book = ConsentBook(self.org)
        after = 0
        while after < checkpoint:
            page = self.store.read_wire(after, min(self.batch_size, checkpoint - after))
            if not page:
                break
            for event in page:
                self._book.observe(event, decide=False)
            after = page[-1].position
        self._position = self.stats.checkpoint = checkpoint
        found: dict[str, FoundMessage] = {}
        for message in self.channel.read_after(self.record.last_offsets(self.org, self.topic)):
            if message.event_id is None or message.event_id in found:
                self._foreign(message, "no event_id header or a repeated one")
            else:
                found[message.event_id] = message
        if found:
            log.warning(
                "%d message(s) on %s after the last recorded offsets: recorded where they lie "
                "if they are exactly what is due, not sent again",
                len(found),
                self.topic,
            )
        self._found = found

    def drain(self, stop: threading.Event | None = None) -> int:
        """Disclose everything committed so far, or until `stop` is set (between batches);
        return the number of messages recorded."""
        stop = stop or threading.Event()
        if self._found is None:
            self.start()
        total = 0
        try:
            while not stop.is_set() and (count := self._batch(stop)) is not None:
                total += count
        except BaseException:
            self._found = None  # the consent state ran ahead of the checkpoint: rebuild
            raise
        return total

    def _batch(self, stop: threading.Event) -> int | None:
        found_at_start = self._found
        assert found_at_start is not None
        events = self.store.read_wire(self._position, self.batch_size)
        if not events:
            for message in found_at_start.values():
                self._foreign(message, "not an event due to this organization")
            found_at_start.clear()
            return None
        due = [
            Outgoing(event, consent)
            for event in events
            if (consent := self._book.observe(event)) is not None
        ]
        placed: dict[str, tuple[Delivery, dt.datetime | None]] = {}
        to_send: list[Outgoing] = []
        for outgoing in due:
            found = found_at_start.pop(outgoing.event.event_id, None)
            if found is not None and _same(found, outgoing):
                placed[outgoing.event.event_id] = (
                    Delivery(found.partition, found.offset),
                    found.timestamp,
                )
            else:
                if found is not None:
                    self._foreign(found, "its bytes differ from the event's")
                to_send.append(outgoing)
        recovered = len(placed)
        if to_send:
            for outgoing, delivery in zip(to_send, self.channel.send(to_send, stop), strict=True):
                placed[outgoing.event.event_id] = (delivery, None)
        now = self.clock()
        rows = [
            Disclosure(
                org=self.org,
                patient_key=o.event.stream_id,
                event_id=o.event.event_id,
                position=o.event.position,
                consent_id=o.consent.consent_id,
                topic=self.topic,
                partition=placed[o.event.event_id][0].partition,
                offset=placed[o.event.event_id][0].offset,
                disclosed_at=placed[o.event.event_id][1] or now,
            )
            for o in due
        ]
        last = events[-1].position
        self.record.record(rows, checkpoint=self.name, expected=self._position, position=last)
        self._position = self.stats.checkpoint = last
        self.stats.disclosed += len(rows)
        self.stats.recovered += recovered
        self.stats.batches += 1
        return len(rows)

    def _foreign(self, message: FoundMessage, why: str) -> None:
        self.stats.foreign += 1
        log.warning(
            "%s[%d]@%d (event_id %s) was not written by this publisher for %s (%s): left "
            "unrecorded; check who else writes to this topic",
            self.topic,
            message.partition,
            message.offset,
            message.event_id or "-",
            self.org,
            why,
        )

    def run(
        self,
        stop: threading.Event,
        on_progress: Callable[[DisclosureStats], None] | None = None,
        progress_every: float = 5.0,
    ) -> DisclosureStats:
        """Disclose until `stop` is set: drain, then sleep until a commit notice (or a poll)."""
        last_report = time.monotonic()
        while not stop.is_set():
            try:
                self.drain(stop)
            except PublishInterrupted:
                break
            now = time.monotonic()
            if on_progress is not None and now - last_report >= progress_every:
                self.stats.head = self.store.head_position()
                on_progress(self.stats)
                last_report = now
            if not stop.is_set():
                self.waiter.wait(self.idle_timeout)
        self.stats.head = self.store.head_position()
        return self.stats


def _same(found: FoundMessage, outgoing: Outgoing) -> bool:
    return found.value == outgoing.event.value and found.key == outgoing.event.stream_id.encode()
