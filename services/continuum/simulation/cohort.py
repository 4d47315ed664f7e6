"""A synthetic cohort, driven through the same command path as every other caller.

No real data: patient keys are random, identities are absent, and every value is a code. The
seed fixes the journeys (levels, moves, outcomes), not the keys, so running the simulation again
on the same database adds a second cohort instead of colliding with the first.

Each patient's journey is a generator of (clinical time, command) steps that sees the outcome of
its previous step, so a refused command (a transition attempted on a stale reassessment, say)
is followed by the fix a case manager would make. Journeys are merged by
clinical time, so the global log reads like a real day-by-day record.

Latent risk per ASAM dimension drifts down as treatment works, with relapses that push it up;
each reassessment rates it, the policy's placement rule indicates a level, and the patient is
moved there (sometimes with a variance: no slot, patient preference). Every episode has an
outcome drawn at admission from the TEDS 2006 national discharge mix (DOMAIN.md section 6).

Some patients consent to disclose their record to an organization (a health information
exchange, a payer, a recovery community organization), a few revoke it later. Those draws come
from a random stream of their own, so the journeys (and every figure about them) are the same
as without consents.
"""

from __future__ import annotations

import datetime as dt
import heapq
import random
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from continuum.application.ports import AppendResult
from continuum.application.service import CommandContext, PatientService, new_patient_key
from continuum.domain import commands as c
from continuum.domain.errors import ContinuumError
from continuum.domain.policy import Policy
from continuum_events import (
    Actor,
    ActorRole,
    ConsentPurpose,
    DischargeReason,
    Disposition,
    VarianceReason,
)

#: TEDS 2006 discharge mix (completed 47, transferred 13, dropped out 25, terminated 8,
#: incarcerated 2, other 5; death is counted within "other").
DISCHARGE_MIX: dict[DischargeReason, float] = {
    DischargeReason.COMPLETED: 0.47,
    DischargeReason.TRANSFERRED: 0.13,
    DischargeReason.DROPPED_OUT: 0.25,
    DischargeReason.TERMINATED: 0.08,
    DischargeReason.INCARCERATED: 0.02,
    DischargeReason.OTHER: 0.045,
    DischargeReason.DEATH: 0.005,
}
DISPOSITION: dict[DischargeReason, Disposition] = {
    DischargeReason.COMPLETED: Disposition.HOME,
    DischargeReason.TRANSFERRED: Disposition.OTHER_HEALTHCARE_FACILITY,
    DischargeReason.DROPPED_OUT: Disposition.LEFT_AGAINST_ADVICE,
    DischargeReason.TERMINATED: Disposition.HOME,
    DischargeReason.INCARCERATED: Disposition.OTHER,
    DischargeReason.OTHER: Disposition.OTHER,
    DischargeReason.DEATH: Disposition.EXPIRED,
}
#: Episode length in days by outcome (uniform ranges): completions run longest.
EPISODE_DAYS: dict[DischargeReason, tuple[int, int]] = {
    DischargeReason.COMPLETED: (35, 90),
    DischargeReason.TRANSFERRED: (7, 45),
    DischargeReason.DROPPED_OUT: (2, 40),
    DischargeReason.TERMINATED: (10, 50),
    DischargeReason.INCARCERATED: (5, 60),
    DischargeReason.OTHER: (5, 60),
    DischargeReason.DEATH: (5, 60),
}
#: Entry severity profiles (latent risk per dimension 1..6) and how often each is seen.
ENTRY_PROFILES: list[tuple[float, list[float]]] = [
    (0.22, [3.6, 1.0, 1.5, 2.0, 2.5, 2.0]),  # acute withdrawal: detox first
    (0.08, [4.3, 1.5, 1.5, 2.0, 3.0, 2.5]),  # severe withdrawal: medically managed detox
    (0.25, [1.0, 1.0, 1.5, 2.0, 4.2, 3.0]),  # residential
    (0.05, [1.0, 3.2, 2.0, 2.0, 3.0, 2.0]),  # medically monitored inpatient
    (0.15, [1.0, 0.5, 3.1, 2.0, 2.0, 1.5]),  # PHP
    (0.15, [0.5, 0.5, 1.0, 2.1, 2.0, 1.0]),  # IOP
    (0.10, [0.2, 0.2, 0.5, 1.0, 1.2, 0.8]),  # outpatient
]
SITES = ["site-north", "site-south", "site-east"]
#: After a refused move: the reassessment, then the move this long after it.
FIX_TO_MOVE = dt.timedelta(minutes=30)
CASE_MANAGERS = [f"sim-cm-{i:02d}" for i in range(1, 9)]
#: Organizations patients consent to disclose to (synthetic codes).
CONSENT_ORGS = ["hie-north", "payer-a", "recovery-south"]
#: Share of patients who give a consent, and of those consents later revoked.
CONSENT_SHARE = 0.35
REVOKED_SHARE = 0.15
ASSESSORS = [f"sim-clin-{i:02d}" for i in range(1, 13)]


