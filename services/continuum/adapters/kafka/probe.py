"""Read-only looks at the Kafka cluster for `continuum doctor` (the BrokerProbe port in
continuum.application.doctor): cluster, topics and partitions, end offsets, a group's committed
offsets. One admin client, made on first use with the doctor's short timeouts.

Tansu (the test suite's broker) answers ListOffsets LATEST with the last batch's first offset
plus one, not the end offset: lag computed from it is too small there, never too large. Apache
Kafka answers correctly."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import OffsetSpec

from continuum.application.doctor import ClusterInfo
from continuum.settings import Settings


class KafkaBrokerProbe:
    def __init__(self, settings: Settings, timeout_s: float) -> None:
        self.settings = settings
        self.timeout_ms = max(500, int(timeout_s * 1000))
        self._admin: KafkaAdminClient | None = None

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka_bootstrap_servers

    @property
    def admin(self) -> KafkaAdminClient:
        if self._admin is None:
            self._admin = KafkaAdminClient(
                bootstrap_servers=[s.strip() for s in self.bootstrap.split(",") if s.strip()],
                client_id=f"{self.settings.kafka_client_id}-doctor",
                request_timeout_ms=self.timeout_ms,
                bootstrap_timeout_ms=self.timeout_ms,
                reconnect_backoff_max_ms=1_000,
            )
        return self._admin

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def cluster(self) -> ClusterInfo:
        answer: dict[str, Any] = self.admin.describe_cluster()
        cluster_id = answer.get("cluster_id")
        return ClusterInfo(
            cluster_id=str(cluster_id) if cluster_id is not None else None,
            brokers=len(answer.get("brokers", [])),
        )

    def partitions(self, topics: Collection[str]) -> dict[str, int]:
        existing = set(self.admin.list_topics())
        wanted = [name for name in topics if name in existing]
        if not wanted:
            return {}
        described = self.admin.describe_topics(wanted)
        return {str(d["name"]): len(d.get("partitions", [])) for d in described if d.get("name")}

    def _topic_partitions(self, topic: str) -> list[TopicPartition]:
        described = self.admin.describe_topics([topic])
        parts = described[0].get("partitions", []) if described else []
        return [TopicPartition(topic, int(p["partition_index"])) for p in parts]

    def end_offsets(self, topic: str) -> dict[int, int]:
        tps = self._topic_partitions(topic)
        if not tps:
            return {}
        answer = self.admin.list_partition_offsets(
            dict.fromkeys(tps, OffsetSpec.LATEST), timeout_ms=self.timeout_ms
        )
        return {tp.partition: int(_offset(info)) for tp, info in answer.items()}

    def committed(self, group: str, topic: str) -> dict[int, int]:
        answer = self.admin.list_group_offsets({group: None})
        offsets = answer.get(group, {})
        return {
            tp.partition: int(meta.offset)
            for tp, meta in offsets.items()
            if tp.topic == topic and meta.offset is not None and meta.offset >= 0
        }


def _offset(info: Any) -> int:
    return int(getattr(info, "offset", info))
