"""Sealing: extend the hash chain over the global log up to its head.

`seal` resumes after the last sealed position, reads the events in their wire form
(`EventStore.iter_wire`, the bytes `continuum log export` writes), computes
`chain_hash(previous, position, wire)` for each (continuum_events.chain) and writes the hashes
in batches, each batch one transaction. It is idempotent: run it again and it seals only what is
new. Two sealers may race: the table's primary key lets one batch win; the loser re-reads the
last seal and carries on from there (both compute the same function of the same events).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from continuum.application.ports import EventStore, LogSeals, Seal, SealConflict
from continuum.domain.errors import ContinuumError
from continuum_events.chain import GENESIS, chain_hash

#: How many times in a row a sealer may lose a race without the chain moving before it gives up.
MAX_CONFLICTS = 20


class SealRefused(ContinuumError):
    """The log cannot be sealed as it stands (a position is missing): run `continuum verify`."""

    rule = "seal.refused"


@dataclass
class SealStats:
    sealed: int = 0
    #: Last sealed position and its hash (the head an auditor anchors); 0 and GENESIS if none.
    position: int = 0
    head: str = GENESIS
    #: Batches lost to a concurrent sealer (each is re-read and skipped, not re-written).
    conflicts: int = 0


def seal(
    store: EventStore,
    seals: LogSeals,
    *,
    batch: int = 1000,
    on_progress: Callable[[SealStats], None] | None = None,
    stop: threading.Event | None = None,
) -> SealStats:
    """Seal every event after the last sealed position, up to the store's head.

    `on_progress` is called after every batch written. Returns what this call sealed and the
    head of the chain. Raises `SealRefused` if positions are not dense."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    stats = SealStats()
    last = seals.last()
    if last is not None:
        stats.position, stats.head = last.position, last.hash
    lost_in_a_row = 0
    while stop is None or not stop.is_set():
        page = store.read_wire(stats.position, batch)
        if not page:
            break
        previous, pending = stats.head, list[Seal]()
        for event in page:
            expected = stats.position + len(pending) + 1
            if event.position != expected:
                raise SealRefused(
                    f"position {expected} is missing from the log (the next event is at "
                    f"{event.position}, {event.event_id}): nothing after {expected - 1} was "
                    "sealed; run `continuum verify`",
                    position=expected,
                    next_position=event.position,
                    event_id=event.event_id,
                )
            previous = chain_hash(previous, event.position, event.value)
            pending.append(Seal(event.position, event.event_id, previous))
        try:
            seals.add(pending)
        except SealConflict:
            stats.conflicts += 1
            lost_in_a_row += 1
            now = seals.last()
            if now is None or now.position <= stats.position or lost_in_a_row > MAX_CONFLICTS:
                raise
            stats.position, stats.head = now.position, now.hash
            continue
        lost_in_a_row = 0
        stats.sealed += len(pending)
        stats.position, stats.head = pending[-1].position, pending[-1].hash
        if on_progress is not None:
            on_progress(stats)
    return stats
