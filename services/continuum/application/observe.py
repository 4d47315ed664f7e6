"""A port for watching commands at the service boundary (metrics, tracing), without the
domain or the service knowing what watches.

`PatientService.handle` tells its observer about every command it accepts (appended, or an
idempotent replay) and every one it refuses, with the refusing rule (`ContinuumError.rule`).
The default observer does nothing; the HTTP API installs one that counts for Prometheus
(entrypoints/http/metrics.py).
"""

from __future__ import annotations

from typing import Protocol


class CommandObserver(Protocol):
    def handled(self, command: str, *, replayed: bool) -> None:
        """`command` (its type name, e.g. "Transition") was accepted; `replayed` when an
        idempotency key matched an earlier one and nothing new was written."""

    def refused(self, command: str, rule: str) -> None:
        """`command` was refused by `rule` and wrote nothing."""


class NoObserver:
    """Watches nothing."""

    def handled(self, command: str, *, replayed: bool) -> None:
        return None

    def refused(self, command: str, rule: str) -> None:
        return None
