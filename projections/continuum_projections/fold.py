"""The continuum projection: one fold over the event log that feeds every read model.

Input is the canonical wire envelope decoded to a dict (`decode`), exactly as the store's
`read_wire` and the Kafka topic carry it, so the store runner and the Kafka runner run this same
code. Output is row changes for the read-model tables (`Changes`): inserts, patches of existing
rows, and census deltas. Times in rows are the events' own ISO 8601 UTC strings; the writer
converts them where a database needs datetime objects. The fold keeps a small state per
patient (`PatientFold`) that is saved with the rows, so a runner can stop anywhere and go on.

It mirrors the domain's own fold (`continuum.domain.patient.PatientState.apply`): it runs no
guard, trusts recorded outcomes, and honours voids the same way (a void undoes the patient's
latest placement change; a voided reassessment or attendance no longer counts). A test checks
that its census equals the domain fold's on simulated cohorts.

Rows (column names are the read-model tables' in `readmodel.py`):
- stays        one per level stay, keyed by the event that opened it
- episodes     one per treatment episode
- transitions  the step-down audit trail: one per transition and readmission, with flags
- patients     each patient's current placement (the current census), with the fold state
- census_deltas  +1/-1 per (level, site, program, age group) at each event's recorded time
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from continuum.domain.errors import ContinuumError
from continuum_projections.policyview import PolicyView, PolicyViews

Event = dict[str, Any]
Row = dict[str, Any]

#: Attendance older than this (before the patient's latest event) is dropped from the state.
ATTENDANCE_KEPT = dt.timedelta(days=28)
#: The window over which attended hours are compared with the level's band.
HOURS_WINDOW = dt.timedelta(days=14)
#: Attendance records kept before pruning those older than ATTENDANCE_KEPT.
ATTENDANCE_PRUNE_AT = 32
#: Fewer days than this in the level before a move: too little to judge attended hours.
HOURS_MIN_DAYS = 7.0
READMISSION_WINDOW_DAYS = 30

STATE_VERSION = 2
#: Placement changes kept per patient for undoing by a void (each void undoes the latest; a
#: run of more consecutive voids than this is refused with UndoLimit).
MAX_UNDO = 6
PLACEMENT_EVENTS = frozenset(
    {"PatientAdmitted", "PatientReadmitted", "LevelTransitioned", "PatientDischarged"}
)


def decode(wire: bytes | str) -> Event:
    """One event from its canonical wire bytes."""
    event: Event = orjson.loads(wire)
    return event


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


#: The columns of the rows the fold inserts, per table, in the order of the value tuples that
#: `Changes.inserts` holds (the read model's tables have exactly these; a test checks it).
COLUMNS: dict[str, tuple[str, ...]] = {
    "stays": (
        "stay_id", "patient_key", "episode_id", "level", "site", "program", "age_group",
        "start_kind", "started_at", "started_recorded_at", "ended_at", "ended_recorded_at",
        "end_event_id", "end_kind", "next_level", "voided",
    ),
    "episodes": (
        "episode_id", "patient_key", "episode_number", "age_group", "admitted_at",
        "admitted_recorded_at", "admission_event_id", "entry_level", "entry_site",
        "previous_episode_id", "days_since_previous_discharge", "policy_id", "policy_version",
        "discharged_at", "discharge_event_id", "discharge_level", "discharge_reason",
        "discharge_disposition", "readmitted_at", "readmission_episode_id",
        "readmitted_within_30d", "voided",
    ),
    "transitions": (
        "event_id", "patient_key", "episode_id", "position", "kind", "direction", "from_level",
        "from_site", "to_level", "to_site", "occurred_at", "recorded_at",
        "reassessment_event_id", "reassessment_at", "reassessment_age_days", "ratings",
        "hours_scheduled", "indicated_level", "variance_reason", "authorization_ref",
        "actor_id", "actor_role", "policy_id", "policy_version", "window_days",
        "flag_stale_reassessment", "flag_level_differs", "skipped_levels",
        "flag_skipped_levels", "hours_band_min", "hours_attended_14d",
        "hours_per_week_attended", "flag_hours_below_band", "days_since_discharge",
        "flag_readmission_30d", "voided", "voided_by", "voided_at",
    ),
}  # fmt: skip
_VALUES = {table: operator.itemgetter(*columns) for table, columns in COLUMNS.items()}
_INDEX = {table: {c: i for i, c in enumerate(columns)} for table, columns in COLUMNS.items()}


@dataclass
class Changes:
    """Row changes produced since the last flush, coalesced per row.

    An inserted row is kept as its values in `COLUMNS` order, taken from the row's dict when
    it is inserted: the writer sends them as they are. Taking them at write time instead, from
    dicts made up to a batch earlier and long out of the CPU's cache, took 8% of a rebuild's
    Python time, and the dicts held about 30 MB more memory. `inserted` gives dicts."""

    inserts: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    patches: dict[str, dict[str, Row]] = field(default_factory=dict)
    deltas: list[Row] = field(default_factory=list)
    events: int = 0
    rows: int = 0  # rows inserted or patched so far (bounds a batch's memory)

    def insert(self, table: str, key: str, row: Row) -> None:
        self.inserts.setdefault(table, {})[key] = _VALUES[table](row)
        self.rows += 1

    def patch(self, table: str, key: str, values: Row) -> None:
        inserted = self.inserts.get(table, {}).get(key)
        if inserted is not None:
            patched = list(inserted)
            index = _INDEX[table]
            for column, value in values.items():
                patched[index[column]] = value
            self.inserts[table][key] = tuple(patched)
        else:
            self.patches.setdefault(table, {}).setdefault(key, {}).update(values)
            self.rows += 1

    def inserted(self, table: str) -> dict[str, Row]:
        """The rows inserted into `table`, by key, as dicts (for readers: the web console's
        preview of a patient, tests)."""
        columns = COLUMNS[table]
        return {
            key: dict(zip(columns, values, strict=True))
            for key, values in self.inserts.get(table, {}).items()
        }

    def __bool__(self) -> bool:
        return bool(self.events or self.inserts or self.patches or self.deltas)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a patient is: the census key and the open stay. Never changed once made, so the
    undo stack shares instances instead of copying them."""

    level: str
    site: str
    program: str | None
    age_group: str
    episode_id: str
    episode_number: int
    stay_id: str
    placed_at: str  # ISO, clinical time
    policy: dict[str, str] | None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.level, self.site, self.program or "", self.age_group)


