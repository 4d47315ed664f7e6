"""Kafka-related errors, importable without importing kafka-python."""

from __future__ import annotations

from continuum.domain.errors import ContinuumError


class BrokerUnavailable(ContinuumError):
    """The broker cannot be reached or failed; the message says what to check."""

    rule = "kafka.unreachable"


class TopicProblem(ContinuumError):
    """A topic is missing or this client may not use it."""

    rule = "kafka.topic"
