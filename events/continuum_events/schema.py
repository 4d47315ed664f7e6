"""JSON Schema for every event type, written to docs/events/schemas/.

Run `continuum schemas export` (or `python -m continuum_events.schema DIR`) after changing an
event model; a test fails while the committed schemas are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from continuum_events.registry import EVENT_TYPES

SCHEMA_ID_BASE = "https://care-continuum.example/schemas/events"


def schema_documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema document, one per event type and schema version."""
    documents: dict[str, dict[str, Any]] = {}
    for model in EVENT_TYPES:
        name = f"{model.EVENT_TYPE}.v{model.SCHEMA_VERSION}.schema.json"
        schema = model.model_json_schema(mode="serialization")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"{SCHEMA_ID_BASE}/{name}",
            **schema,
        }
        documents[name] = schema
    return documents


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def export(directory: Path) -> list[Path]:
    """Write every schema into `directory`; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in schema_documents().items():
        path = directory / name
        path.write_text(render(document), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - thin wrapper
    for path in export(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/events/schemas")):
        print(path)