@dataclass(frozen=True, slots=True)
class Change:
    """One placement change, with what it replaced (restored if the change is voided)."""

    event_id: str
    event_type: str
    state: str
    placement: Placement | None
    last_discharge: dict[str, Any] | None
    assessed: dict[str, str] | None  # admissions only: the previous episode's assessments

    def to_list(self) -> list[Any]:
        return [
            self.event_id,
            self.event_type,
            self.state,
            _placement_list(self.placement),
            self.last_discharge,
            self.assessed,
        ]

    @classmethod
    def of(cls, raw: list[Any]) -> Change:
        return cls(raw[0], raw[1], raw[2], _placement_of(raw[3]), raw[4], raw[5])


class UndoLimit(ContinuumError):
    """A void reaches further back than the projection keeps placement changes."""

    rule = "projection.undo_limit"


@dataclass(slots=True)
class PatientFold:
    """The state the fold keeps per patient (saved as JSON beside the patient's row)."""

    key: str
    version: int = 0
    position: int = 0
    state: str = "new"  # "new", a level code, or the policy's terminal state
    placement: Placement | None = None
    last_discharge: dict[str, Any] | None = None
    assessed: dict[str, str] = field(default_factory=dict)  # event id -> occurred_at
    attendance: list[list[Any]] = field(default_factory=list)  # [date, hours, level, event_id]
    changes: list[Change] = field(default_factory=list)  # undo stack for voids, newest last
    truncated: bool = False  # older changes were dropped from the undo stack (MAX_UNDO)
    stored: bool = False  # has a row in the patients table
    # A deferring fold (`ContinuumFold(defer=True)`) holds the open stay's and the open
    # episode's rows here until they are final (the stay closed, the episode discharged or
    # voided) or the patient is saved: each row is then written once instead of inserted and
    # updated. Never in the saved JSON: saving a patient writes them first.
    pending_stay: Row | None = None
    pending_episode: Row | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "v": STATE_VERSION,
                "version": self.version,
                "position": self.position,
                "state": self.state,
                "placement": _placement_list(self.placement),
                "last_discharge": self.last_discharge,
                "assessed": self.assessed,
                "attendance": self.attendance,
                "changes": [change.to_list() for change in self.changes],
                "truncated": self.truncated,
            }
        )

    @classmethod
    def from_json(cls, key: str, raw: bytes | str) -> PatientFold:
        data = orjson.loads(raw)
        if data.get("v") != STATE_VERSION:
            raise ValueError(
                f"saved projection state for {key} is version {data.get('v')}, this code reads "
                f"{STATE_VERSION}: rebuild the projections (continuum replay)"
            )
        return cls(
            key=key,
            version=data["version"],
            position=data["position"],
            state=data["state"],
            placement=_placement_of(data["placement"]),
            last_discharge=data["last_discharge"],
            assessed=data["assessed"],
            attendance=data["attendance"],
            changes=[Change.of(raw) for raw in data["changes"]],
            truncated=data["truncated"],
            stored=True,
        )

    def row(self) -> Row:
        p = self.placement
        active = p is not None
        # By time, not by text: a time on a whole second is written without a fraction
        # ("...13Z"), which sorts after "...13.5Z" as text.
        last = max(self.assessed.values(), key=parse_time) if self.assessed else None
        return {
            "patient_key": self.key,
            "state": self.state,
            "active": active,
            "level": p.level if p else None,
            "site": p.site if p else None,
            "program": p.program if p else None,
            "age_group": p.age_group if p else None,
            "episode_id": p.episode_id if p else None,
            "placed_at": p.placed_at if p else None,
            "last_assessed_at": last,
            "version": self.version,
            "position": self.position,
            "fold_state": self.to_json().decode(),
        }


