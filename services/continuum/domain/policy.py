"""Versioned policy documents: levels, ranks, hours bands, allowed moves, placement rule.

Clinical thresholds live in data (policies/*.toml), never in code: payers and states differ and
the ASAM edition in force differs by state. Each document is validated on load; every decision
event records the id and version of the document that judged it.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable, Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from continuum.domain.errors import PolicyInvalid, RatingOutOfRange, UnknownLevel, UnknownPolicy
from continuum_events import AgeGroup, PolicyRef


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Band(_Doc):
    """Hours of service per week: min inclusive, max exclusive ("IOP: >= 9 and < 20")."""

    min_hours: float | None = Field(default=None, ge=0)
    below_hours: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        if self.min_hours is None and self.below_hours is None:
            raise ValueError("a band needs min_hours, below_hours or both")
        if (
            self.min_hours is not None
            and self.below_hours is not None
            and self.min_hours >= self.below_hours
        ):
            raise ValueError(
                f"min_hours {self.min_hours:g} must be below below_hours {self.below_hours:g}"
            )
        return self

    def contains(self, hours: float) -> bool:
        if self.min_hours is not None and hours < self.min_hours:
            return False
        return not (self.below_hours is not None and hours >= self.below_hours)

    def describe(self) -> str:
        parts = []
        if self.min_hours is not None:
            parts.append(f">= {self.min_hours:g}")
        if self.below_hours is not None:
            parts.append(f"< {self.below_hours:g}")
        return " and ".join(parts) + " h/week"


class Level(_Doc):
    code: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,23}$")
    name: str
    rank: int = Field(ge=0, description="Intensity rank: higher is more intensive.")
    setting: Literal["24h", "ambulatory", "continuing_care"]
    withdrawal_management: bool = False
    encounter_class: Literal["IMP", "NONAC", "AMB"]
    hours_per_week: dict[AgeGroup, Band] = Field(default_factory=dict)


class Dimension(_Doc):
    code: str
    name: str


class TransitionRule(_Doc):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    sources: list[str] = Field(alias="from", min_length=1)
    dests: list[str] = Field(alias="to", min_length=1)


class PlacementRule(_Doc):
    """If any of `dimensions` is rated at least `min_rating`, the indicated level is `level`."""

    dimensions: list[str] = Field(min_length=1)
    min_rating: str
    level: str


class Policy(_Doc):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]{0,31}$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,31}$")
    title: str
    edition: str
    illustrative: bool
    notice: str
    code_system: str
    reassessment_window_days: int = Field(default=7, ge=1, le=365)
    terminal_state: str = "discharged"
    dimensions: list[Dimension] = Field(min_length=1)
    rating_scale: list[str] = Field(min_length=2)
    levels: list[Level] = Field(min_length=2)
    admission_levels: list[str] = Field(min_length=1)
    transitions: list[TransitionRule] = Field(min_length=1)
    placement: list[PlacementRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        codes = [level.code for level in self.levels]
        if len(set(codes)) != len(codes):
            raise ValueError(f"level codes repeat: {sorted(codes)}")
        known = set(codes)
        if self.terminal_state in known or self.terminal_state == "new":
            raise ValueError(f"terminal_state {self.terminal_state!r} clashes with a level code")
        if "aftercare" not in known:
            raise ValueError("the policy needs an 'aftercare' state")
        dims = {d.code for d in self.dimensions}
        if len(dims) != len(self.dimensions):
            raise ValueError("dimension codes repeat")
        if len(set(self.rating_scale)) != len(self.rating_scale):
            raise ValueError("rating_scale values repeat")
        for code in self.admission_levels:
            if code not in known:
                raise ValueError(f"admission_levels names unknown level {code!r}")
        for i, rule in enumerate(self.transitions):
            for code in [*rule.sources, *rule.dests]:
                if code not in known:
                    raise ValueError(f"transitions[{i}] names unknown level {code!r}")
        for i, placement in enumerate(self.placement):
            if placement.level not in known:
                raise ValueError(f"placement[{i}] indicates unknown level {placement.level!r}")
            if placement.min_rating not in self.rating_scale:
                raise ValueError(
                    f"placement[{i}] min_rating {placement.min_rating!r} not on rating_scale"
                )
            for dim in placement.dimensions:
                if dim not in dims:
                    raise ValueError(f"placement[{i}] names unknown dimension {dim!r}")
        last = self.placement[-1]
        if set(last.dimensions) != dims or last.min_rating != self.rating_scale[0]:
            raise ValueError(
                "the last placement rule must match every assessment "
                "(all dimensions, lowest rating) so that a level is always indicated"
            )
        return self

    # -- lookups ---------------------------------------------------------------------------

    @property
    def ref(self) -> PolicyRef:
        return PolicyRef(id=self.id, version=self.version)

    @property
    def label(self) -> str:
        return f"{self.id}@{self.version}"

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the document's content (two loads of one file share a machine)."""
        digest = hashlib.sha256(self.model_dump_json().encode("utf-8")).hexdigest()[:16]
        return f"{self.id}@{self.version}#{digest}"

    @cached_property
    def levels_by_code(self) -> dict[str, Level]:
        return {level.code: level for level in self.levels}

    @cached_property
    def allowed_moves(self) -> dict[str, frozenset[str]]:
        """Destination level -> the source levels the transition table allows."""
        moves: dict[str, set[str]] = {}
        for rule in self.transitions:
            for dest in rule.dests:
                moves.setdefault(dest, set()).update(rule.sources)
        return {dest: frozenset(sources) for dest, sources in moves.items()}

    def level(self, code: str, *, field: str = "level") -> Level:
        try:
            return self.levels_by_code[code]
        except KeyError:
            raise UnknownLevel(
                f"level {code!r} is not in policy {self.label}; known levels: "
                + ", ".join(self.levels_by_code),
                field=field,
                policy=self.label,
                level=code,
            ) from None

    def validate_ratings(self, ratings: Mapping[str, str], *, field: str = "ratings") -> None:
        dims = [d.code for d in self.dimensions]
        missing = [d for d in dims if d not in ratings]
        extra = [d for d in ratings if d not in dims]
        if missing or extra:
            raise RatingOutOfRange(
                f"ratings must cover exactly the dimensions {', '.join(dims)} of {self.label}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(extra)}" if extra else ""),
                field=field,
                policy=self.label,
                missing=missing,
                unknown=extra,
            )
        for dim in dims:
            if ratings[dim] not in self.rating_scale:
                raise RatingOutOfRange(
                    f"rating for dimension {dim} is {ratings[dim]!r}; policy {self.label} "
                    f"allows {', '.join(self.rating_scale)}",
                    field=f"{field}.{dim}",
                    policy=self.label,
                    dimension=dim,
                    value=ratings[dim],
                    allowed=self.rating_scale,
                )

    def indicated_level(self, ratings: Mapping[str, str]) -> str:
        """The reference placement rule: first rule whose dimensions reach its rating wins."""
        self.validate_ratings(ratings)
        order = {value: i for i, value in enumerate(self.rating_scale)}
        for rule in self.placement:
            threshold = order[rule.min_rating]
            if any(order[ratings[dim]] >= threshold for dim in rule.dimensions):
                return rule.level
        raise AssertionError("unreachable: the last placement rule matches everything")

    def band_for(self, level_code: str, age_group: AgeGroup) -> Band | None:
        return self.level(level_code).hours_per_week.get(age_group)


