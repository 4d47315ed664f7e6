"""The ADT ingest consumer: hospital feed topic -> commands, bad messages -> `<topic>.dlq`.

For each record, in partition order: parse, translate and run the commands
(`AdtIngestor.process`). A message that cannot be used (parse, mapping or domain rule) is
produced unchanged to the dead-letter topic, with the same key, its original headers and
`dlq-*` headers saying why; consumption goes on. Offsets are committed (synchronously, after
each poll batch and on stop) only for records whose commands have committed or whose DLQ copy
the broker has acknowledged. Anything else (database down, a bug) stops the loop with nothing
committed past the last finished record: after a restart the message is read again, and the
idempotency keys make that re-read change nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from continuum.adapters.kafka import clients
from continuum.domain.errors import ConcurrencyConflict, ContinuumError, StoreNotReady
from continuum.ingest.processor import AdtIngestor, Outcome
from continuum.settings import Settings

log = logging.getLogger("continuum.ingest")

DLQ_SUFFIX = ".dlq"
#: Longest `dlq-error` header value, in characters.
DLQ_ERROR_MAX = 500
#: How long to wait for the broker to acknowledge one DLQ message before giving up (the
#: producer keeps retrying meanwhile; giving up stops the loop without committing).
DLQ_ACK_TIMEOUT_S = 60.0


def dlq_topic_for(topic: str) -> str:
    return topic + DLQ_SUFFIX


def dlq_headers(
    original: list[tuple[str, bytes]] | None,
    error: ContinuumError,
    *,
    topic: str,
    partition: int,
    offset: int,
) -> list[tuple[str, bytes]]:
    """The original headers (minus stale dlq-*), then why and where from."""
    message = error.message
    if len(message) > DLQ_ERROR_MAX:
        message = message[: DLQ_ERROR_MAX - 3] + "..."
    kept = [(k, v) for k, v in (original or []) if not k.startswith("dlq-")]
    return [
        *kept,
        ("dlq-reason", error.rule.encode()),
        ("dlq-error", message.encode("utf-8")),
        ("dlq-field", (error.field or "").encode()),
        ("dlq-source-topic", topic.encode()),
        ("dlq-source-partition", str(partition).encode()),
        ("dlq-source-offset", str(offset).encode()),
    ]


def is_message_error(exc: ContinuumError) -> bool:
    """Errors that are about the message (dead-letter it) rather than about the service."""
    return not isinstance(exc, ConcurrencyConflict | StoreNotReady)


@dataclass
class IngestStats:
    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    unchanged: int = 0
    dead_lettered: int = 0
    events: int = 0
    commits: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"consumed {self.consumed}: applied {self.applied} ({self.events} events), "
            f"duplicates {self.duplicates}, unchanged {self.unchanged}, "
            f"dead-lettered {self.dead_lettered}"
        )


class KafkaIngest:
    """The consumer loop. Owns its consumer and DLQ producer unless they are passed in."""

    def __init__(
        self,
        settings: Settings,
        ingestor: AdtIngestor,
        *,
        topic: str | None = None,
        group: str | None = None,
        dlq_topic: str | None = None,
        consumer: KafkaConsumer | None = None,
        producer: KafkaProducer | None = None,
        poll_timeout_ms: int = 500,
        max_poll_records: int = 500,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.topic = topic or settings.adt_topic
        self.group = group or settings.ingest_group
        self.dlq_topic = dlq_topic or dlq_topic_for(self.topic)
        self.poll_timeout_ms = poll_timeout_ms
        self.max_poll_records = max_poll_records
        self.stats = IngestStats()
        self._own: list[Any] = []
        if consumer is None:
            consumer = clients.consumer(
                settings, self.topic, group=self.group, max_poll_records=max_poll_records
            )
            self._own.append(consumer)
        self.consumer = consumer
        if producer is None:
            try:
                producer = clients.producer(settings, linger_ms=0)
            except BaseException:
                self.close()
                raise
            self._own.append(producer)
        self.producer = producer

    # -- the loop ----------------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event,
        max_messages: int | None = None,
        *,
        until_idle: bool = False,
        on_progress: Callable[[IngestStats], None] | None = None,
        progress_every_s: float = 10.0,
    ) -> IngestStats:
        """Consume until `stop` is set, `max_messages` records were handled, or (with
        `until_idle`) every assigned partition is read to its end."""
        last_report = time.monotonic()
        while not stop.is_set():
            if max_messages is not None and self.stats.consumed >= max_messages:
                break
            limit = self.max_poll_records
            if max_messages is not None:
                limit = min(limit, max_messages - self.stats.consumed)
            try:
                batch = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=limit)
            except KafkaError as exc:
                raise clients.explain(exc, self.settings, topic=self.topic) from exc
            if not batch:
                if until_idle and self._caught_up():
                    break
                continue
            done: dict[TopicPartition, OffsetAndMetadata] = {}
            try:
                for tp, records in batch.items():
                    for record in records:
                        self._handle(record)
                        done[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
            finally:
                # Commands committed / DLQ acknowledged for everything in `done`.
                self._commit(done)
            if on_progress is not None and time.monotonic() - last_report >= progress_every_s:
                last_report = time.monotonic()
                on_progress(self.stats)
        return self.stats

    def _handle(self, record: Any) -> None:
        self.stats.consumed += 1
        try:
            outcome = self.ingestor.process(record.value)
        except ContinuumError as exc:
            if not is_message_error(exc):
                raise
            self._dead_letter(record, exc)
            return
        self._count(outcome, record)

    def _count(self, outcome: Outcome, record: Any) -> None:
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        msg = outcome.message.describe()
        if outcome.status == "duplicate":
            self.stats.duplicates += 1
            log.info("%s %s: duplicate, already applied", where, msg)
            return
        if outcome.status == "no_change":
            self.stats.unchanged += 1
        else:
            self.stats.applied += 1
        self.stats.events += outcome.events
        log.debug(
            "%s %s -> %s: %s (%d events)",
            where,
            msg,
            outcome.patient_key or "-",
            outcome.summary,
            outcome.events,
        )

    def _dead_letter(self, record: Any, error: ContinuumError) -> None:
        headers = dlq_headers(
            record.headers,
            error,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        try:
            future = self.producer.send(
                self.dlq_topic, key=record.key, value=record.value, headers=headers
            )
            future.get(timeout=DLQ_ACK_TIMEOUT_S)
        except KafkaError as exc:
            raise clients.explain(exc, self.settings, topic=self.dlq_topic) from exc
        self.stats.dead_lettered += 1
        self.stats.by_reason[error.rule] = self.stats.by_reason.get(error.rule, 0) + 1
        # The error message names fields and codes, never identifying values.
        log.warning(
            "%s[%d]@%d -> %s: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            self.dlq_topic,
            error.rule,
            error.message,
        )

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
        except CommitFailedError as exc:
            # The group rebalanced: another member owns these partitions now and will read
            # the uncommitted records again; the idempotency keys make that harmless.
            log.warning(
                "offset commit refused after a rebalance (%s); records will be re-read", exc
            )
            return
        except KafkaError as exc:
            raise clients.explain(exc, self.settings, topic=self.topic) from exc
        self.stats.commits += 1

    def _caught_up(self) -> bool:
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        for tp in assigned:
            highwater = self.consumer.highwater(tp)
            if highwater is None or self.consumer.position(tp) < highwater:
                return False
        return True

    def close(self) -> None:
        for client in reversed(self._own):
            if isinstance(client, KafkaProducer):
                client.close(timeout=5)
            else:
                client.close()
        self._own.clear()
