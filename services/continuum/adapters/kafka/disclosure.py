"""One organization's disclosure topic on Kafka (application/disclosure.py decides what goes).

Messages are keyed by patient key, the value is the event's canonical wire bytes (the same as
on the events topic), and the headers are the events topic's (event id, type, schema, security
labels) plus the Part 2 notice and the consent the event is disclosed under.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError

from continuum.adapters.kafka import clients
from continuum.adapters.kafka.errors import BrokerUnavailable, TopicProblem
from continuum.adapters.kafka.publisher import headers_for, report_wait
from continuum.application.disclosure import (
    PART2_NOTICE,
    Delivery,
    DisclosureChannel,
    FoundMessage,
    Outgoing,
)
from continuum.settings import Settings

log = logging.getLogger("continuum.disclosure")


def disclosure_headers(outgoing: Outgoing, org: str) -> list[tuple[str, bytes]]:
    """The events topic's headers, then the notice and the consent's id, purposes and org."""
    return [
        *headers_for(outgoing.event),
        ("part2-notice", PART2_NOTICE.encode()),
        ("consent-id", outgoing.consent.consent_id.encode()),
        ("consent-purposes", ",".join(outgoing.consent.purposes).encode()),
        ("recipient-org", org.encode()),
    ]


class KafkaDisclosureChannel(DisclosureChannel):
    def __init__(
        self,
        settings: Settings,
        topic: str,
        org: str,
        *,
        producer: KafkaProducer | None = None,
        wait_report: float = 5.0,
        read_stall_timeout: float = 30.0,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.org = org
        self.wait_report = wait_report
        self.read_stall_timeout = read_stall_timeout
        self.producer = producer or clients.producer(settings)

    # -- sending ----------------------------------------------------------------------------

    def send(self, batch: Sequence[Outgoing], stop: threading.Event) -> list[Delivery]:
        futures = [self._send(outgoing, stop) for outgoing in batch]
        self._flush(stop)
        deliveries = []
        waited_since: float | None = None
        for future in futures:
            while True:
                try:
                    metadata = future.get(timeout=self.wait_report)
                    break
                except KafkaTimeoutError:
                    waited_since = self._report_wait(waited_since, "acknowledgements", stop)
                except KafkaError as exc:
                    raise clients.explain(exc, self.settings, topic=self.topic) from exc
            deliveries.append(Delivery(partition=metadata.partition, offset=metadata.offset))
        return deliveries

    def _send(self, outgoing: Outgoing, stop: threading.Event) -> Any:
        waited_since: float | None = None
        while True:
            try:
                return self.producer.send(
                    self.topic,
                    key=outgoing.event.stream_id.encode(),
                    value=outgoing.event.value,
                    headers=disclosure_headers(outgoing, self.org),
                )
            except KafkaTimeoutError:  # no metadata or a full buffer: the broker is away
                waited_since = self._report_wait(waited_since, "send", stop)

    def _flush(self, stop: threading.Event) -> None:
        waited_since: float | None = None
        while True:
            try:
                self.producer.flush(timeout=self.wait_report)
                return
            except KafkaTimeoutError:
                waited_since = self._report_wait(waited_since, "acknowledgements", stop)

    def _report_wait(self, since: float | None, what: str, stop: threading.Event) -> float:
        return report_wait(log, self.settings, since, what, stop)

    # -- reading back -----------------------------------------------------------------------

    def read_after(self, offsets: dict[int, int]) -> list[FoundMessage]:
        """Read each partition from just after its known offset to its high-water mark (the
        mark every fetch reports; some brokers answer ListOffsets wrongly)."""
        consumer = clients.consumer(self.settings, group=None)
        try:
            return self._read(consumer, offsets)
        except KafkaError as exc:
            raise clients.explain(exc, self.settings, topic=self.topic) from exc
        finally:
            consumer.close()

    def _read(self, consumer: Any, offsets: dict[int, int]) -> list[FoundMessage]:
        partitions = consumer.partitions_for_topic(self.topic)
        deadline = time.monotonic() + 2.0
        while partitions is None and time.monotonic() < deadline:
            time.sleep(0.1)  # an unknown topic and metadata not fetched yet look alike
            partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            raise TopicProblem(
                f"topic {self.topic} does not exist on {self.settings.kafka_bootstrap_servers}: "
                "create it (or run with --create-topic)",
                topic=self.topic,
            )
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            if tp.partition in offsets:
                consumer.seek(tp, offsets[tp.partition] + 1)
            else:
                consumer.seek_to_beginning(tp)
        found: list[FoundMessage] = []
        last_progress = time.monotonic()
        while True:
            batch = consumer.poll(timeout_ms=200, max_records=5_000)
            for records in batch.values():
                found.extend(_found(record) for record in records)
            if batch:
                last_progress = time.monotonic()
            marks = [consumer.highwater(tp) for tp in tps]
            if all(
                mark is not None and consumer.position(tp) >= mark
                for tp, mark in zip(tps, marks, strict=True)
            ):
                return sorted(found, key=lambda m: (m.partition, m.offset))
            if time.monotonic() - last_progress > self.read_stall_timeout:
                raise BrokerUnavailable(
                    f"reading {self.topic} back from {self.settings.kafka_bootstrap_servers} "
                    f"stalled for {self.read_stall_timeout:.0f} s",
                    topic=self.topic,
                )

    def close(self) -> None:
        self.producer.close(timeout=5)


def _found(record: Any) -> FoundMessage:
    headers = dict(record.headers or [])
    event_id = headers.get("event_id")
    timestamp = getattr(record, "timestamp", None)
    return FoundMessage(
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        event_id=event_id.decode("utf-8", "replace") if event_id else None,
        timestamp=(
            dt.datetime.fromtimestamp(timestamp / 1000, dt.UTC)
            if isinstance(timestamp, int) and timestamp > 0
            else None
        ),
    )
