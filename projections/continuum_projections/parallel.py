"""A rebuild from the event store split across processes by patient.

The fold is per patient, so N processes can each fold the patients of one shard
(`shard_of(key, N)`) from the same log into the same read model: their rows never collide,
their census deltas add up (the snapshot upkeep already takes deltas from several writers, as
it does for Kafka workers), and each shard commits its own checkpoint with its rows. When every
shard has reached the same position, their checkpoints become the ordinary store checkpoint and
the read model's source goes back to "store" (`ReadModel.merge_checkpoints`), so the ordinary
runner goes on from there. A crash or a stop anywhere leaves the shards' checkpoints: the same
rebuild run again goes on from them, and until it completes the ordinary runner refuses the
read model (its source names the shards).

Python folds on one core per process; on the 2-core benchmark machine two shards rebuild 1M
events about 1.2-1.4 times as fast as one process (40,902 against 33,228 events/s in the
latest benchmark run), with about 1.35 times its memory in all (docs/benchmarks.md): together
they keep both cores busy. The merge runs while the query indexes are built
(`ReadModel.finish(alongside=...)`).
"""

from __future__ import annotations

import datetime as dt
import functools
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

from continuum.application.ports import EventStore
from continuum.domain.policy import PolicyRegistry
from continuum_projections.readmodel import STORE_CHECKPOINT, ReadModel, ReadModelError
from continuum_projections.runners import (
    Progress,
    ProgressFn,
    StoreRunner,
    shard_checkpoint,
    sharded_source,
    source_name,
)

#: Opens, in the calling process, the event store, the read model and the policies. It must
#: pickle (a module-level function, or a functools.partial of one): each shard's process is
#: started with `spawn` and opens its own connections.
Opener = Callable[[], AbstractContextManager[tuple[EventStore, ReadModel, PolicyRegistry]]]


#: Events per batch in each shard. Memory adds up across the shards: on the 1M benchmark two
#: shards peaked at 238-243 MB each with 35,000-event batches (under 500 MB together) and at
#: 256-257 MB with 50,000, at the same rate within the host's noise (four pairs of runs:
#: 35,000 and 35,200 events/s on average). A one-process rebuild peaks at 350-395 MB.
SHARD_BATCH = 35_000


class ShardFailed(ReadModelError):
    """A shard of a parallel rebuild failed; the others were stopped."""

    rule = "projection.shard_failed"


@dataclass
class _Shard:
    events: int = 0
    skipped: int = 0
    flushes: int = 0
    position: int = 0
    done: bool = False
    error: str | None = None


@dataclass
class _Run:
    shards: list[_Shard] = field(default_factory=list)

    def progress(self, target: int, started: float) -> Progress:
        return Progress(
            events=sum(s.events for s in self.shards),
            skipped=sum(s.skipped for s in self.shards),
            flushes=sum(s.flushes for s in self.shards),
            position=min(s.position for s in self.shards),
            target=target,
            started=started,
        )


def rebuild(
    open_parts: Opener,
    shards: int,
    *,
    until: int,
    as_of: dt.datetime | None = None,
    on_progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    poll_s: float = 0.2,
    flush_every: int = SHARD_BATCH,
    page: int = 5_000,
) -> Progress:
    """Fold every event up to position `until` in `shards` processes; once all are done,
    merge their checkpoints while the query indexes are built. Each shard writes a batch every
    `flush_every` of its events (`SHARD_BATCH`: memory adds up across the shards;
    docs/benchmarks.md has the figures).

    The shards keep no census snapshots while they run (their deltas interleave in recorded
    time); the merge cuts them all in one pass (`ReadModel.merge_checkpoints`). A merge that
    fails leaves the indexes built: harmless, the next run keeps them up to date.

    Returns the summed progress. A stop leaves the shards where they are (the same call again
    goes on); a failed shard stops the others and raises `ShardFailed` naming it."""
    if shards < 2:
        raise ValueError("a parallel rebuild needs at least 2 shards")
    sharded = source_name(sharded_source(shards), as_of)
    with open_parts() as (_store, model, _policies):
        model.claim(sharded)  # refuses a read model fed otherwise, before any process starts
        model.shed_upkeep_indexes()  # the shards keep no snapshots; finish() builds them
    context = multiprocessing.get_context("spawn")
    messages: Any = context.Queue()
    halt = context.Event()
    started = time.monotonic()
    run = _Run([_Shard() for _ in range(shards)])
    workers = [
        context.Process(
            target=_shard_main,
            args=(open_parts, index, shards, until, as_of, (flush_every, page), messages, halt),
            name=f"rebuild-shard-{index}",
            daemon=True,
        )
        for index in range(shards)
    ]
    for worker in workers:
        worker.start()
    try:
        _watch(run, workers, messages, halt, stop, poll_s, until, started, on_progress)
    finally:
        halt.set()
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
                worker.join()
        messages.close()
    failed = [(i, s.error) for i, s in enumerate(run.shards) if s.error is not None]
    if failed:
        index, error = failed[0]
        raise ShardFailed(
            f"shard {index} of {shards} failed: {error}. The other shards were stopped; run the "
            "same rebuild again: each shard goes on from its checkpoint"
        )
    progress = run.progress(until, started)
    if not all(s.done for s in run.shards):
        return progress  # stopped: the shards' checkpoints stay for the next run
    with open_parts() as (_store, model, _policies):
        # The merge (which cuts the census snapshots) runs while the query indexes are built.
        model.finish(
            alongside=functools.partial(
                model.merge_checkpoints,
                [shard_checkpoint(index, shards) for index in range(shards)],
                STORE_CHECKPOINT,
                position=until,
                source=(sharded, source_name(STORE_CHECKPOINT, as_of)),
            )
        )
    if on_progress is not None:
        on_progress(progress)
    return progress


