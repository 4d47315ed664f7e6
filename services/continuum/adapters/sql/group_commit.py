"""Group commit: concurrent callers' requests combined into shared transactions.

A caller that arrives while fewer than `max_in_flight` batches are running, and none is still
gathering its requests, becomes a *leader*: it starts a batch in its own thread and, when the
batch is ready to take them (for a database transaction: once the connection is checked out
and the transaction begun, time in which other callers queue up), takes every request queued
so far, its own included, at most one per key. Any other caller queues its request and sleeps:
a batch still gathering takes it, or, when a running batch finishes, its leader hands the
leadership to the oldest queued request's thread, which takes everything that queued up
meanwhile. So under load each transaction carries many requests (one commit, one fsync, one
statement for all of them), and a lone caller runs its request at once, with no waiting and
no timer.

Every request gets its own outcome: the batch function returns one result or one exception per
request, and each caller returns or raises exactly that.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")

#: Runs a batch: calls its argument once, when ready, to take the payloads, and returns one
#: result or one exception per payload taken, in order.
BatchRunner = Callable[[Callable[[], Sequence[P]]], Sequence[R | BaseException]]


class _Ticket(Generic[P, R]):
    __slots__ = ("done", "error", "key", "payload", "promoted", "result", "wake")

    def __init__(self, key: Hashable, payload: P) -> None:
        self.key = key
        self.payload = payload
        self.done = False
        self.promoted = False  # handed the leadership while asleep
        self.result: R | None = None
        self.error: BaseException | None = None
        self.wake = threading.Event()


class GroupCommit(Generic[P, R]):
    """Combine concurrent `submit` calls into batches for `run_batch`.

    `key` groups requests that must not share a batch (e.g. two appends to one stream: the
    second must see the first's outcome); a batch holds at most one request per key and at
    most `max_batch` requests. At most `max_in_flight` batches run at once, so one stalled
    transaction does not hold up every other caller when `max_in_flight` > 1.
    """

    def __init__(
        self, run_batch: BatchRunner[P, R], *, max_in_flight: int = 2, max_batch: int = 64
    ) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        self._run_batch = run_batch
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: deque[_Ticket[P, R]] = deque()
        self._leaders = 0  # threads leading a batch, or handed the leadership
        self._collecting = 0  # of which: not yet taken their batch

    def submit(self, key: Hashable, payload: P) -> R:
        """Run `payload` in some batch; return its result or raise its exception."""
        ticket: _Ticket[P, R] = _Ticket(key, payload)
        with self._lock:
            self._queue.append(ticket)
            # A leader that has not taken its batch yet will take this request too.
            lead = self._collecting == 0 and self._leaders < self._max_in_flight
            if lead:
                self._leaders += 1
                self._collecting += 1
        while True:
            if lead:
                self._lead()
            with self._lock:
                # Leadership handed over must be used (and passed on), even if another batch
                # has meanwhile run this ticket: otherwise the queue could be left leaderless.
                lead, ticket.promoted = ticket.promoted, False
                if not lead:
                    if ticket.done:
                        break
                    ticket.wake.clear()
            if not lead:
                ticket.wake.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]  # R itself may include None

    def _lead(self) -> None:
        """Run one batch of whatever is queued, then pass the leadership on (or give it up)."""
        try:
            self._run()
        finally:
            with self._lock:
                successor = None
                if self._collecting == 0:  # else that leader will take what is queued
                    successor = next((t for t in self._queue if not t.promoted), None)
                if successor is None:
                    self._leaders -= 1
                else:
                    successor.promoted = True
                    self._collecting += 1
                    successor.wake.set()

    def _take(self) -> list[_Ticket[P, R]]:
        with self._lock:
            self._collecting -= 1
            batch: list[_Ticket[P, R]] = []
            keys: set[Hashable] = set()
            left: deque[_Ticket[P, R]] = deque()
            while self._queue:
                ticket = self._queue.popleft()
                if len(batch) < self._max_batch and ticket.key not in keys:
                    keys.add(ticket.key)
                    batch.append(ticket)
                else:
                    left.append(ticket)
            self._queue = left
            return batch

    def _run(self) -> None:
        batch: list[_Ticket[P, R]] = []
        taken = False

        def take() -> list[P]:
            nonlocal taken
            if taken:
                raise RuntimeError("a batch takes its requests once")
            taken = True
            batch.extend(self._take())
            return [t.payload for t in batch]

        outcomes: Sequence[R | BaseException]
        try:
            outcomes = self._run_batch(take)
            if not taken:
                raise RuntimeError("the batch never took its requests")
            if len(outcomes) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(outcomes)} outcomes")
        except BaseException as exc:
            # Every request of the batch gets the error, the leader's own included (taken now
            # if the batch never took it: it must not run later after its caller saw this).
            if not taken:
                take()
            self._finish(batch, [exc] * len(batch))
            raise
        self._finish(batch, outcomes)

    def _finish(self, batch: list[_Ticket[P, R]], outcomes: Sequence[R | BaseException]) -> None:
        with self._lock:
            for ticket, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    ticket.error = outcome
                else:
                    ticket.result = outcome
                ticket.done = True
                ticket.wake.set()
