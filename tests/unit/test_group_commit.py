"""Group commit (adapters/sql/group_commit.py) with a fake batch runner: who gets what."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from continuum.adapters.sql.group_commit import GroupCommit

WAIT = 30.0  # seconds: only a guard against hangs, never a measure of speed


class Refused(Exception):
    pass


class Runner:
    """Doubles each payload; a negative payload gets its own Refused. Records every batch, and
    can hold a batch before it takes its requests until the test lets it go."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold_next = False
        self.holding = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, take: Callable[[], Sequence[int]]) -> list[int | BaseException]:
        with self._lock:
            hold, self.hold_next = self.hold_next, False
        if hold:
            self.holding.set()
            assert self.release.wait(WAIT)
        batch = list(take())
        with self._lock:
            self.batches.append(batch)
        return [Refused(p) if p < 0 else p * 2 for p in batch]


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def submit_in_thread(
    group: GroupCommit[int, int], key: Any, payload: int, out: dict[int, object]
) -> threading.Thread:
    def run() -> None:
        try:
            out[payload] = group.submit(key, payload)
        except BaseException as exc:  # checked by the test
            out[payload] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def queued(group: GroupCommit[Any, Any]) -> int:
    return len(group._queue)


def test_a_lone_caller_runs_its_own_request_at_once() -> None:
    runner = Runner()
    group: GroupCommit[int, int] = GroupCommit(runner)
    assert group.submit("a", 21) == 42
    with pytest.raises(Refused):
        group.submit("a", -1)
    assert runner.batches == [[21], [-1]]


def test_requests_queued_behind_a_running_batch_share_the_next_one() -> None:
    runner = Runner()
    group: GroupCommit[int, int] = GroupCommit(runner, max_in_flight=1)
    out: dict[int, object] = {}
    runner.hold_next = True
    first = submit_in_thread(group, "k0", 100, out)
    assert runner.holding.wait(WAIT)
    # While the first batch has not even taken its request, eleven more arrive: they queue.
    others = [submit_in_thread(group, f"k{n}", n, out) for n in range(1, 12)]
    wait_until(lambda: queued(group) == 12)
    runner.release.set()
    for thread in [first, *others]:
        thread.join(WAIT)
        assert not thread.is_alive()
    # The held batch took everything queued when it went on: one batch, one result each.
    assert len(runner.batches) == 1
    assert sorted(runner.batches[0]) == [*range(1, 12), 100]
    assert out == {n: n * 2 for n in [*range(1, 12), 100]}


def test_every_caller_gets_exactly_its_own_result_or_error_under_contention() -> None:
    runner = Runner()
    group: GroupCommit[int, int] = GroupCommit(runner, max_in_flight=2, max_batch=5)
    out: dict[int, object] = {}
    payloads = [p if p % 7 else -p for p in range(1, 401)]  # every 7th is refused

    def caller(first: int) -> None:
        for p in payloads[first::8]:
            try:
                out[p] = group.submit(p % 13, p)  # keys shared between threads
            except Refused as exc:
                out[p] = exc

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert set(out) == set(payloads)
    for p in payloads:
        if p < 0:
            assert isinstance(out[p], Refused)
            assert out[p].args == (p,)
        else:
            assert out[p] == p * 2
    # Each request ran exactly once, in a batch of at most 5, with one request per key.
    ran = [p for batch in runner.batches for p in batch]
    assert sorted(ran) == sorted(payloads)
    for batch in runner.batches:
        assert 1 <= len(batch) <= 5
        assert len({p % 13 for p in batch}) == len(batch)


def test_two_requests_with_one_key_go_in_successive_batches() -> None:
    runner = Runner()
    group: GroupCommit[int, int] = GroupCommit(runner, max_in_flight=1)
    out: dict[int, object] = {}
    runner.hold_next = True
    first = submit_in_thread(group, "x", 1, out)
    assert runner.holding.wait(WAIT)
    same_a = submit_in_thread(group, "same", 2, out)
    wait_until(lambda: queued(group) == 2)
    same_b = submit_in_thread(group, "same", 3, out)
    other = submit_in_thread(group, "other", 4, out)
    wait_until(lambda: queued(group) == 4)
    runner.release.set()
    for thread in (first, same_a, same_b, other):
        thread.join(WAIT)
        assert not thread.is_alive()
    assert runner.batches == [[1, 2, 4], [3]]
    assert out == {1: 2, 2: 4, 3: 6, 4: 8}


def test_a_stalled_batch_does_not_hold_up_other_callers() -> None:
    """With max_in_flight=2, a batch stuck after taking its request (say, in COMMIT) leaves
    the other slot to everyone else."""
    runner = Runner()
    stuck_entered, unstick = threading.Event(), threading.Event()

    def first_batch_sticks(take: Callable[[], Sequence[int]]) -> list[int | BaseException]:
        if stuck_entered.is_set():
            return runner(take)
        batch = list(take())
        stuck_entered.set()
        assert unstick.wait(WAIT)
        return [p * 2 for p in batch]

    group: GroupCommit[int, int] = GroupCommit(first_batch_sticks, max_in_flight=2)
    out: dict[int, object] = {}
    slow = submit_in_thread(group, "a", 10, out)
    assert stuck_entered.wait(WAIT)
    assert group.submit("b", 11) == 22
    assert group.submit("c", 12) == 24
    assert slow.is_alive()
    unstick.set()
    slow.join(WAIT)
    assert out == {10: 20}
    assert runner.batches == [[11], [12]]


def test_a_runner_that_blows_up_fails_its_whole_batch_and_runs_nothing_later() -> None:
    calls: list[list[int]] = []

    def explode(take: Callable[[], Sequence[int]]) -> list[int | BaseException]:
        if not calls:
            calls.append([])
            raise KeyboardInterrupt  # before it took anything
        batch = list(take())
        calls.append(batch)
        return list(batch)

    group: GroupCommit[int, int] = GroupCommit(explode)
    with pytest.raises(KeyboardInterrupt):
        group.submit("a", 1)
    # The failed request was taken out of the queue: the next batch does not run it.
    assert group.submit("b", 2) == 2
    assert calls == [[], [2]]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(Runner(), max_in_flight=0)
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(Runner(), max_batch=0)