@dataclass
class SimulationReport:
    patients: int
    days: int
    seed: int
    commands: int = 0
    events: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    moves: Counter[str] = field(default_factory=Counter)
    discharges: Counter[str] = field(default_factory=Counter)
    readmissions: int = 0
    consents: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def discharge_mix(self) -> dict[str, float]:
        total = sum(self.discharges.values())
        return {k: v / total for k, v in sorted(self.discharges.items())} if total else {}

    def summary_lines(self) -> list[str]:
        rate = self.commands / self.seconds if self.seconds else 0.0
        return [
            f"simulated {self.patients} patients over {self.days} days (seed {self.seed}): "
            f"{self.commands} commands, {self.events} events in {self.seconds:.1f} s "
            f"({rate:,.0f} commands/s)",
            "moves: " + ", ".join(f"{k} {v}" for k, v in sorted(self.moves.items())),
            f"readmissions: {self.readmissions}",
            f"consents: given {self.consents['given']}, revoked {self.consents['revoked']}",
            "refused then fixed: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.refusals.items())) or "none"),
            "discharge mix: "
            + ", ".join(
                f"{k} {v:.0%} (national {DISCHARGE_MIX[DischargeReason(k)]:.0%})"
                for k, v in self.discharge_mix().items()
            ),
        ]


Outcome = AppendResult | ContinuumError
Step = tuple[dt.datetime, c.Command, CommandContext]
Journey = Generator[Step, Outcome, None]


@dataclass
class _Patient:
    rng: random.Random
    policy: Policy
    key: str
    risk: list[float]
    age_group: str
    actor: Actor
    report: SimulationReport
    level: str = ""
    site: str = ""


def _ratings(p: _Patient) -> dict[str, str]:
    values = [min(4, max(0, round(r + p.rng.gauss(0, 0.3)))) for r in p.risk]
    return {str(i): str(v) for i, v in enumerate(values, start=1)}


def _hours_for(policy: Policy, level: str, age_group: str) -> float | None:
    band = policy.level(level).hours_per_week.get(age_group)  # type: ignore[call-overload]
    if band is None:
        return None
    low = band.min_hours if band.min_hours is not None else 2.0
    high = band.below_hours - 1 if band.below_hours is not None else low + 10
    return float(round((low + high) / 2))


def _ctx(p: _Patient) -> CommandContext:
    return CommandContext(actor=p.actor)


def _assessment(p: _Patient, ratings: dict[str, str], level: str) -> c.AssessmentInput:
    return c.AssessmentInput(
        instrument="asam-ca",
        assessor_id=p.rng.choice(ASSESSORS),
        ratings=ratings,
        hours_scheduled=_hours_for(p.policy, level, p.age_group),
        scores={"ciwa-ar": float(max(0, round(p.risk[0] * 6 + p.rng.gauss(0, 2))))},
    )