def _watch(
    run: _Run,
    workers: list[Any],
    messages: Any,
    halt: ProcessEvent,
    stop: threading.Event | None,
    poll_s: float,
    until: int,
    started: float,
    on_progress: ProgressFn | None,
) -> None:
    """Gather the shards' reports until every shard is done, one fails, or `stop` is set."""
    while True:
        try:
            kind, index, *rest = messages.get(timeout=poll_s)
        except queue.Empty:
            kind, index, rest = "", -1, []
        if kind:
            shard = run.shards[index]
            if kind == "error":
                shard.error = str(rest[0])
            else:
                shard.events, shard.skipped, shard.flushes, shard.position = rest
                shard.done = kind == "done"
            if on_progress is not None:
                on_progress(run.progress(until, started))
        for index, worker in enumerate(workers):
            shard = run.shards[index]
            if worker.exitcode not in (None, 0) and not shard.done and shard.error is None:
                shard.error = f"its process exited with code {worker.exitcode}"
        if any(s.error is not None for s in run.shards):
            halt.set()
            return
        if all(s.done for s in run.shards):
            return
        stopping = stop is not None and stop.is_set()
        if stopping:
            halt.set()
        if all(w.exitcode is not None for w in workers) and messages.empty():
            if not stopping:  # every process ended, and not all of them at the end
                for shard in run.shards:
                    if not shard.done:
                        shard.error = f"it ended at position {shard.position}, before {until}"
            return


class _Halted(threading.Event):
    """The runner's stop flag, read from the coordinator's process-shared event. Nothing here
    ever waits on that event: a process that died while waiting would leave the coordinator's
    `set()` waiting for it forever."""

    def __init__(self, halt: ProcessEvent) -> None:
        super().__init__()
        self._halt = halt

    def is_set(self) -> bool:
        return self._halt.is_set()


def _shard_main(
    open_parts: Opener,
    index: int,
    count: int,
    until: int,
    as_of: dt.datetime | None,
    sizes: tuple[int, int],
    messages: Any,
    halt: ProcessEvent,
) -> None:
    """One shard, in its own process: report progress; on failure, report the error. Ctrl-C
    at a terminal reaches every process of the group: a shard leaves it to the coordinator,
    which stops all shards cleanly (between pages, batches committed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = _Halted(halt)
    flush_every, page = sizes

    def report(kind: str, progress: Progress) -> None:
        messages.put(
            (
                kind,
                index,
                progress.events,
                progress.skipped,
                progress.flushes,
                progress.position,
            )
        )

    try:
        with open_parts() as (store, model, policies):
            runner = StoreRunner(
                store,
                model,
                policies,
                as_of=as_of,
                flush_every=flush_every,
                page=page,
                shard=(index, count),
            )
            try:
                progress = runner.run(
                    stop=stop, until=until, on_progress=lambda p: report("progress", p)
                )
            finally:
                runner.close()
        report("done" if progress.position >= until else "progress", progress)
    except BaseException as exc:  # reported to the coordinator, which names the shard
        messages.put(("error", index, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
