"""Why a hospital message cannot be used. Every message names the HL7 segment-field (or the
JSON path) at fault and never echoes identifying values (names, MRNs, birth dates, times)."""

from __future__ import annotations

from continuum.domain.errors import CommandRefused, InvalidInput, PolicyInvalid


class AdtError(InvalidInput):
    """A message this service cannot turn into commands (sent to the dead-letter topic)."""

    rule = "adt.invalid"


class AdtParseError(AdtError):
    """The message is not well-formed HL7 v2 / JSON, or a field does not parse."""

    rule = "adt.malformed"


class AdtMappingError(AdtError):
    """The message parses but the mapping has no answer for it (e.g. an unknown location)."""

    rule = "adt.unmapped"


class AdtNotApplicable(CommandRefused):
    """The message does not fit the patient's record (e.g. cancel of a change not made)."""

    rule = "adt.not_applicable"


class MappingInvalid(PolicyInvalid):
    """The mapping file is missing, not TOML, or fails validation: a configuration error."""

    rule = "adt.mapping_invalid"