def _episode(  # noqa: PLR0915 - one journey reads best as one story
    p: _Patient, start: dt.datetime, end: dt.datetime, readmission: bool
) -> Journey:
    """One episode: admission, weekly reassessments and moves, attendance, discharge."""
    rng, policy = p.rng, p.policy
    outcome = rng.choices(list(DISCHARGE_MIX), weights=list(DISCHARGE_MIX.values()))[0]
    low, high = EPISODE_DAYS[outcome]
    exit_at = start + dt.timedelta(days=rng.uniform(low, high), hours=rng.uniform(0, 8))
    now = start
    ratings = _ratings(p)
    indicated = policy.indicated_level(ratings)
    if indicated not in policy.admission_levels:
        indicated = "1" if "1" in policy.admission_levels else policy.admission_levels[0]
        ratings = {str(i): "1" for i in range(1, 7)}
    p.level, p.site = indicated, rng.choice(SITES)
    entry: dict[str, Any] = {
        "occurred_at": now,
        "level": indicated,
        "site": p.site,
        "age_group": p.age_group,
        "assessment": _assessment(p, ratings, indicated),
    }
    if readmission:
        result = yield (now, c.Readmit(patient_key=p.key, **entry), _ctx(p))
        p.report.readmissions += 1
    else:
        result = yield (now, c.Admit(patient_key=p.key, **entry), _ctx(p))
    if isinstance(result, ContinuumError):
        return
    last_step = now
    improving = outcome in (DischargeReason.COMPLETED, DischargeReason.TRANSFERRED)
    while True:
        now += dt.timedelta(days=rng.uniform(5.5, 7.5))
        if now >= min(exit_at, end):
            break
        # Treatment works (faster for those who will complete), with occasional relapse.
        for i in range(6):
            p.risk[i] = max(0.0, p.risk[i] - rng.uniform(0.25, 0.9 if improving else 0.4))
        if rng.random() < 0.07:
            p.risk[0] = min(4.4, p.risk[0] + rng.uniform(1.5, 3.0))
            p.risk[4] = min(4.4, p.risk[4] + rng.uniform(1.0, 2.5))
            p.report.moves["relapse"] += 1
        if (
            policy.level(p.level).setting == "ambulatory"
            and not policy.level(p.level).withdrawal_management
        ):
            for offset in (1, 3):
                day = now - dt.timedelta(days=offset)
                if day > last_step:
                    last_step = day
                    yield (
                        day,
                        c.RecordAttendance(
                            patient_key=p.key, service_date=day.date(), hours=3, occurred_at=day
                        ),
                        _ctx(p),
                    )
        ratings = _ratings(p)
        indicated = policy.indicated_level(ratings)
        if indicated not in _allowed_from(policy, p.level):
            indicated = p.level
        variance: VarianceReason | None = None
        target = indicated
        if indicated != p.level and rng.random() < 0.1:
            lower = _one_step_lower(policy, indicated, p.level)
            if lower is not None:
                target, variance = (
                    lower,
                    rng.choice([VarianceReason.NO_SLOT, VarianceReason.PATIENT_PREFERENCE]),
                )
        skip_reassessment = indicated != p.level and rng.random() < 0.08
        if not skip_reassessment:
            result = yield (
                now,
                c.RecordReassessment(
                    patient_key=p.key,
                    occurred_at=now,
                    assessment=_assessment(p, ratings, target),
                ),
                _ctx(p),
            )
            last_step = now
        if target == p.level:
            if indicated == p.level and rng.random() < 0.04:  # a bed at another site
                move_at = now + dt.timedelta(hours=rng.uniform(2, 20))
                if move_at >= min(exit_at, end):
                    break
                site = rng.choice([s for s in SITES if s != p.site])
                result = yield (
                    move_at,
                    c.Transition(
                        patient_key=p.key, occurred_at=move_at, to_level=p.level, site=site
                    ),
                    _ctx(p),
                )
                if isinstance(result, AppendResult):
                    p.report.moves["lateral"] += 1
                    p.site = site
                now = last_step = move_at
            continue
        move_at = now + dt.timedelta(hours=rng.uniform(2, 20))
        if move_at >= min(exit_at, end):
            break
        last_step = move_at
        result = yield (
            move_at,
            c.Transition(
                patient_key=p.key, occurred_at=move_at, to_level=target, variance_reason=variance
            ),
            _ctx(p),
        )
        if isinstance(result, ContinuumError):
            p.report.refusals[result.rule] += 1
            # The case manager sees the refusal, reassesses, and moves the patient.
            fix_at = move_at + dt.timedelta(hours=rng.uniform(1, 6))
            # The fixed move follows the reassessment by 30 minutes: both must come before
            # the discharge, or the journey would step back in time.
            if fix_at + FIX_TO_MOVE >= min(exit_at, end):
                break
            ratings = _ratings(p)
            fixed_target = policy.indicated_level(ratings)
            if fixed_target == p.level or fixed_target not in _allowed_from(policy, p.level):
                continue
            yield (
                fix_at,
                c.RecordReassessment(
                    patient_key=p.key,
                    occurred_at=fix_at,
                    assessment=_assessment(p, ratings, fixed_target),
                ),
                _ctx(p),
            )
            last_step = fix_at
            move_at = fix_at + FIX_TO_MOVE
            target, variance = fixed_target, None
            result = yield (
                move_at,
                c.Transition(patient_key=p.key, occurred_at=move_at, to_level=target),
                _ctx(p),
            )
            if isinstance(result, ContinuumError):
                continue
        direction: Any = result.events[0].data.direction  # type: ignore[union-attr]
        p.report.moves[direction.value] += 1
        p.level = target
        now = last_step = move_at
    if exit_at >= end:
        return
    if outcome is DischargeReason.COMPLETED and policy.level(p.level).setting == "24h":
        outcome = DischargeReason.TRANSFERRED  # still residential: leaves for further care
    result = yield (
        exit_at,
        c.Discharge(
            patient_key=p.key, occurred_at=exit_at, reason=outcome, disposition=DISPOSITION[outcome]
        ),
        _ctx(p),
    )
    if isinstance(result, AppendResult):
        p.report.discharges[outcome.value] += 1
    if outcome is DischargeReason.DEATH:
        return
    # Some come back: relapse after discharge, most often after leaving early.
    chance = 0.12 if outcome is DischargeReason.COMPLETED else 0.3
    if rng.random() < chance:
        again = exit_at + dt.timedelta(days=rng.uniform(5, 60))
        if again < end:
            p.risk = list(rng.choice(ENTRY_PROFILES[:4])[1])
            yield from _episode(p, again, end, readmission=True)


