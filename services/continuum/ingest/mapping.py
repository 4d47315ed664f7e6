"""The ADT mapping: hospital location/service codes -> level and site; NUBC discharge
dispositions -> TEDS reason and FHIR disposition; the facility's timezone.

A TOML document validated on load (see `adt-mapping.toml`, the bundled synthetic example, and
docs/ingest.md). It is configuration, never code: each hospital has its own codes.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
import zoneinfo
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from continuum.domain.errors import UnknownLevel
from continuum.domain.policy import Policy
from continuum.ingest.adt import Location
from continuum.ingest.errors import AdtMappingError, MappingInvalid
from continuum_events.codes import Code, DischargeReason, Disposition, LevelCode

DEFAULT_MAPPING = Path(__file__).with_name("adt-mapping.toml")
_NUBC = re.compile(r"^\d{2}$")


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Target(_Doc):
    """Where a location places a patient."""

    level: LevelCode
    site: Code
    program: Code | None = None


class LocationRule(Target):
    point_of_care: str = Field(min_length=1)
    #: When set, the rule applies only to this facility (PV1-3.4); a rule without a facility
    #: applies to any facility that has no rule of its own for this point of care.
    facility: str | None = None


class ServiceRule(Target):
    """Fallback on the hospital service (PV1-10) when the location has no rule."""

    service: str = Field(min_length=1)


class DischargeRule(_Doc):
    reason: DischargeReason
    disposition: Disposition
    meaning: str = ""

    @model_validator(mode="after")
    def _death_goes_with_exp(self) -> Self:
        if (self.reason == DischargeReason.DEATH) != (self.disposition == Disposition.EXPIRED):
            raise ValueError("reason death goes with disposition exp, and only it")
        return self


class AdtMapping(_Doc):
    #: IANA timezone of the facility: HL7 times without an offset are local times there.
    timezone: str
    #: Instrument code recorded with assessments from the feed.
    instrument: Code = "asam-ca"
    #: Assessor id when OBX-16 (responsible observer) is empty.
    default_assessor: Code = "adt-feed"
    #: Patients younger than this at admission are adolescents (hours-per-week bands differ).
    adolescent_below_age: int = Field(default=18, ge=1, le=30)
    locations: list[LocationRule] = Field(min_length=1)
    services: list[ServiceRule] = Field(default_factory=list)
    #: NUBC patient discharge status (PV1-36, two digits) -> TEDS reason and FHIR disposition.
    discharge: dict[str, DischargeRule] = Field(default_factory=dict)
    #: For an empty PV1-36 or a code not listed above.
    default_discharge: DischargeRule = DischargeRule(
        reason=DischargeReason.OTHER, disposition=Disposition.OTHER, meaning="other or unknown"
    )

    _tz: dt.tzinfo = PrivateAttr()
    _by_location: dict[tuple[str, str | None], LocationRule] = PrivateAttr()
    _by_service: dict[str, ServiceRule] = PrivateAttr()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        try:
            self._tz = zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone {self.timezone!r} is not an IANA timezone (e.g. America/Chicago)"
            ) from None
        self._by_location = {}
        for rule in self.locations:
            key = (rule.point_of_care, rule.facility)
            if key in self._by_location:
                where = f" at facility {rule.facility}" if rule.facility else ""
                raise ValueError(f"location {rule.point_of_care}{where} is mapped twice")
            self._by_location[key] = rule
        self._by_service = {}
        for srv in self.services:
            if srv.service in self._by_service:
                raise ValueError(f"service {srv.service} is mapped twice")
            self._by_service[srv.service] = srv
        bad = [code for code in self.discharge if not _NUBC.match(code)]
        if bad:
            raise ValueError(
                f'discharge codes must be two-digit NUBC codes (e.g. "07"): {", ".join(bad)}'
            )
        return self

    @property
    def tz(self) -> dt.tzinfo:
        return self._tz

    def target_for(
        self, location: Location | None, service: str | None, *, field: str = "PV1-3"
    ) -> Target:
        """The level and site for a location (facility-specific rule first), else for the
        hospital service; `AdtMappingError` when neither is mapped."""
        if location is not None:
            rule = self._by_location.get((location.point_of_care, location.facility))
            rule = rule or self._by_location.get((location.point_of_care, None))
            if rule is not None:
                return rule
        if service:
            by_service = self._by_service.get(service)
            if by_service is not None:
                return by_service
        if location is None and not service:
            raise AdtMappingError(
                f"{field}: missing assigned location (and no hospital service in PV1-10)",
                rule="adt.location_missing",
                field=field,
            )
        what = f"location {location.describe()}" if location else "no location"
        raise AdtMappingError(
            f"{field}: {what}"
            + (f" and hospital service {service}" if service else "")
            + " is not in the ADT mapping; add it to the mapping file or correct the message",
            rule="adt.location_unmapped",
            field=field,
            location=location.point_of_care if location else None,
            facility=location.facility if location else None,
            service=service,
        )

    def discharge_for(self, code: str | None) -> DischargeRule:
        """NUBC code -> rule; "7" is read as "07"; unknown or empty -> the default."""
        if not code:
            return self.default_discharge
        normal = code.strip().zfill(2)
        return self.discharge.get(normal, self.default_discharge)

    def check_levels(self, policy: Policy) -> None:
        """Every mapped level must exist in the policy new episodes use."""
        problems: list[str] = []
        rules = [(r.point_of_care, r.level) for r in self.locations]
        rules += [(f"service {r.service}", r.level) for r in self.services]
        for name, level in rules:
            try:
                policy.level(level)
            except UnknownLevel:
                problems.append(f"{name} -> {level}")
        if problems:
            raise MappingInvalid(
                f"ADT mapping names levels that policy {policy.label} does not have: "
                + "; ".join(problems)
                + f". Known levels: {', '.join(policy.levels_by_code)}",
                policy=policy.label,
            )


def load_mapping(path: Path | None = None) -> AdtMapping:
    """Load and validate a mapping file (the bundled synthetic example when `path` is None)."""
    source = path or DEFAULT_MAPPING
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingInvalid(
            f"cannot read the ADT mapping {source}: {exc.strerror or exc}; check "
            "--mapping or CONTINUUM_ADT_MAPPING",
            source=str(source),
        ) from None
    return parse_mapping(text, source=str(source))


def parse_mapping(text: str, *, source: str) -> AdtMapping:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingInvalid(
            f"ADT mapping {source} is not valid TOML: {exc}", source=source
        ) from None
    try:
        return AdtMapping.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise MappingInvalid(
            f"ADT mapping {source} is invalid: {problems}", source=source
        ) from None
