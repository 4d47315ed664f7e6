"""The outbox relay: every committed event, in global order, copied to a message bus.

The event log is the outbox. The relay reads it by position after its durable checkpoint,
publishes a batch, waits until the bus has acknowledged every message of it, and only then
moves the checkpoint. So nothing is lost: after a crash the relay resumes at the checkpoint and
republishes what it had sent but not yet checkpointed, with the same event ids (consumers
de-duplicate on `event_id`). Reading by position never returns an uncommitted event and never
skips one that commits late (see adapters/sql/store.py).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from continuum.application.ports import Checkpoints, EventStore, WireEvent

log = logging.getLogger("continuum.relay")


@dataclass
class InFlight:
    """A batch handed to the bus and not yet known to be acknowledged."""

    last_position: int
    count: int
    handle: object


class Publisher(abc.ABC):
    """Hands events to a bus in order; `finish` returns once the bus acknowledged them."""

    @abc.abstractmethod
    def start(self, events: Sequence[WireEvent], stop: threading.Event) -> InFlight:
        """Send in order without waiting for acknowledgements."""

    @abc.abstractmethod
    def finish(self, batch: InFlight, stop: threading.Event) -> None:
        """Block until every message of `batch` is acknowledged, through outages; raise
        `PublishInterrupted` if `stop` is set first."""

    def publish(self, events: Sequence[WireEvent], stop: threading.Event) -> None:
        self.finish(self.start(events, stop), stop)

    def flush(self, stop: threading.Event) -> None:  # noqa: B027 - optional hook
        """Send whatever is buffered now, instead of waiting for more to batch with."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class PublishInterrupted(Exception):
    """Stop was requested before every message of a batch was acknowledged."""


class Waiter(abc.ABC):
    """Blocks until new events may have been committed, or the timeout passes."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """True if woken by a commit notice, False on timeout."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class PollingWaiter(Waiter):
    def __init__(self, interval: float) -> None:
        self.interval = interval

    def wait(self, timeout: float) -> bool:
        time.sleep(min(self.interval, timeout))
        return False


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    checkpoint: int = 0
    head: int = 0

    @property
    def lag(self) -> int:
        return max(0, self.head - self.checkpoint)


class Relay:
    def __init__(
        self,
        store: EventStore,
        checkpoints: Checkpoints,
        publisher: Publisher,
        *,
        name: str,
        batch_size: int = 2_000,
        waiter: Waiter | None = None,
        idle_timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.checkpoints = checkpoints
        self.publisher = publisher
        self.name = name
        self.batch_size = batch_size
        self.waiter = waiter or PollingWaiter(0.2)
        self.idle_timeout = idle_timeout
        self.stats = RelayStats(checkpoint=checkpoints.get(name))

    def drain(self, stop: threading.Event | None = None) -> int:
        """Publish everything committed so far, or until `stop` is set; return the number of
        events published.

        Pipelined: batch k+1 is read from the store while batch k is in flight, and the
        checkpoint moves past batch k only once the bus has acknowledged all of it."""
        stop = stop or threading.Event()
        after = self.checkpoints.get(self.name)
        self.stats.checkpoint = after
        total = 0
        in_flight: InFlight | None = None
        while True:
            # Once `stop` is set, read nothing more: finish what is in flight and return.
            events = [] if stop.is_set() else self.store.read_wire(after, self.batch_size)
            started = self.publisher.start(events, stop) if events else None
            if in_flight is not None:
                if started is None:  # caught up: nothing to batch with, send it now
                    self.publisher.flush(stop)
                self._complete(in_flight, stop)
            if started is None:
                return total
            in_flight, after = started, started.last_position
            total += started.count

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Publish one batch after the checkpoint and wait for it; return its size."""
        stop = stop or threading.Event()
        events = self.store.read_wire(self.checkpoints.get(self.name), self.batch_size)
        if not events:
            return 0
        batch = self.publisher.start(events, stop)
        self.publisher.flush(stop)
        self._complete(batch, stop)
        return len(events)

    def _complete(self, batch: InFlight, stop: threading.Event) -> None:
        self.publisher.finish(batch, stop)
        self.checkpoints.put(self.name, batch.last_position)
        self.stats.published += batch.count
        self.stats.batches += 1
        self.stats.checkpoint = batch.last_position

    def run(
        self,
        stop: threading.Event,
        on_progress: Callable[[RelayStats], None] | None = None,
        progress_every: float = 5.0,
    ) -> RelayStats:
        """Relay until `stop` is set: drain, then sleep until a commit notice (or a poll)."""
        last_report = time.monotonic()
        while not stop.is_set():
            try:
                # A full batch means a backlog: drain it pipelined. Otherwise this is live
                # traffic, sent at once for latency.
                published = self.run_once(stop)
                if published >= self.batch_size:
                    published += self.drain(stop)
            except PublishInterrupted:
                break
            now = time.monotonic()
            if on_progress is not None and now - last_report >= progress_every:
                self.stats.head = self.store.head_position()
                on_progress(self.stats)
                last_report = now
            if published < self.batch_size:
                self.waiter.wait(self.idle_timeout)
        self.stats.head = self.store.head_position()
        return self.stats