def _allowed_from(policy: Policy, level: str) -> set[str]:
    return {dest for dest, sources in policy.allowed_moves.items() if level in sources}


def _one_step_lower(policy: Policy, level: str, current: str) -> str | None:
    """The next less intensive non-WM level than `level` the patient may move to."""
    rank = policy.level(level).rank
    candidates = [
        lv
        for lv in policy.levels
        if lv.rank < rank
        and not lv.withdrawal_management
        and lv.code in _allowed_from(policy, current)
        and lv.code not in (current, "aftercare")
    ]
    return max(candidates, key=lambda lv: lv.rank).code if candidates else None


def _journey(p: _Patient, start: dt.datetime, end: dt.datetime) -> Journey:
    yield from _episode(p, start, end, readmission=False)


def _consent_journey(
    rng: random.Random,
    key: str,
    actor: Actor,
    report: SimulationReport,
    when: dt.datetime,
    end: dt.datetime,
    number: int,
) -> Journey:
    """A consent to one organization some days after admission; now and then a revocation."""
    org = rng.choice(CONSENT_ORGS)
    purposes = [ConsentPurpose.TREATMENT, *rng.sample(list(ConsentPurpose)[1:], rng.randint(0, 2))]
    expires = rng.random() < 0.3
    revoke_at = when + dt.timedelta(days=rng.uniform(3, 60))
    revoke = rng.random() < REVOKED_SHARE
    consent_id = f"sim-consent-{number:06d}"
    result = yield (
        when,
        c.GiveConsent(
            patient_key=key,
            consent_id=consent_id,
            recipient_org=org,
            purposes=purposes,
            given_on=when.date(),
            expires_on=(when + dt.timedelta(days=365)).date() if expires else None,
            document_ref=f"sim-form-{number:06d}",
            occurred_at=when,
        ),
        CommandContext(actor=actor),
    )
    if isinstance(result, ContinuumError):
        return
    report.consents["given"] += 1
    if not revoke or revoke_at >= end:
        return
    result = yield (
        revoke_at,
        c.RevokeConsent(
            patient_key=key,
            consent_id=consent_id,
            revoked_on=revoke_at.date(),
            occurred_at=revoke_at,
        ),
        CommandContext(actor=actor),
    )
    if isinstance(result, AppendResult):
        report.consents["revoked"] += 1


