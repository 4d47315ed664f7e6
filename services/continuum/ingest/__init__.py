"""Inbound hospital ADT feed: parse HL7 v2 or the JSON form, map it to commands.

Pure translation: nothing here talks to Kafka. `processor.AdtIngestor` runs the commands
through the `PatientService`; `continuum.adapters.kafka.ingest` is the consumer loop around it.
"""

from continuum.ingest.adt import SUPPORTED_TRIGGERS, AdtMessage, Location
from continuum.ingest.errors import AdtError, AdtMappingError, AdtParseError, MappingInvalid
from continuum.ingest.mapping import AdtMapping, load_mapping

__all__ = [
    "SUPPORTED_TRIGGERS",
    "AdtError",
    "AdtMapping",
    "AdtMappingError",
    "AdtMessage",
    "AdtParseError",
    "Location",
    "MappingInvalid",
    "load_mapping",
]
