"""GET /metrics: Prometheus text exposition for operators.

Counters (counted where commands are handled, through the service's `CommandObserver` port):

- `continuum_commands_total{command, replayed}`: commands accepted, by command type
  ("Admit", "Transition", ...); `replayed="true"` when an Idempotency-Key matched an earlier
  command and nothing new was written.
- `continuum_command_refusals_total{command, rule}`: commands refused, by the refusing rule
  (`reassessment.stale`, `access.site`, `concurrency.conflict`, ...).

Gauges, computed at scrape time from the database (so every API process reports the same):

- `continuum_log_head_position`: the last position in the log.
- `continuum_relay_lag_events{relay}`: events committed but not yet published, per relay
  checkpoint (`relay:<topic>`); absent until a relay has run.
- `continuum_projection_lag_events{checkpoint="store"}`: events not yet in the read model of
  a store-fed projection.
- `continuum_projection_offset{checkpoint="kafka:<topic>:<partition>"}`: the next offset saved
  with the read model by Kafka projection workers (their lag in messages is the consumer
  group's lag, which every Kafka tool shows, or `continuum project --source kafka --status`).
- `continuum_projection_checkpoint_age_seconds{checkpoint}`: time since a checkpoint moved.
- `continuum_ingest_dlq_messages{topic}`: messages in the ADT feed's dead-letter topic, when
  CONTINUUM_METRICS_KAFKA=true (the API then asks the broker, at most every 15 s).
- `continuum_metrics_source_up{source}`: 1 if that source answered this scrape, else 0.

Several API processes (`continuum serve --workers N`): `serve` sets PROMETHEUS_MULTIPROC_DIR
before the workers start, each process writes its counters there, and any process answering a
scrape sums them all (prometheus_client's multiprocess mode).

No authentication: Prometheus scrapes without a token, and nothing here names a patient or a
site (labels are command types, rule codes, checkpoint and topic names). Expose the API port
to the scraper only on an internal network, or block /metrics at the edge proxy.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select

from continuum.entrypoints.http.context import ApiContext

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The broker is asked for the dead-letter depth at most this often.
KAFKA_CACHE_S = 15.0

COMMANDS = Counter(
    "continuum_commands_total",
    "Commands accepted by the service, by command type.",
    ["command", "replayed"],
)
REFUSALS = Counter(
    "continuum_command_refusals_total",
    "Commands refused by the service, by command type and refusing rule.",
    ["command", "rule"],
)


class PrometheusObserver:
    """The service's `CommandObserver`, counting into the counters above."""

    def handled(self, command: str, *, replayed: bool) -> None:
        COMMANDS.labels(command=command, replayed="true" if replayed else "false").inc()

    def refused(self, command: str, rule: str) -> None:
        REFUSALS.labels(command=command, rule=rule).inc()


class StateCollector(Collector):
    """Lags and depths, read from the store, the read model and (optionally) Kafka."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self._dlq: tuple[float, int | None] = (0.0, None)
        self._dlq_lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "continuum_metrics_source_up",
            "1 if the source answered this scrape.",
            labels=["source"],
        )
        try:
            yield from self._database()
            up.add_metric(["database"], 1)
        except Exception:
            up.add_metric(["database"], 0)
        if self.ctx.app.settings.metrics_kafka:
            topic = self.ctx.app.settings.adt_topic + ".dlq"
            depth = self._dlq_depth(topic)
            up.add_metric(["kafka"], 0 if depth is None else 1)
            if depth is not None:
                dlq = GaugeMetricFamily(
                    "continuum_ingest_dlq_messages",
                    "Messages in the ADT feed's dead-letter topic.",
                    labels=["topic"],
                )
                dlq.add_metric([topic], depth)
                yield dlq
        yield up

    def _database(self) -> Iterator[Metric]:
        from continuum.adapters.sql import tables
        from continuum_projections import readmodel as rm

        store = self.ctx.app.store
        head = store.head_position()
        yield GaugeMetricFamily(
            "continuum_log_head_position", "The last position in the event log.", value=head
        )
        relay = GaugeMetricFamily(
            "continuum_relay_lag_events",
            "Events committed to the log and not yet published, per relay checkpoint.",
            labels=["relay"],
        )
        t = tables.checkpoints
        with self.ctx.app.engine.connect() as conn:
            rows = conn.execute(
                select(t.c.name, t.c.position).where(t.c.name.startswith("relay:"))
            ).all()
        for name, position in rows:
            relay.add_metric([name], max(0, head - int(position)))
        yield relay

        lag = GaugeMetricFamily(
            "continuum_projection_lag_events",
            "Events in the log not yet in the read model (store-fed projection).",
            labels=["checkpoint"],
        )
        offset = GaugeMetricFamily(
            "continuum_projection_offset",
            "Next offset saved with the read model, per Kafka partition.",
            labels=["checkpoint"],
        )
        age = GaugeMetricFamily(
            "continuum_projection_checkpoint_age_seconds",
            "Seconds since the read-model checkpoint last moved.",
            labels=["checkpoint"],
        )
        c = rm.checkpoints
        with self.ctx.read_engine.connect() as conn:
            saved = conn.execute(select(c.c.name, c.c.position, c.c.updated_at)).all()
        now = dt.datetime.now(dt.UTC)
        for name, position, updated_at in saved:
            if name == "store":
                lag.add_metric([name], max(0, head - int(position)))
            elif name.startswith("kafka:"):
                offset.add_metric([name], int(position))
            moved = rm.utc(updated_at)
            if moved is not None:
                age.add_metric([name], max(0.0, (now - moved).total_seconds()))
        yield lag
        yield offset
        yield age

    def _dlq_depth(self, topic: str) -> int | None:
        with self._dlq_lock:
            at, depth = self._dlq
            if time.monotonic() - at < KAFKA_CACHE_S and depth is not None:
                return depth
            try:
                depth = _topic_depth(self.ctx, topic)
            except Exception:
                depth = None
            self._dlq = (time.monotonic(), depth)
            return depth


def _topic_depth(ctx: ApiContext, topic: str) -> int:
    """Messages retained in `topic`: end minus beginning offsets, summed over partitions."""
    from kafka import TopicPartition

    from continuum.adapters.kafka import clients

    settings = ctx.app.settings
    consumer = clients.consumer(settings, group=None, bootstrap_timeout_ms=3_000)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return 0
        ends: dict[Any, int] = consumer.end_offsets(tps)
        starts: dict[Any, int] = consumer.beginning_offsets(tps)
        return sum(max(0, ends[tp] - starts[tp]) for tp in tps)
    finally:
        consumer.close()


def install(app: FastAPI, ctx: ApiContext) -> None:
    """Count the service's commands and serve GET /metrics (not in the OpenAPI document)."""
    ctx.app.service.observer = PrometheusObserver()
    state = StateCollector(ctx)

    def metrics(request: Request) -> Response:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(state)
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
            body = generate_latest(registry)
        else:
            body = generate_latest(REGISTRY) + generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