def simulate_cohort(
    service: PatientService,
    *,
    patients: int,
    days: int,
    seed: int,
    end: dt.datetime | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> SimulationReport:
    """Simulate `patients` journeys over the `days` before `end` (default: now)."""
    rng = random.Random(seed)
    policy = service.policies.default
    end = end or service.clock()
    start = end - dt.timedelta(days=days)
    report = SimulationReport(patients=patients, days=days, seed=seed)
    heap: list[tuple[dt.datetime, int, c.Command, CommandContext]] = []
    journeys: dict[int, Journey] = {}
    consent_rng = random.Random(f"consents:{seed}")  # its own stream: journeys stay the same
    for n in range(patients):
        weights = [w for w, _ in ENTRY_PROFILES]
        profile = rng.choices([prof for _, prof in ENTRY_PROFILES], weights=weights)[0]
        patient = _Patient(
            rng=random.Random(rng.getrandbits(64)),
            policy=policy,
            key=new_patient_key(),  # random: re-running never collides with a cohort
            risk=[max(0.0, r + rng.gauss(0, 0.25)) for r in profile],
            age_group="adolescent" if rng.random() < 0.08 else "adult",
            actor=Actor(id=rng.choice(CASE_MANAGERS), role=ActorRole.CASE_MANAGER),
            report=report,
        )
        arrival = start + dt.timedelta(days=rng.uniform(0, days * 0.7), hours=rng.uniform(7, 18))
        journey = _journey(patient, arrival, end)
        journeys[n] = journey
        first = next(journey, None)
        if first is not None:
            heapq.heappush(heap, (first[0], n, first[1], first[2]))
        consents = consent_rng.random() < CONSENT_SHARE
        given_at = arrival + dt.timedelta(hours=consent_rng.uniform(1, 24 * 10))
        if consents and first is not None and given_at < end:
            journey = _consent_journey(
                random.Random(consent_rng.getrandbits(64)),
                patient.key,
                patient.actor,
                report,
                given_at,
                end,
                n,
            )
            journeys[patients + n] = journey
            first = next(journey)
            heapq.heappush(heap, (first[0], patients + n, first[1], first[2]))
    expected_total = max(len(heap) * 12, 1)
    began = time.perf_counter()
    while heap:
        when, n, command, ctx = heapq.heappop(heap)
        outcome: Outcome
        try:
            outcome = service.handle(command, ctx)
            report.events += len(outcome.events)
        except ContinuumError as exc:
            outcome = exc
        report.commands += 1
        try:
            following = journeys[n].send(outcome)
        except StopIteration:
            following = None
        if following is not None:
            if following[0] < when:  # journeys only move forward in time
                raise AssertionError(f"journey {n} went back in time: {following[0]} < {when}")
            heapq.heappush(heap, (following[0], n, following[1], following[2]))
        if progress is not None and (report.commands % 200 == 0 or not heap):
            elapsed = time.perf_counter() - began
            expected_total = max(expected_total, report.commands + len(heap))
            total = report.commands if not heap else expected_total
            progress(report.commands, total, report.commands / elapsed if elapsed else 0.0)
    report.seconds = time.perf_counter() - began
    return report
