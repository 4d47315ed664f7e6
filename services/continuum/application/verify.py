"""`continuum verify`: prove the stored log is the log that was sealed, and that the events
topic is an exact copy of it.

(1) The hash chain (`verify_chain`). Every event is read twice, as the service reads it: from
the structured columns (`read_all`, validated into the event model, rendered with
`canonical_json`) and from the stored wire bytes (`read_wire`, the `body` column with the
position spliced in). Both renderings are hashed into the chain
(`continuum_events.chain.chain_hash`) and compared with the sealed hashes (`LogSeals`):

    body_mismatch  the body and the columns of one event disagree
    unreadable     an event's columns or body cannot be read back into an event
    altered        a sealed event no longer hashes to its seal: its content was changed
    removed        a position has no event (deleted from the log, or a gap)
    reordered      a position holds another event than the one sealed there
    seal           the sealed chain itself is broken: a seal row missing inside the sealed
                   range, malformed, or changed (the next link proves the event intact)
    head_mismatch  --expect-head names another head than the chain's
    unsealed       (warning) events after the last seal: run `continuum seal`

Each link is checked against the *sealed* previous hash, so one altered event is named alone
instead of breaking every later link. Pages of `page` events are read at a time: memory does
not grow with the log.

(2) Rebuilt projection versus live projection: not here. `continuum verify` accepts extra check
callables (entrypoints/verify_cli.py, `EXTRA_CHECKS`) that return `Finding`s; the projection
comparison plugs in there.

(3) The topic (`compare_topic`): every store event on the topic with byte-identical value (and
the same key and event_id header); byte-identical duplicates are counted, not findings (the
relay re-sends a stretch after a crash):

    missing        a store event that is not on the topic, though later ones are
    differs        a message whose bytes, key or event_id differ from the store's event
    extra          a message that is not in the store (unknown position, not an event)
    lag            the topic ends before the store's head (the relay is behind)
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from continuum.application.ports import EventStore, LogSeals, Seal, WireEvent
from continuum_events import canonical_json
from continuum_events.chain import GENESIS, chain_hash, is_chain_hash

Severity = Literal["error", "warning"]

CHAIN_KINDS = frozenset({"body_mismatch", "unreadable", "altered", "removed", "reordered", "seal"})
TOPIC_KINDS = frozenset({"missing", "differs", "extra"})

#: Findings kept in full per kind; beyond that they are only counted (`Report.suppressed`).
MAX_FINDINGS_PER_KIND = 1000


@dataclass(frozen=True)
class Finding:
    kind: str
    position: int | None
    event_id: str | None
    message: str
    severity: Severity = "error"
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "position": self.position,
            "event_id": self.event_id,
            "message": self.message,
            **({"detail": self.detail} if self.detail else {}),
        }


@dataclass
class Report:
    """Findings of one check, capped per kind."""

    findings: list[Finding] = field(default_factory=list)
    suppressed: Counter[str] = field(default_factory=Counter)
    _kept: Counter[str] = field(default_factory=Counter)

    def add(self, finding: Finding) -> None:
        if self._kept[finding.kind] >= MAX_FINDINGS_PER_KIND:
            self.suppressed[finding.kind] += 1
            return
        self._kept[finding.kind] += 1
        self.findings.append(finding)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.suppressed


@dataclass
class ChainReport(Report):
    checked: int = 0
    sealed: int = 0
    unsealed: int = 0
    store_head: int = 0
    #: The sealed head: the position and hash an auditor writes down to anchor the log.
    head_position: int = 0
    head_hash: str = GENESIS


@dataclass
class TopicReport(Report):
    messages: int = 0
    duplicates: int = 0
    store_head: int = 0
    topic_head: int = 0
    lag: int = 0


Progress = Callable[[int, int], None]


class Throttle:
    """Calls `report(done, total)` at most every `interval` seconds, and once at the end."""

    def __init__(self, report: Progress | None, interval: float = 2.0) -> None:
        self.report, self.interval = report, interval
        self._next = time.monotonic() + interval

    def __call__(self, done: int, total: int, *, final: bool = False) -> None:
        if self.report is None:
            return
        now = time.monotonic()
        if final or now >= self._next:
            self._next = now + self.interval
            self.report(done, total)


# -- (1) the hash chain --------------------------------------------------------------------


@dataclass(frozen=True)
class StoredEvent:
    """One stored event read both ways: its columns rendered, and its stored body."""

    position: int
    event_id: str | None
    columns: bytes | None
    body: bytes | None
    columns_error: str | None = None
    body_error: str | None = None

    @property
    def wires(self) -> list[bytes]:
        return [w for w in (self.body, self.columns) if w is not None]


def _attempt(
    read: Callable[[int, int], list[Any]], after: int, limit: int
) -> tuple[list[Any] | None, str | None]:
    try:
        return read(after, limit), None
    # A row that does not parse back into an event (pydantic's ValidationError is a
    # ValueError): reported, never fatal. Database errors propagate (exit 9).
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def read_stored(store: EventStore, head: int, page: int = 1000) -> Iterator[StoredEvent]:
    """Every event up to `head`, in position order, read through `read_all` (columns) and
    `read_wire` (body). A page that cannot be read whole is re-read one event at a time so
    that the unreadable event is named and every other one still checked."""
    after = 0
    while after < head:
        limit = min(page, head - after)
        wires, _ = _attempt(store.read_wire, after, limit)
        models, _ = _attempt(store.read_all, after, limit)
        if wires is not None and models is not None:
            by_position: dict[int, list[Any]] = {}
            for w in wires:
                by_position.setdefault(w.position, [None, None])[1] = w
            for m in models:
                by_position.setdefault(m.position, [None, None])[0] = m
            stored = [
                StoredEvent(
                    position=p,
                    event_id=str(m.event_id) if m is not None else w.event_id,
                    columns=canonical_json(m) if m is not None else None,
                    body=w.value if w is not None else None,
                    columns_error=None if m is not None else "not returned by read_all",
                    body_error=None if w is not None else "not returned by read_wire",
                )
                for p, (m, w) in sorted(by_position.items())
                if p <= head
            ]
        else:  # one event of this page cannot be read: read it event by event
            stored, cursor = [], after
            while len(stored) < limit and (one := _read_one(store, cursor)) is not None:
                if one.position > head:
                    break
                stored.append(one)
                cursor = one.position
        if not stored:
            return
        yield from stored
        after = stored[-1].position


def _read_one(store: EventStore, after: int) -> StoredEvent | None:
    wires, body_error = _attempt(store.read_wire, after, 1)
    models, columns_error = _attempt(store.read_all, after, 1)
    if not wires and not models and body_error is None and columns_error is None:
        return None
    w = wires[0] if wires else None
    m = models[0] if models else None
    position = m.position if m is not None else w.position if w is not None else after + 1
    return StoredEvent(
        position=position,
        event_id=str(m.event_id) if m is not None else w.event_id if w is not None else None,
        columns=canonical_json(m) if m is not None else None,
        body=w.value if w is not None else None,
        columns_error=columns_error,
        body_error=body_error,
    )


def parse_expected_head(text: str) -> tuple[int | None, str]:
    """'HASH' or 'POSITION:HASH' (the form `continuum verify` prints)."""
    position_text, _, digest = text.strip().rpartition(":")
    digest = digest.lower()
    if not is_chain_hash(digest):
        raise ValueError(f"expected head must be HASH or POSITION:HASH, got {text!r}")
    if not position_text:
        return None, digest
    if not position_text.isdigit() or int(position_text) < 1:
        raise ValueError(f"expected head position must be a positive integer, got {text!r}")
    return int(position_text), digest


def verify_chain(
    store: EventStore,
    seals: LogSeals,
    *,
    expect_head: str | None = None,
    page: int = 1000,
    on_progress: Progress | None = None,
) -> ChainReport:
    """Check every stored event against the sealed hash chain (see the module docstring)."""
    expected = parse_expected_head(expect_head) if expect_head else None
    report = ChainReport()
    last = seals.last()
    report.store_head = store.head_position()
    if last is not None:
        report.head_position, report.head_hash = last.position, last.hash
    total = max(report.store_head, report.head_position)
    throttle = Throttle(on_progress)
    checker = _ChainChecker(report, sealed_to=report.head_position, store_head=report.store_head)
    slots = _slots(read_stored(store, report.store_head, page), seals.iter_seals(0, page), total)
    current = next(slots, None)
    while current is not None:
        following = next(slots, None)
        checker.check(current, following)
        report.checked = current[0]
        throttle(current[0], total)
        current = following
    throttle(total, total, final=True)
    checker.finish()
    if expected is not None:
        _check_expected_head(report, seals, *expected)
    return report


Slot = tuple[int, StoredEvent | None, Seal | None]


def _slots(events: Iterator[StoredEvent], sealed: Iterator[Seal], total: int) -> Iterator[Slot]:
    """(position, stored event or None, seal or None) for every position 1..total."""
    event, seal = next(events, None), next(sealed, None)
    for p in range(1, total + 1):
        while event is not None and event.position < p:  # duplicates: cannot happen in SQL
            event = next(events, None)
        while seal is not None and seal.position < p:
            seal = next(sealed, None)
        here_event = event if event is not None and event.position == p else None
        here_seal = seal if seal is not None and seal.position == p else None
        yield p, here_event, here_seal


class _ChainChecker:
    def __init__(self, report: ChainReport, *, sealed_to: int, store_head: int) -> None:
        self.report = report
        self.sealed_to = sealed_to
        self.store_head = store_head
        #: The trusted hash at the previous position; None when it cannot be known.
        self.anchor: str | None = GENESIS
        self.first_unsealed: tuple[int, str | None] | None = None

    def add(self, kind: str, p: int, event_id: str | None, message: str, **detail: Any) -> None:
        self.report.add(Finding(kind, p, event_id, message, detail=detail))

    def check(self, slot: Slot, following: Slot | None) -> None:
        p, event, seal = slot
        if seal is not None and not is_chain_hash(seal.hash):
            self.add("seal", p, seal.event_id, f"sealed hash at position {p} is malformed")
            seal = Seal(seal.position, seal.event_id, "")
        if event is None:
            self._missing(p, seal)
            return
        self._compare_renderings(p, event, seal)
        if seal is None:
            self._unsealed(p, event)
            return
        self.report.sealed += 1
        if event.event_id is not None and event.event_id != seal.event_id:
            self.add(
                "reordered",
                p,
                event.event_id,
                f"position {p} holds event {event.event_id}, but event {seal.event_id} was "
                "sealed there: events were moved or replaced",
                sealed_event_id=seal.event_id,
            )
            self.anchor = seal.hash or None
            return
        if self.anchor is None:  # the previous position is unknown: trust this seal onwards
            self.anchor = seal.hash or None
            return
        anchor = self.anchor
        links = {w: chain_hash(anchor, p, w) for w in event.wires}
        if any(h == seal.hash for h in links.values()):
            self.anchor = seal.hash
            return
        recomputed = next(iter(links.values()), None)
        if recomputed is not None and _links_to(recomputed, following):
            self.add(
                "seal",
                p,
                seal.event_id,
                f"the sealed hash at position {p} was changed: stored {seal.hash or '?'}, "
                f"the event and the next link give {recomputed}",
                stored=seal.hash,
                recomputed=recomputed,
            )
            self.anchor = recomputed
            return
        if event.wires:
            self.add(
                "altered",
                p,
                seal.event_id,
                f"event {seal.event_id} at position {p} no longer matches its seal: its content "
                "was changed after sealing",
                sealed=seal.hash,
                recomputed=recomputed,
            )
        self.anchor = seal.hash or None

    def _missing(self, p: int, seal: Seal | None) -> None:
        if seal is None:
            self.add("removed", p, None, f"position {p} has no event (a gap in the log)")
            self.anchor = None
            return
        where = "after the store's head" if p > self.store_head else "from the log"
        self.add(
            "removed",
            p,
            seal.event_id,
            f"event {seal.event_id}, sealed at position {p}, is missing {where}",
        )
        self.report.sealed += 1
        self.anchor = seal.hash or None

    def _compare_renderings(self, p: int, event: StoredEvent, seal: Seal | None) -> None:
        eid = event.event_id
        for what, error in (("columns", event.columns_error), ("body", event.body_error)):
            if error is not None:
                self.add(
                    "unreadable",
                    p,
                    eid,
                    f"the stored {what} at position {p} cannot be read: {error}",
                    part=what,
                )
        if event.body is None or event.columns is None or event.body == event.columns:
            return
        verdict = ""
        if seal is not None and self.anchor is not None and eid == seal.event_id:
            body_ok = chain_hash(self.anchor, p, event.body) == seal.hash
            columns_ok = chain_hash(self.anchor, p, event.columns) == seal.hash
            if body_ok and not columns_ok:
                verdict = "; the body matches the seal, the columns (read by the service) do not"
            elif columns_ok and not body_ok:
                verdict = (
                    "; the columns match the seal, the stored body (what is exported) does not"
                )
        self.add(
            "body_mismatch",
            p,
            eid,
            f"event {eid} at position {p}: the stored body and the columns differ{verdict}",
        )

    def _unsealed(self, p: int, event: StoredEvent) -> None:
        if p <= self.sealed_to:
            self.add(
                "seal",
                p,
                event.event_id,
                f"no sealed hash at position {p}, inside the sealed range 1..{self.sealed_to}: "
                "a seal was removed",
            )
            if self.anchor is not None and event.wires:
                self.anchor = chain_hash(self.anchor, p, event.wires[0])
            return
        self.report.unsealed += 1
        if self.first_unsealed is None:
            self.first_unsealed = (p, event.event_id)

    def finish(self) -> None:
        if self.first_unsealed is None:
            return
        p, event_id = self.first_unsealed
        count = self.report.unsealed
        self.report.add(
            Finding(
                "unsealed",
                p,
                event_id,
                f"{count} event(s) from position {p} to {p + count - 1} are not sealed yet: run "
                "`continuum seal` (an unsealed event is only checked body against columns)",
                severity="warning",
            )
        )


def _links_to(recomputed: str, following: Slot | None) -> bool:
    if following is None:
        return False
    p, event, seal = following
    if event is None or seal is None or not is_chain_hash(seal.hash):
        return False
    return any(chain_hash(recomputed, p, w) == seal.hash for w in event.wires)


def _check_expected_head(
    report: ChainReport, seals: LogSeals, position: int | None, digest: str
) -> None:
    if position is None:
        if digest != report.head_hash:
            report.add(
                Finding(
                    "head_mismatch",
                    report.head_position,
                    None,
                    f"the chain's head is {report.head_position}:{report.head_hash}, not the "
                    f"expected {digest}",
                )
            )
        return
    found = seals.read(position - 1, 1)
    actual = found[0] if found and found[0].position == position else None
    if actual is None or actual.hash != digest:
        report.add(
            Finding(
                "head_mismatch",
                position,
                actual.event_id if actual else None,
                f"the sealed hash at position {position} is "
                f"{actual.hash if actual else 'missing'}, not the expected {digest}",
            )
        )


# -- (3) the topic against the store -------------------------------------------------------


@dataclass(frozen=True)
class TopicMessage:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: The `event_id` header, if the message has one.
    event_id: str | None


def _digest(key: bytes | None, value: bytes) -> bytes:
    return hashlib.sha256((key or b"") + b"\0" + value).digest()[:16]


def _ident(event_id: str) -> bytes:
    return hashlib.sha256(event_id.encode("utf-8")).digest()[:16]


def compare_topic(
    store: EventStore,
    messages: Iterable[TopicMessage],
    *,
    store_head: int,
    page: int = 5000,
    on_progress: Progress | None = None,
) -> TopicReport:
    """Compare the whole topic with the store up to `store_head`.

    Read `store_head` *after* fixing the topic's end offsets: everything on the topic then was
    relayed from an event at or below it. Memory: about 50 bytes per store event (digests in
    arrays indexed by position), not the messages themselves."""
    index = _TopicIndex(TopicReport(store_head=store_head))
    throttle = Throttle(on_progress)
    for message in messages:
        index.add(message)
        throttle(index.report.messages, 0)
    throttle(index.report.messages, 0, final=True)
    for wire in store.iter_wire(0, page):
        if wire.position > store_head:
            break
        index.check(wire)
    index.finish()
    return index.report


class _TopicIndex:
    """What the topic holds, by the position each message claims: 16-byte digests of
    key + value and of the event id, in flat arrays; rare second versions in a dict."""

    def __init__(self, report: TopicReport) -> None:
        self.report = report
        size = report.store_head + 1
        self.digests = bytearray(16 * size)
        self.idents = bytearray(16 * size)
        self.partitions = array("i", [-1]) * size
        self.offsets = array("q", [0]) * size
        #: How many messages carry exactly the first one's digests, at each position.
        self.copies = array("I", [0]) * size
        self.conflicts: dict[int, list[TopicMessage]] = {}
        self.expected_next = 1
        self.first_lagging: tuple[int, str] | None = None

    def add(self, message: TopicMessage) -> None:
        report = self.report
        report.messages += 1
        position, event_id = _claimed(message)
        where = f"message at partition {message.partition} offset {message.offset}"
        detail = {"partition": message.partition, "offset": message.offset}
        if position is None or event_id is None or message.value is None:
            report.add(
                Finding(
                    "extra",
                    None,
                    message.event_id,
                    f"{where} is not an event of this store (no valid envelope)",
                    detail=detail,
                )
            )
            return
        if position > report.store_head:
            report.add(
                Finding(
                    "extra",
                    position,
                    event_id,
                    f"{where} claims position {position}, beyond the store's head "
                    f"{report.store_head}: not in the store",
                    detail=detail,
                )
            )
            return
        report.topic_head = max(report.topic_head, position)
        digest, ident = _digest(message.key, message.value), _ident(event_id)
        at = slice(16 * position, 16 * position + 16)
        if self.partitions[position] == -1:
            self.digests[at], self.idents[at] = digest, ident
            self.partitions[position], self.offsets[position] = message.partition, message.offset
            self.copies[position] = 1
        elif self.digests[at] == digest and self.idents[at] == ident:
            self.copies[position] += 1
        else:
            self.conflicts.setdefault(position, []).append(message)

    def check(self, wire: WireEvent) -> None:
        """Compare the store's event with what the topic holds at its position."""
        p = wire.position
        for gap in range(self.expected_next, p):  # positions the store lacks
            self._extra_at_gap(gap)
        self.expected_next = p + 1
        if self.partitions[p] == -1:
            if p > self.report.topic_head:
                self.first_lagging = self.first_lagging or (p, wire.event_id)
                self.report.lag += 1
            else:
                self.report.add(
                    Finding(
                        "missing",
                        p,
                        wire.event_id,
                        f"event {wire.event_id} at position {p} is not on the topic (later "
                        "events are)",
                    )
                )
            return
        at = slice(16 * p, 16 * p + 16)
        store_digest = _digest(wire.stream_id.encode("utf-8"), wire.value)
        store_ident = _ident(wire.event_id)
        # Messages at p identical to the store's event: all but one are re-sends. When none is
        # (only differing messages claim p), the `differs` findings name the event.
        faithful = 0
        if self.digests[at] == store_digest and self.idents[at] == store_ident:
            faithful += self.copies[p]
        else:
            same_id = self.idents[at] == store_ident
            self._differs(wire.event_id, p, self.partitions[p], self.offsets[p], same_id)
        for other in self.conflicts.pop(p, []):
            assert other.value is not None
            same_id = _ident(_claimed(other)[1] or "") == store_ident
            if same_id and _digest(other.key, other.value) == store_digest:
                faithful += 1
            else:
                self._differs(wire.event_id, p, other.partition, other.offset, same_id)
        self.report.duplicates += max(faithful - 1, 0)

    def finish(self) -> None:
        report = self.report
        for gap in range(self.expected_next, report.store_head + 1):
            self._extra_at_gap(gap)
        for p, others in sorted(self.conflicts.items()):  # more at positions the store lacks
            for other in others:
                report.add(
                    Finding(
                        "extra",
                        p,
                        other.event_id,
                        f"message at partition {other.partition} offset {other.offset} claims "
                        f"position {p}, which the store does not have",
                        detail={"partition": other.partition, "offset": other.offset},
                    )
                )
        if self.first_lagging is not None:
            first, event_id = self.first_lagging
            report.add(
                Finding(
                    "lag",
                    first,
                    event_id,
                    f"the topic is {report.lag} event(s) behind the store: positions {first} to "
                    f"{first + report.lag - 1} (head {report.store_head}) are not on it yet; is "
                    "`continuum relay` running?",
                )
            )

    def _differs(self, event_id: str, p: int, partition: int, offset: int, same_id: bool) -> None:
        what = "its bytes (or key) differ from" if same_id else "its event_id differs from"
        self.report.add(
            Finding(
                "differs",
                p,
                event_id,
                f"message at partition {partition} offset {offset} for event {event_id} "
                f"(position {p}): {what} the store's",
                detail={"partition": partition, "offset": offset},
            )
        )

    def _extra_at_gap(self, p: int) -> None:
        if self.partitions[p] != -1:
            self.report.add(
                Finding(
                    "extra",
                    p,
                    None,
                    f"message at partition {self.partitions[p]} offset {self.offsets[p]} claims "
                    f"position {p}, which the store does not have",
                    detail={"partition": self.partitions[p], "offset": self.offsets[p]},
                )
            )


def _claimed(message: TopicMessage) -> tuple[int | None, str | None]:
    """The position and event id a message claims (the event_id header wins)."""
    try:
        envelope = json.loads(message.value or b"")
        position = envelope["position"]
        value_id = envelope["event_id"]
    except (ValueError, TypeError, KeyError):
        return None, message.event_id
    if isinstance(position, bool) or not isinstance(position, int) or position < 1:
        return None, message.event_id
    return position, message.event_id or (value_id if isinstance(value_id, str) else None)