class OutOfOrder(ContinuumError):
    """An event arrived before an earlier event of the same patient."""

    rule = "projection.out_of_order"


class ContinuumFold:
    """Applies events to per-patient state, emitting read-model row changes."""

    def __init__(
        self,
        policies: PolicyViews,
        load: Callable[[Iterable[str]], dict[str, PatientFold]] | None = None,
        *,
        defer: bool = False,
    ) -> None:
        self.policies = policies
        self.patients: dict[str, PatientFold] = {}
        self.changes = Changes()
        #: Patients changed since they were last handed out by `take` (saved).
        self.dirty: set[str] = set()
        self._load = load
        self.duplicates = 0
        #: Write each stay and episode row once it is final, and save patients in care only
        #: when asked (`take(complete=True)`); see `take`.
        self.defer = defer
        #: Set when no patient this fold meets can have saved state, except those it handed
        #: out itself (`handed`): a rebuild from position 0. Then only those are looked up.
        self.fresh = False
        self.handed: set[str] = set()

    # -- state --------------------------------------------------------------------------------

    def preload(self, keys: Iterable[str]) -> None:
        """Fetch saved state for patients not yet in memory (one query per batch)."""
        missing = {k for k in keys if k not in self.patients}
        if not missing:
            return
        wanted = missing & self.handed if self.fresh else missing
        found = self._load(wanted) if self._load is not None and wanted else {}
        for key in missing:  # not saved anywhere: a patient this projection has not seen
            self.patients[key] = found.get(key) or PatientFold(key=key)

    def take(self, *, complete: bool = True) -> tuple[Changes, list[PatientFold]]:
        """The row changes since the last call, and the patients to save with them.

        Without deferring, every patient the changes touched is saved. A deferring fold saves
        (with their pending rows) only the changed patients out of care, unless `complete`:
        those in care stay unsaved in memory until a complete take. The rows written before
        then came from events the saved state of those patients does not include, so a
        runner that restarts must fold again, without writing, from the position of the last
        complete take (`StoreRunner`'s warm-up)."""
        if complete or not self.defer:
            keys = sorted(self.dirty)
            self.dirty = set()
        else:
            keys = sorted(k for k in self.dirty if self.patients[k].placement is None)
            self.dirty.difference_update(keys)
        touched = [self.patients[k] for k in keys]
        for patient in touched:
            self._write_pending(patient)
        if self.fresh:
            self.handed.update(keys)
        changes, self.changes = self.changes, Changes()
        return changes, touched

    def evict(self) -> None:
        """Forget every patient and every change not taken (state is reloaded from the read
        model on use)."""
        self.patients.clear()
        self.dirty = set()
        self.changes = Changes()

    def forget(self, keys: Iterable[str]) -> None:
        """Forget these patients (their saved state must be committed)."""
        for key in list(keys):
            del self.patients[key]
            self.dirty.discard(key)

    def discard_changes(self) -> None:
        """Drop the row changes made so far, keeping the patients' state (a warm-up folds
        events whose rows are already written)."""
        self.changes = Changes()

    # -- the fold -------------------------------------------------------------------------------

    def apply(self, event: Event) -> bool:
        """Apply one event; False when it was already applied (a duplicate from a redelivery)."""
        key: str = event["stream_id"]
        patient = self.patients.get(key)
        if patient is None:
            self.preload([key])
            patient = self.patients[key]
        version: int = event["stream_version"]
        if version <= patient.version:
            self.duplicates += 1
            return False
        if version != patient.version + 1:
            raise OutOfOrder(
                f"event {event['event_id']} is version {version} of {key}, but the projection "
                f"has applied up to version {patient.version}: events of one patient must "
                "arrive in order (is the topic keyed by patient?)"
            )
        patient.version = version
        patient.position = event.get("position") or patient.position
        self.dirty.add(key)
        self.changes.events += 1
        kind = event["event_type"]
        if kind == "AttendanceRecorded":
            self._attended(patient, event)
        elif kind == "ReassessmentRecorded":
            patient.assessed[event["event_id"]] = event["occurred_at"]
        elif kind == "LevelTransitioned":
            self._transitioned(patient, event)
        elif kind in ("PatientAdmitted", "PatientReadmitted"):
            self._entered(patient, event)
        elif kind == "PatientDischarged":
            self._discharged(patient, event)
        elif kind == "EventVoided":
            self._voided(patient, event)
        # Consent events (ConsentGiven, ConsentRevoked) change no read model: only the
        # patient's version and position above move, so later events still fold in order.
        return True

    def _attended(self, patient: PatientFold, event: Event) -> None:
        data = event["data"]
        patient.attendance.append(
            [data["service_date"], data["hours"], data["level"], event["event_id"]]
        )
        if len(patient.attendance) > ATTENDANCE_PRUNE_AT:
            day = dt.date.fromisoformat(event["occurred_at"][:10])
            cutoff = (day - ATTENDANCE_KEPT).isoformat()
            patient.attendance = [a for a in patient.attendance if a[0] >= cutoff]

    def _entered(self, patient: PatientFold, event: Event) -> None:
        data = event["data"]
        placement = data["placement"]
        assessment = data["assessment"]
        policy = self.policies.get(event.get("policy"))
        event_id: str = event["event_id"]
        self._write_pending(patient)  # an entry over an open stay (not expected) keeps it
        self._push_change(patient, event)
        p = patient.placement = Placement(
            level=placement["level"],
            site=placement["site"],
            program=placement.get("program"),
            age_group=data["age_group"],
            episode_id=data["episode_id"],
            episode_number=data["episode_number"],
            stay_id=event_id,
            placed_at=event["occurred_at"],
            policy=event.get("policy"),
        )
        patient.state = p.level
        patient.assessed = {event_id: event["occurred_at"]}
        readmission = event["event_type"] == "PatientReadmitted"
        gap_days: float | None = None
        within_30 = False
        previous = patient.last_discharge
        if readmission and previous is not None:
            gap = parse_time(event["occurred_at"]) - parse_time(previous["at"])
            gap_days = round(gap.total_seconds() / 86400, 3)
            within_30 = _counts_as_readmission(policy, previous, p.level, gap_days)
            self.changes.patch(
                "episodes",
                previous["episode_id"],
                {
                    "readmitted_at": event["occurred_at"],
                    "readmission_episode_id": p.episode_id,
                    "readmitted_within_30d": within_30,
                },
            )
        episode: Row = {
            "episode_id": p.episode_id,
            "patient_key": patient.key,
            "episode_number": p.episode_number,
            "age_group": p.age_group,
            "admitted_at": event["occurred_at"],
            "admitted_recorded_at": event["recorded_at"],
            "admission_event_id": event_id,
            "entry_level": p.level,
            "entry_site": p.site,
            "previous_episode_id": data.get("previous_episode_id"),
            "days_since_previous_discharge": gap_days,
            "policy_id": _pid(event),
            "policy_version": _pver(event),
            "discharged_at": None,
            "discharge_event_id": None,
            "discharge_level": None,
            "discharge_reason": None,
            "discharge_disposition": None,
            "readmitted_at": None,
            "readmission_episode_id": None,
            "readmitted_within_30d": False,
            "voided": False,
        }
        if self.defer:
            patient.pending_episode = episode
        else:
            self.changes.insert("episodes", p.episode_id, episode)
        self._open_stay(patient, event, "readmission" if readmission else "admission")
        self._delta(event, p, +1)
        if readmission:
            self.changes.insert(
                "transitions",
                event_id,
                self._trail_row(
                    event,
                    patient,
                    kind="readmission",
                    direction="readmission",
                    from_level=previous["level"] if previous else None,
                    from_site=previous["site"] if previous else None,
                    placement=placement,
                    reassessment_event_id=event_id,
                    reassessment_at=event["occurred_at"],
                    reassessment_age_days=0.0,
                    ratings=assessment["ratings"],
                    hours_scheduled=assessment.get("hours_scheduled"),
                    policy=policy,
                    extra={
                        "days_since_discharge": gap_days,
                        "flag_readmission_30d": within_30,
                    },
                ),
            )

    def _leave(
        self, patient: PatientFold, event: Event, end_kind: str, next_level: str | None
    ) -> tuple[Placement, PolicyView | None]:
        """The patient leaves their current stay (a move or a discharge)."""
        before = patient.placement
        if before is None:
            raise OutOfOrder(
                f"{event['event_type']} {event['event_id']} of {patient.key} before admission"
            )
        self._push_change(patient, event)
        self._close_stay(patient, before, event, end_kind, next_level)
        self._delta(event, before, -1)
        return before, self.policies.get(event.get("policy"))

    def _transitioned(self, patient: PatientFold, event: Event) -> None:
        data = event["data"]
        placement = data["placement"]
        before, policy = self._leave(patient, event, data["direction"], placement["level"])
        p = patient.placement = Placement(
            level=placement["level"],
            site=placement["site"],
            program=placement.get("program"),
            age_group=before.age_group,
            episode_id=before.episode_id,
            episode_number=before.episode_number,
            stay_id=event["event_id"],
            placed_at=event["occurred_at"],
            policy=event.get("policy") or before.policy,
        )
        patient.state = p.level
        self._open_stay(patient, event, data["direction"])
        self._delta(event, p, +1)
        extra = self._flags(patient, event, before, policy)
        self.changes.insert(
            "transitions",
            event["event_id"],
            self._trail_row(
                event,
                patient,
                kind="transition",
                direction=data["direction"],
                from_level=data["from_level"],
                from_site=data["from_site"],
                placement=placement,
                reassessment_event_id=data["reassessment_event_id"],
                reassessment_at=data["reassessment_occurred_at"],
                reassessment_age_days=data["reassessment_age_days"],
                ratings=data["ratings"],
                hours_scheduled=data.get("hours_scheduled"),
                policy=policy,
                extra=extra,
            ),
        )

    def _flags(
        self, patient: PatientFold, event: Event, before: Placement, policy: PolicyView | None
    ) -> Row:
        data = event["data"]
        flags: Row = {"days_since_discharge": None, "flag_readmission_30d": False}
        window = policy.window_days if policy else None
        flags["window_days"] = window
        flags["flag_stale_reassessment"] = (
            window is not None and data["reassessment_age_days"] > window
        )
        skipped = policy.skipped(data["from_level"], data["placement"]["level"]) if policy else []
        flags["skipped_levels"] = ",".join(skipped) or None
        flags["flag_skipped_levels"] = bool(skipped)
        # Attended hours at the level being left, over the two weeks before the move.
        minimum = policy.min_hours(before.level, before.age_group) if policy else None
        moved_at = parse_time(event["occurred_at"])
        start = max(moved_at - HOURS_WINDOW, parse_time(before.placed_at))
        days = (moved_at - start).total_seconds() / 86400
        first_day, move_day = start.date().isoformat(), moved_at.date().isoformat()
        hours = sum(
            a[1]
            for a in patient.attendance
            if a[2] == before.level and first_day <= a[0] <= move_day
        )
        flags["hours_band_min"] = minimum
        flags["hours_attended_14d"] = hours
        judged = minimum is not None and days >= HOURS_MIN_DAYS
        per_week = round(hours * 7 / days, 2) if judged else None
        flags["hours_per_week_attended"] = per_week
        flags["flag_hours_below_band"] = bool(
            judged and per_week is not None and minimum is not None and per_week < minimum
        )
        return flags

    def _discharged(self, patient: PatientFold, event: Event) -> None:
        data = event["data"]
        before, policy = self._leave(patient, event, "discharge", None)
        self._patch_episode(
            patient,
            before.episode_id,
            {
                "discharged_at": event["occurred_at"],
                "discharge_event_id": event["event_id"],
                "discharge_level": before.level,
                "discharge_reason": data["reason"],
                "discharge_disposition": data["disposition"],
            },
        )
        patient.last_discharge = {
            "at": event["occurred_at"],
            "level": before.level,
            "site": before.site,
            "reason": data["reason"],
            "episode_id": before.episode_id,
            "rank": policy.rank(before.level) if policy else None,
        }
        patient.placement = None
        patient.state = policy.terminal if policy else "discharged"

    def _voided(self, patient: PatientFold, event: Event) -> None:
        data = event["data"]
        target: str = data["voided_event_id"]
        patient.assessed.pop(target, None)
        patient.attendance = [a for a in patient.attendance if a[3] != target]
        voided_at = event["recorded_at"]
        mark = {"voided": True, "voided_by": event["event_id"], "voided_at": voided_at}
        if data["voided_event_type"] in ("LevelTransitioned", "PatientReadmitted"):
            self.changes.patch("transitions", target, mark)
        if not patient.changes or patient.changes[-1].event_id != target:
            if (
                patient.truncated
                and not patient.changes
                and data["voided_event_type"] in (PLACEMENT_EVENTS)
            ):
                raise UndoLimit(
                    f"void {event['event_id']} of {patient.key} undoes a placement change older "
                    f"than the {MAX_UNDO} this projection keeps; raise MAX_UNDO and rebuild "
                    "(continuum replay)"
                )
            return  # not the latest placement change: no effect on placement (as the domain)
        change = patient.changes.pop()
        kind = change.event_type
        current = patient.placement
        previous = change.placement
        if current is not None:
            self._delta(event, current, -1)
            self._patch_stay(patient, current.stay_id, {"voided": True})
        if kind in ("PatientAdmitted", "PatientReadmitted"):
            if current is not None:
                self._patch_episode(patient, current.episode_id, {"voided": True})
            earlier = change.last_discharge
            if earlier is not None:
                self.changes.patch(
                    "episodes",
                    earlier["episode_id"],
                    {
                        "readmitted_at": None,
                        "readmission_episode_id": None,
                        "readmitted_within_30d": False,
                    },
                )
            patient.assessed = {k: v for k, v in (change.assessed or {}).items() if k != target}
        if kind == "PatientDischarged" and previous is not None:
            self._patch_episode(patient, previous.episode_id, _DISCHARGE_CLEARED)
        if previous is not None:
            self._patch_stay(patient, previous.stay_id, _STAY_REOPENED)
            self._delta(event, previous, +1)
        patient.placement = previous
        patient.state = change.state
        patient.last_discharge = change.last_discharge

    # -- helpers ------------------------------------------------------------------------------

    def _push_change(self, patient: PatientFold, event: Event) -> None:
        entry = event["event_type"] in ("PatientAdmitted", "PatientReadmitted")
        patient.changes.append(
            Change(
                event_id=event["event_id"],
                event_type=event["event_type"],
                state=patient.state,
                placement=patient.placement,
                last_discharge=patient.last_discharge,
                assessed=dict(patient.assessed) if entry else None,
            )
        )
        if len(patient.changes) > MAX_UNDO:
            del patient.changes[0]
            patient.truncated = True

    def _open_stay(self, patient: PatientFold, event: Event, start_kind: str) -> None:
        p = patient.placement
        assert p is not None
        row: Row = {
            "stay_id": p.stay_id,
            "patient_key": patient.key,
            "episode_id": p.episode_id,
            "level": p.level,
            "site": p.site,
            "program": p.program,
            "age_group": p.age_group,
            "start_kind": start_kind,
            "started_at": event["occurred_at"],
            "started_recorded_at": event["recorded_at"],
            **_STAY_REOPENED,
            "voided": False,
        }
        if self.defer:
            patient.pending_stay = row
        else:
            self.changes.insert("stays", p.stay_id, row)

    def _close_stay(
        self,
        patient: PatientFold,
        stay: Placement,
        event: Event,
        end_kind: str,
        next_level: str | None,
    ) -> None:
        self._patch_stay(
            patient,
            stay.stay_id,
            {
                "ended_at": event["occurred_at"],
                "ended_recorded_at": event["recorded_at"],
                "end_event_id": event["event_id"],
                "end_kind": end_kind,
                "next_level": next_level,
            },
        )

    def _patch_stay(self, patient: PatientFold, stay_id: str, values: Row) -> None:
        """Change a stay: the pending row (which is then final and written), or the row
        already written."""
        if self._patch_pending(patient.pending_stay, "stays", stay_id, values):
            patient.pending_stay = None

    def _patch_episode(self, patient: PatientFold, episode_id: str, values: Row) -> None:
        """Change an episode: as `_patch_stay`."""
        if self._patch_pending(patient.pending_episode, "episodes", episode_id, values):
            patient.pending_episode = None

    def _patch_pending(self, pending: Row | None, table: str, key: str, values: Row) -> bool:
        """Patch row `key` of `table`; True if it was the pending row (now inserted)."""
        if pending is not None and pending[_ROW_KEY[table]] == key:
            pending.update(values)
            self.changes.insert(table, key, pending)
            return True
        self.changes.patch(table, key, values)
        return False

    def _write_pending(self, patient: PatientFold) -> None:
        """Write the rows a deferring fold holds for this patient (it is being saved)."""
        if patient.pending_stay is not None:
            self.changes.insert("stays", patient.pending_stay["stay_id"], patient.pending_stay)
            patient.pending_stay = None
        if patient.pending_episode is not None:
            row = patient.pending_episode
            self.changes.insert("episodes", row["episode_id"], row)
            patient.pending_episode = None

    def _delta(self, event: Event, placement: Placement, delta: int) -> None:
        level, site, program, age = placement.key
        self.changes.rows += 1
        self.changes.deltas.append(
            {
                "event_id": event["event_id"],
                "position": event.get("position"),
                "recorded_at": event["recorded_at"],
                "level": level,
                "site": site,
                "program": program,
                "age_group": age,
                "delta": delta,
            }
        )

    @staticmethod
    def _trail_row(
        event: Event,
        patient: PatientFold,
        *,
        kind: str,
        direction: str,
        from_level: str | None,
        from_site: str | None,
        placement: dict[str, Any],
        reassessment_event_id: str,
        reassessment_at: str,
        reassessment_age_days: float,
        ratings: dict[str, str],
        hours_scheduled: float | None,
        policy: PolicyView | None,
        extra: Row,
    ) -> Row:
        p = patient.placement
        assert p is not None
        indicated = placement["indicated_level"]
        row: Row = {
            "event_id": event["event_id"],
            "patient_key": patient.key,
            "episode_id": p.episode_id,
            "position": event.get("position"),
            "kind": kind,
            "direction": direction,
            "from_level": from_level,
            "from_site": from_site,
            "to_level": placement["level"],
            "to_site": placement["site"],
            "occurred_at": event["occurred_at"],
            "recorded_at": event["recorded_at"],
            "reassessment_event_id": reassessment_event_id,
            "reassessment_at": reassessment_at,
            "reassessment_age_days": reassessment_age_days,
            "ratings": orjson.dumps(ratings, option=orjson.OPT_SORT_KEYS).decode(),
            "hours_scheduled": hours_scheduled,
            "indicated_level": indicated,
            "variance_reason": placement.get("variance_reason"),
            "authorization_ref": placement.get("authorization_ref"),
            "actor_id": event["actor"]["id"],
            "actor_role": event["actor"]["role"],
            "policy_id": _pid(event),
            "policy_version": _pver(event),
            "window_days": policy.window_days if policy else None,
            "flag_stale_reassessment": False,
            "flag_level_differs": placement["level"] != indicated,
            "skipped_levels": None,
            "flag_skipped_levels": False,
            "hours_band_min": None,
            "hours_attended_14d": None,
            "hours_per_week_attended": None,
            "flag_hours_below_band": False,
            "days_since_discharge": None,
            "flag_readmission_30d": False,
            "voided": False,
            "voided_by": None,
            "voided_at": None,
        }
        row.update(extra)
        return row