BUNDLED = resources.files("continuum.domain").joinpath("policies")


def load_policy_text(text: str, *, source: str) -> Policy:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyInvalid(f"policy {source} is not valid TOML: {exc}", source=source) from exc
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PolicyInvalid(f"policy {source} is invalid: {problems}", source=source) from exc


class PolicyRegistry:
    """Every loaded policy document, by id and version; one is the default for new episodes."""

    def __init__(self, policies: Iterable[Policy], default_id: str) -> None:
        self._by_key: dict[tuple[str, str], Policy] = {}
        for policy in policies:
            key = (policy.id, policy.version)
            if key in self._by_key:
                raise PolicyInvalid(f"policy {policy.label} is loaded twice")
            self._by_key[key] = policy
        self.default_id = default_id
        self.latest(default_id)  # fail early when the default is unknown

    @classmethod
    def bundled(cls, default_id: str = "asam-3", extra_dirs: Iterable[Path] = ()) -> PolicyRegistry:
        policies = [
            load_policy_text(entry.read_text(encoding="utf-8"), source=entry.name)
            for entry in sorted(BUNDLED.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".toml")
        ]
        for directory in extra_dirs:
            for path in sorted(Path(directory).glob("*.toml")):
                policies.append(
                    load_policy_text(path.read_text(encoding="utf-8"), source=str(path))
                )
        return cls(policies, default_id)

    @property
    def default(self) -> Policy:
        return self.latest(self.default_id)

    def latest(self, policy_id: str) -> Policy:
        versions = [p for (pid, _), p in self._by_key.items() if pid == policy_id]
        if not versions:
            raise UnknownPolicy(
                f"no policy with id {policy_id!r}; loaded: "
                + ", ".join(sorted({pid for pid, _ in self._by_key})),
                field="policy",
                policy_id=policy_id,
            )
        return max(versions, key=lambda p: _version_key(p.version))

    def get(self, policy_id: str, version: str) -> Policy:
        try:
            return self._by_key[(policy_id, version)]
        except KeyError:
            raise UnknownPolicy(
                f"policy {policy_id}@{version} is not loaded",
                field="policy",
                policy_id=policy_id,
                version=version,
            ) from None

    def all(self) -> list[Policy]:
        return list(self._by_key.values())


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in version.split("."))
