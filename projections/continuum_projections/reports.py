"""Answers from the read model: census (now, as of a moment, daily history), the step-down
audit trail, and outcome metrics. Definitions follow DOMAIN.md section 6; docs/projections.md
states each one."""

from __future__ import annotations

import datetime as dt
import statistics
import tomllib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Connection, func, select

from continuum.domain.errors import InvalidInput
from continuum_projections import readmodel as rm
from continuum_projections.readmodel import utc

CensusKey = tuple[str, str, str, str]  # level, site, program ("" if none), age group


class CapacityError(InvalidInput):
    """The capacity file is missing or invalid (names the file and the entry)."""

    rule = "capacity.invalid"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, field="CONTINUUM_CAPACITY_FILE", **details)


class Capacity(BaseModel):
    """Configured places per site and level: `[sites.SITE] LEVEL = places` in TOML."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sites: dict[str, dict[str, int]] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Capacity:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CapacityError(f"capacity file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise CapacityError(f"capacity file {path} is not valid TOML: {exc}") from exc
        try:
            capacity = cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise CapacityError(f"capacity file {path} is invalid: {problems}") from exc
        for site, levels in capacity.sites.items():
            for level, places in levels.items():
                if places < 0:
                    raise CapacityError(
                        f"capacity file {path}: sites.{site}.{level} is {places}; "
                        "places cannot be negative"
                    )
        return capacity


@dataclass(frozen=True)
class Census:
    as_of: dt.datetime
    counts: dict[CensusKey, int]
    position: int | None = None
    capacity: Capacity | None = None
    level_order: Sequence[str] = ()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def levels(self) -> dict[str, int]:
        by_level: Counter[str] = Counter()
        for (level, *_), n in self.counts.items():
            by_level[level] += n
        ordered = {code: by_level.get(code, 0) for code in self.level_order}
        for code in sorted(by_level):
            ordered.setdefault(code, by_level[code])
        return ordered

    def by(self, index: int) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for key, n in self.counts.items():
            group = out[key[index]]
            group[key[0]] = group.get(key[0], 0) + n
        return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}

    def occupancy(self) -> list[dict[str, Any]]:
        if self.capacity is None:
            return []
        sites = self.by(1)
        rows = []
        for site, levels in sorted(self.capacity.sites.items()):
            for level, places in sorted(levels.items()):
                n = sites.get(site, {}).get(level, 0)
                rows.append(
                    {
                        "site": site,
                        "level": level,
                        "patients": n,
                        "capacity": places,
                        "occupancy": round(n / places, 4) if places else None,
                        "over_capacity": n > places,
                    }
                )
        return rows

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of.isoformat(),
            "position": self.position,
            "levels": self.levels(),
            "sites": self.by(1),
            "programs": {k or "-": v for k, v in self.by(2).items()},
            "age_groups": self.by(3),
            "occupancy": self.occupancy(),
            "total": self.total,
        }


def current_census(
    conn: Connection, *, capacity: Capacity | None = None, level_order: Sequence[str] = ()
) -> Census:
    # The store runner's checkpoint is the log position the read model reflects; a read model
    # fed from Kafka has per-partition offsets instead, so the highest position it applied.
    position = conn.execute(
        select(rm.checkpoints.c.position).where(rm.checkpoints.c.name == rm.STORE_CHECKPOINT)
    ).scalar()
    if position is None:
        position = conn.execute(select(func.max(rm.patients.c.position))).scalar()
    return Census(
        as_of=dt.datetime.now(dt.UTC),
        counts=rm.census_now(conn),
        position=int(position) if position is not None else 0,
        capacity=capacity,
        level_order=level_order,
    )


def census_as_of(
    conn: Connection,
    as_of: dt.datetime,
    *,
    capacity: Capacity | None = None,
    level_order: Sequence[str] = (),
) -> Census:
    """Exact census as the log stood at recorded time `as_of` (snapshot plus deltas)."""
    return Census(
        as_of=as_of,
        counts=rm.census_as_of(conn, as_of),
        capacity=capacity,
        level_order=level_order,
    )


def census_in_care_at(
    conn: Connection,
    moment: dt.datetime,
    *,
    capacity: Capacity | None = None,
    level_order: Sequence[str] = (),
) -> Census:
    """Who was in which level at clinical time `moment`, as the log knows it now (voided
    stays removed, late-recorded events included): stays open at that instant."""
    s = rm.stays
    keys = (s.c.level, s.c.site, s.c.program, s.c.age_group)
    rows = conn.execute(
        select(*keys, func.count())
        .where(
            s.c.voided.is_(False),
            s.c.started_at <= moment,
            (s.c.ended_at.is_(None)) | (s.c.ended_at > moment),
        )
        .group_by(*keys)
    ).all()
    counts = {(r[0], r[1], r[2] or "", r[3]): int(r[4]) for r in rows}
    return Census(as_of=moment, counts=counts, capacity=capacity, level_order=level_order)


@dataclass(frozen=True)
class DailyCensus:
    """Active stays at midnight UTC of each day, per level (clinical time, voids removed)."""

    days: list[dt.date]
    counts: dict[dt.date, dict[str, int]]

    def average(self) -> dict[str, float]:
        """Average daily census per level: patient-days / days."""
        totals: Counter[str] = Counter()
        for day in self.days:
            totals.update(self.counts[day])
        n = len(self.days) or 1
        return {level: round(total / n, 2) for level, total in sorted(totals.items())}

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "days": [
                {
                    "date": day.isoformat(),
                    "levels": self.counts[day],
                    "total": sum(self.counts[day].values()),
                }
                for day in self.days
            ],
            "average_daily_census": self.average(),
        }


def daily_census(conn: Connection, first: dt.date, last: dt.date) -> DailyCensus:
    s = rm.stays
    start = dt.datetime.combine(first, dt.time(), dt.UTC)
    end = dt.datetime.combine(last, dt.time(), dt.UTC)
    rows = conn.execute(
        select(s.c.level, s.c.started_at, s.c.ended_at).where(
            s.c.voided.is_(False),
            s.c.started_at <= end,
            (s.c.ended_at.is_(None)) | (s.c.ended_at > start),
        )
    ).all()
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    counts: dict[dt.date, dict[str, int]] = {day: {} for day in days}
    for level, started_at, ended_at in rows:
        started, ended = _aware(started_at), utc(ended_at)
        for day in days:
            midnight = dt.datetime.combine(day, dt.time(), dt.UTC)
            if started <= midnight and (ended is None or ended > midnight):
                counts[day][level] = counts[day].get(level, 0) + 1
    return DailyCensus(days=days, counts={d: dict(sorted(c.items())) for d, c in counts.items()})


# -- the step-down audit trail ---------------------------------------------------------------

TRAIL_COLUMNS = [c.name for c in rm.transitions.columns]
FLAGS = [c for c in TRAIL_COLUMNS if c.startswith("flag_")]


def audit_trail(
    conn: Connection,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    *,
    flagged_only: bool = False,
    include_voided: bool = True,
) -> list[dict[str, Any]]:
    """One row per transition and readmission with occurred_at in [start, end)."""
    t = rm.transitions
    query = select(t)
    if start is not None:
        query = query.where(t.c.occurred_at >= start)
    if end is not None:
        query = query.where(t.c.occurred_at < end)
    if not include_voided:
        query = query.where(t.c.voided.is_(False))
    rows = []
    for row in conn.execute(query.order_by(t.c.occurred_at, t.c.event_id)).mappings():
        item = dict(row)
        for name, value in item.items():
            if isinstance(value, dt.datetime):
                item[name] = utc(value)
        if flagged_only and not any(item[f] for f in FLAGS):
            continue
        rows.append(item)
    return rows


# -- outcome metrics -------------------------------------------------------------------------


@dataclass
class Stat:
    n: int = 0
    median: float | None = None
    mean: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            return cls()
        return cls(
            n=len(values),
            median=float(statistics.median(values)),
            mean=round(statistics.fmean(values), 2),
        )


@dataclass
class Metrics:
    start: dt.datetime | None
    end: dt.datetime | None
    los_by_level: dict[str, Stat] = field(default_factory=dict)
    los_episode: Stat = field(default_factory=Stat)
    exits_by_level: dict[str, dict[str, Any]] = field(default_factory=dict)
    discharges: int = 0
    completed: int = 0
    ama: int = 0
    readmission_eligible: int = 0
    readmitted_30d: int = 0
    follow_up_incomplete: int = 0

    def rate(self, n: int, d: int) -> float | None:
        return round(n / d, 4) if d else None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat() if self.start else None,
            "to": self.end.isoformat() if self.end else None,
            "length_of_stay_days": {
                "by_level": {k: vars(v) for k, v in self.los_by_level.items()},
                "episode": vars(self.los_episode),
            },
            "exits_by_level": self.exits_by_level,
            "discharges": self.discharges,
            "completion_rate": self.rate(self.completed, self.discharges),
            "ama_rate": self.rate(self.ama, self.discharges),
            "readmission_30d": {
                "eligible_discharges": self.readmission_eligible,
                "readmitted": self.readmitted_30d,
                "rate": self.rate(self.readmitted_30d, self.readmission_eligible),
                "follow_up_incomplete": self.follow_up_incomplete,
            },
        }


EXIT_KINDS = ("step_down", "step_up", "lateral", "discharge")


def _aware(value: dt.datetime | None) -> dt.datetime:
    aware = utc(value)
    if aware is None:
        raise ValueError("a required timestamp is missing from the read model")
    return aware


def los_days(start: dt.datetime, end: dt.datetime) -> int:
    """TEDS: end date minus start date; under one day counts as one."""
    return max(1, (end.date() - start.date()).days)


def outcome_metrics(
    conn: Connection,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    *,
    level_order: Iterable[str] = (),
) -> Metrics:
    """Metrics over stays and episodes that ENDED in [start, end)."""
    metrics = Metrics(start=start, end=end)
    s, e = rm.stays, rm.episodes
    stay_query = select(s.c.level, s.c.started_at, s.c.ended_at, s.c.end_kind).where(
        s.c.voided.is_(False), s.c.ended_at.is_not(None)
    )
    if start is not None:
        stay_query = stay_query.where(s.c.ended_at >= start)
    if end is not None:
        stay_query = stay_query.where(s.c.ended_at < end)
    los: dict[str, list[float]] = defaultdict(list)
    exits: dict[str, Counter[str]] = defaultdict(Counter)
    for level, started, ended, kind in conn.execute(stay_query):
        los[level].append(los_days(_aware(started), _aware(ended)))
        exits[level][kind] += 1
    order = {code: i for i, code in enumerate(level_order)}

    def ordered(keys: Iterable[str]) -> list[str]:
        return sorted(keys, key=lambda k: (order.get(k, len(order)), k))

    metrics.los_by_level = {level: Stat.of(los[level]) for level in ordered(los)}
    for level in ordered(exits):
        counts = exits[level]
        total = sum(counts.values())
        metrics.exits_by_level[level] = {
            "exits": total,
            **{
                kind: counts.get(kind, 0)
                for kind in ("step_down", "step_up", "lateral", "discharge")
            },
            "step_down_rate": round(counts.get("step_down", 0) / total, 4),
            "step_up_rate": round(counts.get("step_up", 0) / total, 4),
        }
    latest = utc(conn.execute(select(func.max(e.c.admitted_at))).scalar())
    latest_discharge = utc(conn.execute(select(func.max(e.c.discharged_at))).scalar())
    horizon = max((t for t in (latest, latest_discharge) if t is not None), default=None)
    episode_query = select(
        e.c.admitted_at,
        e.c.discharged_at,
        e.c.discharge_reason,
        e.c.discharge_disposition,
        e.c.readmitted_within_30d,
    ).where(e.c.voided.is_(False), e.c.discharged_at.is_not(None))
    if start is not None:
        episode_query = episode_query.where(e.c.discharged_at >= start)
    if end is not None:
        episode_query = episode_query.where(e.c.discharged_at < end)
    episode_los: list[float] = []
    for admitted_at, discharged_at, reason, disposition, readmitted in conn.execute(episode_query):
        discharged = _aware(discharged_at)
        episode_los.append(los_days(_aware(admitted_at), discharged))
        metrics.discharges += 1
        metrics.completed += reason == "completed"
        metrics.ama += disposition == "aadvice"
        if reason != "transferred":
            metrics.readmission_eligible += 1
            metrics.readmitted_30d += bool(readmitted)
            if horizon is not None and (horizon - discharged).days < 30 and not readmitted:
                metrics.follow_up_incomplete += 1
    metrics.los_episode = Stat.of(episode_los)
    return metrics
