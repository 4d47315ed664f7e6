"""Runners feed the continuum fold from a source and write its read models.

- `StoreRunner` catches up from the event store by global position.
- `KafkaRunner` consumes the events topic as a member of a consumer group.

Both decode the same canonical wire bytes and run the same `ContinuumFold`, and both write each
batch with their checkpoint (the store position, or every partition's next offset) in the
read model's transaction (`ReadModel.flush`). Kafka offsets are also committed to the group
afterwards, but only so that operators' lag tools see them: on (re)assignment the runner seeks
to the offsets saved with the read model, which are the truth.

"As of" (`as_of`) filters by the events' own recorded time, never by broker timestamps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from continuum.application.ports import EventStore
from continuum.domain.policy import PolicyRegistry
from continuum_projections.fold import ContinuumFold, Event, decode, parse_time
from continuum_projections.policyview import PolicyViews
from continuum_projections.readmodel import (
    STORE_CHECKPOINT,
    ReadModel,
    StaleBatch,
    state_checkpoint,
)

#: A batch is written once it holds this many row changes, however few events made them
#: (bounds memory: about 2 KB a row).
MAX_BATCH_ROWS = 100_000
#: Patients kept in memory between flushes; past this the cache is dropped and reloaded.
MAX_CACHED_PATIENTS = 200_000
#: A deferring runner saves every patient (a complete batch) at least once in this many
#: batches: it bounds how long the rows of patients in care lag behind the census during a
#: long catch-up, and how far a restarted runner folds again (`StoreRunner._warm_up`).
COMPLETE_EVERY = 10


@dataclass
class Progress:
    events: int = 0
    skipped: int = 0  # after --as-of, or duplicates
    refolded: int = 0  # folded again without writing, after a restart (StoreRunner warm-up)
    flushes: int = 0
    position: int = 0
    target: int = 0
    started: float = 0.0

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.events / elapsed if elapsed > 0 else 0.0


ProgressFn = Callable[[Progress], None]
#: A page of the log: (position, stream id, wire bytes).
Page = list[tuple[int, str, str | bytes]]


class _Base:
    def __init__(
        self,
        model: ReadModel,
        policies: PolicyRegistry,
        *,
        as_of: dt.datetime | None = None,
        flush_every: int = 50_000,
        defer: bool = False,
    ) -> None:
        self.model = model
        self.fold = ContinuumFold(PolicyViews(policies), load=model.load_patients, defer=defer)
        self.as_of = as_of
        self.flush_every = flush_every
        self.progress = Progress(started=time.monotonic())
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-model-writer")
        # PostgreSQL works on a batch while Python folds the next; SQLite (one file, or one
        # in-memory database per connection) is written in line.
        self._background = model.engine.dialect.name == "postgresql"
        self._pending: Future[None] | None = None
        self._partial = 0  # batches since the last complete one
        #: Keep the census snapshots up to date with every batch (not in a rebuild: a
        #: parallel rebuild's merge, or the end of a store runner's first run, cuts them all).
        self._snapshots = True

    def _past_as_of(self, event: Event) -> bool:
        """Recorded after the moment this runner replays to (`as_of`)."""
        return self.as_of is not None and parse_time(event["recorded_at"]) > self.as_of

    def _apply(self, event: Event) -> None:
        if self._past_as_of(event):
            self.progress.skipped += 1
            return
        if self.fold.apply(event):
            self.progress.events += 1
        else:
            self.progress.skipped += 1

    def _flush(
        self,
        positions: dict[str, int],
        starts: dict[str, int] | None = None,
        *,
        complete: bool = False,
    ) -> None:
        """Hand the batch to the writer thread and go on folding; at most one batch is in
        flight, so the database works while Python folds the next one.

        A deferring fold saves the patients in care only in a `complete` batch (or when the
        cache is too big): such a batch also moves the state checkpoint beside each
        checkpoint it writes."""
        everyone = len(self.fold.patients) > MAX_CACHED_PATIENTS
        complete = (
            complete or everyone or not self.fold.defer or self._partial >= COMPLETE_EVERY - 1
        )
        self._partial = 0 if complete else self._partial + 1
        changes, touched = self.fold.take(complete=complete)
        if complete and self.fold.defer:
            positions = {**positions, **{state_checkpoint(n): at for n, at in positions.items()}}
        batch = self.model.prepare(changes, touched)
        self._wait()  # the previous batch is committed after this
        # Patients saved and not touched by this batch have all their state committed: the
        # cache may drop them (discharged ones always, everyone when it is too big).
        recent = {p.key for p in touched}
        self.fold.forget(
            key
            for key, p in self.fold.patients.items()
            if (everyone or p.placement is None)
            and key not in recent
            and key not in self.fold.dirty
        )
        if self._background:
            self._pending = self._writer.submit(
                self.model.write, batch, dict(positions), starts, snapshots=self._snapshots
            )
        else:
            self._pending = Future()
            try:
                self.model.write(batch, dict(positions), starts, snapshots=self._snapshots)
                self._pending.set_result(None)
            except BaseException as exc:  # reported by _wait, as for the writer thread
                self._pending.set_exception(exc)
            self._wait()
        self.progress.flushes += 1

    def _wait(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except BaseException:
            # Nothing of that batch was written: drop the in-memory state too, so that the
            # next attempt starts again from the saved checkpoint and saved patient state.
            self.fold.evict()
            raise

    def _finish(self) -> None:
        self._wait()

    def close(self) -> None:
        self._writer.shutdown(wait=True)


class StoreRunner(_Base):
    """Catch up from the event store, by global position."""

    def __init__(
        self,
        store: EventStore,
        model: ReadModel,
        policies: PolicyRegistry,
        *,
        as_of: dt.datetime | None = None,
        flush_every: int = 50_000,
        page: int = 5_000,
        name: str | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(model, policies, as_of=as_of, flush_every=flush_every, defer=True)
        if shard is not None:
            index, count = shard
            if count < 2 or not 0 <= index < count:
                raise ValueError(f"shard {index} of {count}: want 0 <= index < count, count >= 2")
        #: (index, count): fold only the patients of shard `index` (the store's choice; a
        #: parallel rebuild, `continuum_projections.parallel`), with a checkpoint of its own.
        self.shard = shard
        # Shards' deltas interleave in recorded time: upkeep batch by batch would add most of
        # one shard's deltas to snapshots the other had cut (`_add_to_snapshots`).
        self._snapshots = shard is None
        model.claim(source_name(sharded_source(shard[1]) if shard else STORE_CHECKPOINT, as_of))
        self.store = store
        self.page = page
        self.name = name or (shard_checkpoint(*shard) if shard else STORE_CHECKPOINT)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-reader")
        engine = getattr(store, "engine", None)
        self._ahead = engine is not None and engine.dialect.name == "postgresql"

    def lag(self) -> int:
        self.store.sequence()
        return max(0, self.store.head_position() - self.model.checkpoint(self.name))

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        on_progress: ProgressFn | None = None,
        max_events: int | None = None,
        until: int | None = None,
    ) -> Progress:
        """Apply everything committed up to now (or up to position `until`); return when
        caught up (or stopped)."""
        with _quiet_gc():
            return self._run(stop, on_progress, max_events, until)

    def _run(
        self,
        stop: threading.Event | None,
        on_progress: ProgressFn | None,
        max_events: int | None,
        until: int | None,
    ) -> Progress:
        self.store.sequence()
        if self.fold.dirty or self.fold.changes:
            self.fold.evict()  # a previous run raised: its memory is not what was saved
        after = self.model.checkpoint(self.name)
        if until is None and self.shard is not None:
            until = self.store.head_position()  # shards read windows of positions up to here
        self.progress.position = after
        self.progress.target = self.store.head_position() if until is None else until
        self.fold.fresh = after == 0
        if self.shard is None:
            # A rebuild from the start (and a run going on with one that stopped) cuts its
            # census snapshots all at once at the end.
            if after == 0:
                self.model.defer_snapshots()
            self._snapshots = after != 0 and not self.model.snapshots_deferred()
        saved = self.model.checkpoint(state_checkpoint(self.name))
        if saved < after and not self._warm_up(saved, after, stop, on_progress):
            self.fold.evict()  # stopped while warming up: nothing was written
            return self.progress
        pending = 0
        scanned = after  # the log is read up to here (a shard's pages skip others' events)
        # PostgreSQL: the next page is read by another thread while this one is folded, so
        # the query's time on the server (an index probe per event) hides behind the fold.
        # SQLite reads in line (in-process, and an in-memory database is per thread).
        ahead = self._read_ahead(scanned, until)
        while stop is None or not stop.is_set():
            page, end = ahead.result()
            if end <= scanned:
                break
            ahead = self._read_ahead(end, until)
            for event in self._decoded(page):
                self._apply(event)
                pending += 1
                after = self.progress.position = event["position"]
                if pending >= self.flush_every or self.fold.changes.rows >= MAX_BATCH_ROWS:
                    self._flush({self.name: after})
                    pending = 0
                    if on_progress:
                        on_progress(self.progress)
                if max_events is not None and self.progress.events >= max_events:
                    break
            if max_events is not None and self.progress.events >= max_events:
                break
            scanned = end
            if self.shard is not None:
                # The other shards' events in the window are done with too.
                after = self.progress.position = end
        ahead.cancel()
        with contextlib.suppress(Exception):
            ahead.result()  # not used: read past a stop, or past the end
        # Anything read since the last complete batch (events not yet written, patients not
        # yet saved, a shard's windows of others' events, a warm-up) ends in a complete one.
        if after > saved:
            self._flush({self.name: after}, complete=True)
        self._finish()
        if self.shard is None:  # a parallel rebuild finishes once, after its last shard
            # A run that kept the snapshots (every run of a follower but its first) has
            # nothing to cut: no snapshot lock taken at each of its ends.
            cut = None if self._snapshots else self.model.cut_deferred_snapshots
            self.model.finish(alongside=cut)
        if on_progress:
            on_progress(self.progress)
        return self.progress

    def _warm_up(
        self,
        start: int,
        end: int,
        stop: threading.Event | None,
        on_progress: ProgressFn | None,
    ) -> bool:
        """Fold again, writing nothing, the events after `start` up to `end`: their rows were
        written, but the state of the patients still in care was not saved after `start`
        (the runner stopped between complete batches: killed, or a batch failed). False if
        stopped first.

        Patients out of care are dropped from memory once the state saved for them is as
        new as what the fold holds (a batch saves them after their discharge)."""
        scanned = start
        ahead = self._read_ahead(scanned, end)
        while True:
            page, upto = ahead.result()
            if upto <= scanned:
                return True
            if stop is not None and stop.is_set():
                return False
            ahead = self._read_ahead(upto, end)
            for event in self._decoded(page):
                if not self._past_as_of(event):
                    self.fold.apply(event)
            self.fold.discard_changes()
            self.progress.refolded += len(page)
            out = {k: p.version for k, p in self.fold.patients.items() if p.placement is None}
            saved = self.model.saved_versions(out)
            self.fold.forget(k for k, version in out.items() if saved.get(k, -1) >= version)
            scanned = upto
            if on_progress:
                on_progress(self.progress)

    def _decoded(self, page: Page) -> Iterator[Event]:
        """A page's events, decoded one at a time, with their log positions, once their
        patients' saved state is loaded (one query for the page).

        One at a time: each event is folded and freed before the next is decoded, so its
        memory is reused while still in the CPU's cache. Decoding the whole page first
        (about 12 MB) took three times as long per event."""
        self.fold.preload(stream_id for _, stream_id, _ in page)
        for position, _, body in page:
            event = decode(body)
            event["position"] = position
            yield event

    def _read_ahead(self, after: int, until: int | None) -> Future[tuple[Page, int]]:
        if self._ahead:
            return self._reader.submit(self._page, after, until)
        done: Future[tuple[Page, int]] = Future()
        done.set_result(self._page(after, until))
        return done

    def _page(self, after: int, until: int | None) -> tuple[Page, int]:
        """The next events and the position the log was read up to. A shard reads a window
        of `page` positions per shard and gets only its own patients' events from it."""
        if self.shard is not None and until is not None:
            index, count = self.shard
            upto = min(after + self.page * count, until)
            if upto <= after:
                return [], after
            return self.store.read_shard_bodies(after, upto, index, count), upto
        limit = self.page if until is None else min(self.page, until - after)
        rows = self.store.read_bodies(after, limit) if limit > 0 else []
        return rows, rows[-1][0] if rows else after

    def close(self) -> None:
        super().close()
        self._reader.shutdown(wait=True)

    def follow(
        self,
        stop: threading.Event,
        *,
        wait: Callable[[float], object] | None = None,
        interval_s: float = 0.5,
        on_progress: ProgressFn | None = None,
    ) -> Progress:
        """Keep catching up until `stop` is set. `wait(timeout)` sleeps until new events may
        have been committed (PostgreSQL LISTEN/NOTIFY) or the timeout passes."""
        while not stop.is_set():
            self.run(stop=stop, on_progress=on_progress)
            if wait is not None:
                wait(interval_s)
            else:
                stop.wait(interval_s)
        return self.progress


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """The fold makes no reference cycles; the cyclic collector only costs time here (about
    a fifth of a rebuild). Reference counting still frees everything."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def shard_checkpoint(index: int, count: int) -> str:
    return f"{STORE_CHECKPOINT}:shard-{index}-of-{count}"


def sharded_source(count: int) -> str:
    """The source a read model names while a parallel rebuild of `count` shards fills it."""
    return f"{STORE_CHECKPOINT} in {count} shards"


def source_name(name: str, as_of: dt.datetime | None) -> str:
    return name if as_of is None else f"{name} as of {as_of.isoformat()}"


def kafka_checkpoint(topic: str, partition: int) -> str:
    return f"kafka:{topic}:{partition}"


class KafkaRunner(_Base):
    """Consume the events topic as a consumer group member; offsets saved with the rows."""

    def __init__(
        self,
        consumer: Any,
        topic: str,
        model: ReadModel,
        policies: PolicyRegistry,
        *,
        as_of: dt.datetime | None = None,
        flush_every: int = 50_000,
        poll_timeout_ms: int = 500,
        max_poll_records: int = 5_000,
    ) -> None:
        super().__init__(model, policies, as_of=as_of, flush_every=flush_every)
        model.claim(source_name(f"kafka:{topic}", as_of))
        self.consumer = consumer
        self.topic = topic
        self.poll_timeout_ms = poll_timeout_ms
        self.max_poll_records = min(max_poll_records, flush_every)
        self._assigned = threading.Event()
        self._unsaid: dict[Any, Any] = {}  # group offsets of the batch in flight
        self._watermarked: set[Any] = set()  # partitions whose end was checked (_reached)
        #: Batches dropped because another member had projected their events (`_fenced`).
        self.fenced = 0
        self.on_fenced: Callable[[StaleBatch], None] | None = None
        from kafka import ConsumerRebalanceListener

        runner = self

        class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Any) -> None:
                # Finish the batch in flight, then forget patients whose partitions may now
                # go to another worker. A fenced batch wrote nothing; the assignment that
                # follows seeks to the saved offsets anyway.
                try:
                    runner._settle()
                except StaleBatch as stale:
                    runner.fenced += 1
                    runner._unsaid = {}
                    if runner.on_fenced is not None:
                        runner.on_fenced(stale)
                runner.fold.evict()

            def on_partitions_assigned(self, assigned: Any) -> None:
                runner._wait()
                runner.fold.evict()
                for tp in assigned:
                    saved = runner.model.checkpoint(kafka_checkpoint(tp.topic, tp.partition))
                    if saved:
                        runner.consumer.seek(tp, saved)
                    else:
                        runner.consumer.seek_to_beginning(tp)
                runner._assigned.set()

        consumer.subscribe([topic], listener=_Listener())

    def lag(self) -> dict[int, int]:
        """Messages not yet projected, per partition (end offset minus saved offset)."""
        from kafka import TopicPartition

        partitions = self.consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        ends = self.consumer.end_offsets(tps) if tps else {}
        saved = self.model.checkpoints_like(f"kafka:{self.topic}:")
        return {
            tp.partition: max(0, ends[tp] - saved.get(kafka_checkpoint(tp.topic, tp.partition), 0))
            for tp in tps
        }

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        until_end: bool = False,
        on_progress: ProgressFn | None = None,
        max_batches: int | None = None,
        idle_timeout_s: float | None = None,
    ) -> Progress:
        """Consume until `stop`, or (`until_end`) until every partition of the topic is
        projected up to the end offset it had when first looked at."""
        from kafka.structs import OffsetAndMetadata

        ends: dict[Any, int] = {}
        batches = 0
        idle_since = time.monotonic()
        while stop is None or not stop.is_set():
            records = self.consumer.poll(
                timeout_ms=self.poll_timeout_ms, max_records=self.max_poll_records
            )
            if records:
                idle_since = time.monotonic()
                offsets: dict[str, int] = {}
                starts: dict[str, int] = {}  # where the batch begins, per partition (fencing)
                commits: dict[Any, Any] = {}
                # The topic is keyed by patient: their saved state is loaded by the keys (one
                # query), and each event is decoded just before it is folded (as the store
                # runner does). A record keyed otherwise only costs `apply` a lookup of its own.
                self.fold.preload(
                    record.key.decode()
                    for batch in records.values()
                    for record in batch
                    if record.key
                )
                for tp, batch in records.items():
                    if not batch:
                        continue
                    name = kafka_checkpoint(tp.topic, tp.partition)
                    for record in batch:
                        self._apply(decode(record.value))
                    starts.setdefault(name, batch[0].offset)
                    offsets[name] = batch[-1].offset + 1
                    commits[tp] = OffsetAndMetadata(offsets[name], "", -1)
                    self.progress.position += len(batch)
                # The previous batch is committed once this returns; this one is written
                # while the next poll is folded (PostgreSQL), or in line (SQLite).
                written, self._unsaid = self._unsaid, commits
                try:
                    self._flush(offsets, starts)
                except StaleBatch as stale:
                    self._fenced(stale)
                    continue
                self._tell_group(written)
                batches += 1
                if on_progress:
                    on_progress(self.progress)
                if max_batches is not None and batches >= max_batches:
                    break
            else:
                try:
                    self._settle()
                except StaleBatch as stale:
                    self._fenced(stale)
                    continue
            if until_end and self._reached(ends):
                break
            if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                break
        self._settle()
        return self.progress

    def _fenced(self, stale: StaleBatch) -> None:
        """Another member projected events of a batch this one had in flight (this one
        stalled past its session and lost the partition). Nothing of the batch was written
        and the fold's memory is dropped (`_wait`); read every assigned partition again from
        the offset saved with the rows."""
        self.fenced += 1
        self._unsaid = {}
        for tp in self.consumer.assignment():
            saved = self.model.checkpoint(kafka_checkpoint(tp.topic, tp.partition))
            if saved:
                self.consumer.seek(tp, saved)
            else:
                self.consumer.seek_to_beginning(tp)
        if self.on_fenced is not None:
            self.on_fenced(stale)

    def _settle(self) -> None:
        """Wait for the batch in flight, then tell the group its offsets."""
        self._wait()
        written, self._unsaid = self._unsaid, {}
        self._tell_group(written)

    def _tell_group(self, commits: dict[Any, Any]) -> None:
        """Commit to the group the offsets of a batch already written. For operators' lag
        tools only (the offsets saved with the rows are the truth); a refusal after a
        rebalance is harmless: the partition's next owner seeks anyway."""
        if commits:
            with contextlib.suppress(Exception):
                self.consumer.commit(commits)

    def _reached(self, ends: dict[Any, int]) -> bool:
        """Every partition of the topic is projected up to the end offset it had when first
        looked at, by this member or (offsets are saved with the rows) by another.

        Not only the partitions assigned now: a member of the group that has just left (a
        previous run of this command) can still hold some of them until the group rebalances,
        and stopping when the assigned ones are done would leave the rest unread."""
        if not self._assigned.is_set():
            return False
        if not ends:
            from kafka import TopicPartition

            partitions = self.consumer.partitions_for_topic(self.topic) or set()
            if not partitions:
                return False
            ends.update(
                self.consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
            )
            self.progress.target = sum(ends.values())
        # The broker's answer to ListOffsets can be short of the true end (Tansu answers the
        # first offset of the last batch, plus one); the high watermark that comes with every
        # fetch is right. Each assigned partition's end is raised once to the first high
        # watermark seen, and nothing is reached before one is known for each.
        for tp in self.consumer.assignment():
            if tp not in ends or tp in self._watermarked:
                continue
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                return False
            ends[tp] = max(ends[tp], highwater)
            self._watermarked.add(tp)
            self.progress.target = sum(ends.values())
        saved = self.model.checkpoints_like(f"kafka:{self.topic}:")
        return all(
            saved.get(kafka_checkpoint(tp.topic, tp.partition), 0) >= end
            for tp, end in ends.items()
        )
