"""The canonical wire form of an event: what Kafka carries and `log export` writes.

The envelope as JSON with keys sorted at every level, compact separators, UTF-8, timestamps in
UTC ending in "Z". Sorting makes the bytes independent of how a database stores JSON (PostgreSQL
JSONB reorders keys), so the store can produce them straight from its rows and an auditor can
compare a topic with the store byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

from continuum_events.envelope import EventEnvelope


def dumps(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def canonical_json(event: EventEnvelope) -> bytes:
    """The wire bytes of a validated event."""
    return dumps(event.model_dump(mode="json"))
