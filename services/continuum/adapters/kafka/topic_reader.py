"""Reads a whole topic once, from the beginning of every partition to the end offset it had
when the reader was opened (for `continuum verify`). No consumer group: nothing is committed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from continuum.adapters.kafka import clients
from continuum.adapters.kafka.errors import BrokerUnavailable, TopicProblem
from continuum.application.verify import TopicMessage
from continuum.settings import Settings


class KafkaTopicReader:
    """Construct it (that fixes each partition's end offset), then iterate `messages()` once.

    The end offset of a partition is the larger of what ListOffsets says and the high-water
    mark of the first fetch: some Kafka-compatible brokers (Tansu 0.6) answer ListOffsets
    wrongly, and every broker reports the high-water mark with each fetch."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        *,
        stall_timeout: float = 30.0,
        max_records: int = 5000,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.stall_timeout = stall_timeout
        self.max_records = max_records
        self.consumer: KafkaConsumer = clients.consumer(settings, group=None)
        self._buffered: list[TopicMessage] = []
        try:
            partitions = self._partitions()
            self.partitions = [TopicPartition(topic, p) for p in sorted(partitions)]
            listed = self.consumer.end_offsets(self.partitions)
            self.consumer.assign(self.partitions)
            self.consumer.seek_to_beginning(*self.partitions)
            highwater = self._first_fetch()
            self.end_offsets: dict[TopicPartition, int] = {
                tp: max(int(listed.get(tp) or 0), highwater[tp]) for tp in self.partitions
            }
        except KafkaError as exc:
            self.close()
            raise clients.explain(exc, settings, topic=topic) from exc
        except BaseException:
            self.close()
            raise

    def _first_fetch(self) -> dict[TopicPartition, int]:
        """Poll until every partition answered one fetch; keep what it returned."""
        last_progress = time.monotonic()
        while True:
            marks = {tp: self.consumer.highwater(tp) for tp in self.partitions}
            if all(mark is not None for mark in marks.values()):
                return {tp: int(mark or 0) for tp, mark in marks.items()}
            batch = self.consumer.poll(timeout_ms=200, max_records=self.max_records)
            for records in batch.values():
                self._buffered.extend(_message(record) for record in records)
            if batch:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.stall_timeout:
                raise BrokerUnavailable(
                    f"{self.settings.kafka_bootstrap_servers} answered no fetch for "
                    f"{self.topic} within {self.stall_timeout:.0f} s",
                    topic=self.topic,
                )

    def _partitions(self) -> set[int]:
        partitions = self.consumer.partitions_for_topic(self.topic)
        # An unknown topic and metadata not fetched yet look alike: ask again briefly.
        deadline = time.monotonic() + 2.0
        while partitions is None and time.monotonic() < deadline:
            time.sleep(0.1)
            partitions = self.consumer.partitions_for_topic(self.topic)
        if not partitions:
            raise TopicProblem(
                f"topic {self.topic} does not exist on {self.settings.kafka_bootstrap_servers}: "
                "name the events topic with --topic (or skip the check with --no-topic)",
                topic=self.topic,
            )
        return set(partitions)

    @property
    def total(self) -> int:
        """Messages up to the end offsets (for progress; the log start may be later)."""
        return sum(self.end_offsets.values())

    def messages(self) -> Iterator[TopicMessage]:
        """Every message below the end offsets, partition by partition in offset order."""
        ends = {(tp.partition): end for tp, end in self.end_offsets.items()}
        yield from (m for m in self._buffered if m.offset < ends[m.partition])
        self._buffered = []
        remaining = {tp: end for tp, end in self.end_offsets.items() if end > 0}
        try:
            last_progress = time.monotonic()
            while remaining:
                for tp in list(remaining):
                    if self.consumer.position(tp) >= remaining[tp]:
                        del remaining[tp]
                if not remaining:
                    return
                batch = self.consumer.poll(timeout_ms=500, max_records=self.max_records)
                for tp, records in batch.items():
                    end = self.end_offsets[tp]
                    yield from (_message(r) for r in records if r.offset < end)
                if batch:
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > self.stall_timeout:
                    raise BrokerUnavailable(
                        f"reading {self.topic} from {self.settings.kafka_bootstrap_servers} "
                        f"stalled for {self.stall_timeout:.0f} s with "
                        f"{len(remaining)} partition(s) not read to their end",
                        topic=self.topic,
                    )
        except KafkaError as exc:
            raise clients.explain(exc, self.settings, topic=self.topic) from exc

    def close(self) -> None:
        self.consumer.close()


def _message(record: Any) -> TopicMessage:
    headers = dict(record.headers or [])
    event_id = headers.get("event_id")
    return TopicMessage(
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        event_id=event_id.decode("utf-8", "replace") if event_id else None,
    )