#: The key column of the rows a deferring fold holds back.
_ROW_KEY = {"stays": "stay_id", "episodes": "episode_id"}
_STAY_REOPENED: Row = {
    "ended_at": None,
    "ended_recorded_at": None,
    "end_event_id": None,
    "end_kind": None,
    "next_level": None,
}
_DISCHARGE_CLEARED: Row = {
    "discharged_at": None,
    "discharge_event_id": None,
    "discharge_level": None,
    "discharge_reason": None,
    "discharge_disposition": None,
}


def _counts_as_readmission(
    policy: PolicyView | None, previous: dict[str, Any], level: str, gap_days: float
) -> bool:
    """Re-entry within 30 days of a discharge at the same or a higher intensity, planned
    transfers excluded (DOMAIN.md section 6)."""
    if gap_days > READMISSION_WINDOW_DAYS or previous["reason"] == "transferred":
        return False
    new_rank = policy.rank(level) if policy else None
    old_rank = previous.get("rank")
    if new_rank is None or old_rank is None:
        return True  # ranks unknown here: count it, the re-entry itself is certain
    return bool(new_rank >= old_rank)


def _pid(event: Event) -> str | None:
    policy = event.get("policy")
    return policy["id"] if policy else None


def _pver(event: Event) -> str | None:
    policy = event.get("policy")
    return policy["version"] if policy else None


def _placement_list(p: Placement | None) -> list[Any] | None:
    if p is None:
        return None
    return [
        p.level,
        p.site,
        p.program,
        p.age_group,
        p.episode_id,
        p.episode_number,
        p.stay_id,
        p.placed_at,
        p.policy,
    ]


def _placement_of(raw: list[Any] | None) -> Placement | None:
    return Placement(*raw) if raw is not None else None
