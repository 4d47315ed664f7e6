"""Publishes events to a Kafka topic: keyed by patient, the canonical JSON envelope as value
(`continuum_events.wire`), and headers with the event id, type, schema and security labels."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from continuum.adapters.kafka import clients
from continuum.application.ports import WireEvent
from continuum.application.relay import InFlight, Publisher, PublishInterrupted
from continuum.settings import Settings

log = logging.getLogger("continuum.relay")

CONTENT_TYPE = b"application/json"
#: 42 CFR Part 2 and the confidentiality code travel with every message (DOMAIN.md section 5).
SECURITY_HEADERS: list[tuple[str, bytes]] = [
    ("security-label", b"42CFRPart2"),
    ("confidentiality", b"R"),
]


def headers_for(event: WireEvent) -> list[tuple[str, bytes]]:
    return [
        ("event_id", event.event_id.encode()),
        ("event_type", event.event_type.encode()),
        ("schema_version", str(event.schema_version).encode()),
        ("content-type", CONTENT_TYPE),
        ("schema", f"{event.event_type}.v{event.schema_version}.schema.json".encode()),
        *SECURITY_HEADERS,
    ]


def report_wait(
    logger: logging.Logger,
    settings: Settings,
    since: float | None,
    what: str,
    stop: threading.Event,
) -> float:
    """While a producer waits on the broker: raise `PublishInterrupted` once `stop` is set,
    else log how long it has waited; return when the wait began."""
    if stop.is_set():
        raise PublishInterrupted(f"stopped while waiting for {what}")
    now = time.monotonic()
    since = since if since is not None else now
    logger.warning(
        "waiting %.0f s for Kafka %s at %s (broker unreachable?); the producer keeps "
        "retrying, nothing is lost",
        now - since,
        what,
        settings.kafka_bootstrap_servers,
    )
    return since


class KafkaPublisher(Publisher):
    def __init__(
        self,
        settings: Settings,
        topic: str,
        *,
        producer: KafkaProducer | None = None,
        wait_report: float = 5.0,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.producer = producer or clients.producer(settings)
        self.wait_report = wait_report

    def start(self, events: Sequence[WireEvent], stop: threading.Event) -> InFlight:
        futures = [self._send(event, stop) for event in events]
        return InFlight(last_position=events[-1].position, count=len(events), handle=futures)

    def finish(self, batch: InFlight, stop: threading.Event) -> None:
        futures: list[Any] = batch.handle  # type: ignore[assignment]
        waited_since: float | None = None
        for future in futures:
            while True:
                try:
                    future.get(timeout=self.wait_report)
                    break
                except KafkaTimeoutError:
                    waited_since = self._report_wait(waited_since, "acknowledgements", stop)
                except KafkaError as exc:
                    raise clients.explain(exc, self.settings, topic=self.topic) from exc
        if waited_since is not None:
            log.warning(
                "broker back: %d messages acknowledged after %.0f s",
                batch.count,
                time.monotonic() - waited_since,
            )

    def flush(self, stop: threading.Event) -> None:
        waited_since: float | None = None
        while True:
            try:
                self.producer.flush(timeout=self.wait_report)
                return
            except KafkaTimeoutError:
                waited_since = self._report_wait(waited_since, "acknowledgements", stop)

    def _send(self, event: WireEvent, stop: threading.Event) -> Any:
        waited_since: float | None = None
        while True:
            try:
                return self.producer.send(
                    self.topic,
                    key=event.stream_id.encode(),
                    value=event.value,
                    headers=headers_for(event),
                )
            except KafkaTimeoutError:  # no metadata or a full buffer: the broker is away
                waited_since = self._report_wait(waited_since, "send", stop)

    def _report_wait(self, since: float | None, what: str, stop: threading.Event) -> float:
        return report_wait(log, self.settings, since, what, stop)

    def close(self) -> None:
        self.producer.close(timeout=5)
