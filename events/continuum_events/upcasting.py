"""Upcasting: turning a stored event of an older schema version into the current one.

Stored events are never rewritten. When an event type's data changes shape, bump its
`schema_version`, keep the old JSON Schema in docs/, and register a function here that maps
version N to N+1. Readers call `upcast` on the raw stored dict before validating it, so the
domain only ever sees current versions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RawEvent = dict[str, Any]
Upcaster = Callable[[RawEvent], RawEvent]

#: (event_type, from_version) -> function returning the event at from_version + 1.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def register(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Decorator: register an upcaster from `from_version` to `from_version + 1`."""

    def decorate(fn: Upcaster) -> Upcaster:
        UPCASTERS[(event_type, from_version)] = fn
        return fn

    return decorate


def upcast(raw: RawEvent) -> RawEvent:
    """Apply registered upcasters until no further one applies."""
    current = raw
    while (
        step := UPCASTERS.get((current["event_type"], int(current["schema_version"])))
    ) is not None:
        before = int(current["schema_version"])
        current = step(dict(current))
        if int(current["schema_version"]) != before + 1:
            raise ValueError(
                f"upcaster for {current['event_type']} v{before} must return v{before + 1}"
            )
    return current
