"""Consent to disclose a patient's records to one organization (42 CFR Part 2), through the
application service on the in-memory store: giving, revoking, the fold (live and on replay),
and every refusal with its rule, field and values.

Each refusal is also checked to leave the event store exactly as it was (stream version
included).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from continuum.adapters.memory import InMemoryEventStore
from continuum.application.disclosure import ConsentBook
from continuum.application.ports import AppendResult
from continuum.application.service import CommandContext, PatientService
from continuum.domain import commands as c
from continuum.domain.errors import (
    ConcurrencyConflict,
    ContinuumError,
    Duplicate,
    InvalidClinicalTime,
    InvalidInput,
    InvalidStateForCommand,
    UnknownConsent,
    UnknownPatient,
)
from continuum.domain.patient import Consent, PatientState, new_state_after, replay
from continuum.domain.policy import PolicyRegistry
from continuum_events import (
    Actor,
    ActorRole,
    AgeGroup,
    ConsentGiven,
    ConsentPurpose,
    ConsentRevoked,
    DischargeReason,
    Disposition,
    PatientEvent,
    VoidReason,
)
from tests.support import FixedClock, assessment, day

TREATMENT = ConsentPurpose.TREATMENT
PAYMENT = ConsentPurpose.PAYMENT
HCO = ConsentPurpose.HEALTH_CARE_OPERATIONS
UNKNOWN_KEY = "pk-" + "a" * 20
#: The service clock in these tests: ten days after admission, 09:00 UTC.
NOW = day(10)
TODAY = NOW.date()


def days_from_today(n: int) -> dt.date:
    return TODAY + dt.timedelta(days=n)


@dataclass
class Env:
    clock: FixedClock
    store: InMemoryEventStore
    service: PatientService
    policies: PolicyRegistry

    def handle(self, command: c.Command, ctx: CommandContext | None = None) -> AppendResult:
        return self.service.handle(command, ctx)

    def one(self, command: c.Command, ctx: CommandContext | None = None) -> PatientEvent:
        result = self.handle(command, ctx)
        assert len(result.events) == 1
        return result.events[0]

    def admit(self) -> str:
        """A patient admitted at day 0; the clock then stands at NOW."""
        self.clock.now = day(0)
        result = self.handle(
            c.Admit(
                level="3.5",
                site="s1",
                age_group=AgeGroup.ADULT,
                assessment=assessment("001040"),
            )
        )
        self.clock.now = NOW
        return result.stream_id

    def give(
        self,
        key: str,
        consent_id: str = "c-1",
        org: str = "hie-north",
        purposes: list[ConsentPurpose] | None = None,
        document_ref: str = "form-1",
        ctx: CommandContext | None = None,
        **kwargs: Any,
    ) -> ConsentGiven:
        event = self.one(
            c.GiveConsent(
                patient_key=key,
                consent_id=consent_id,
                recipient_org=org,
                purposes=[TREATMENT] if purposes is None else purposes,
                document_ref=document_ref,
                **kwargs,
            ),
            ctx,
        )
        assert isinstance(event, ConsentGiven)
        return event

    def revoke(self, key: str, consent_id: str = "c-1", **kwargs: Any) -> ConsentRevoked:
        event = self.one(c.RevokeConsent(patient_key=key, consent_id=consent_id, **kwargs))
        assert isinstance(event, ConsentRevoked)
        return event

    def void(self, key: str, event: PatientEvent) -> PatientEvent:
        return self.one(
            c.VoidEvent(
                patient_key=key, event_id=event.event_id, reason=VoidReason.ENTERED_IN_ERROR
            )
        )

    def state(self, key: str) -> PatientState:
        return self.service.load(key)

    def version(self, key: str) -> int:
        return len(self.store.read_stream(key))

    @contextmanager
    def refused(
        self, error: type[ContinuumError], match: str | None = None
    ) -> Iterator[pytest.ExceptionInfo[ContinuumError]]:
        """The block must raise `error`, and the store must not change."""
        head = self.store.head_position()
        streams = {key: self.store.read_stream(key) for key in self.store.stream_ids()}
        versions = {key: len(events) for key, events in streams.items()}
        with pytest.raises(error, match=match) as info:
            yield info
        assert self.store.head_position() == head
        assert self.store.stream_ids() == sorted(streams)
        assert {key: self.version(key) for key in streams} == versions
        assert {key: self.store.read_stream(key) for key in streams} == streams


@pytest.fixture
def env(policies: PolicyRegistry) -> Env:
    clock = FixedClock(NOW)
    store = InMemoryEventStore()
    return Env(clock, store, PatientService(store, policies, clock=clock), policies)


@pytest.fixture
def key(env: Env) -> str:
    return env.admit()


# -- giving -----------------------------------------------------------------------------------


def test_give_consent(env: Env, key: str) -> None:
    before = env.state(key)
    actor = Actor(id="clin-7", role=ActorRole.CLINICIAN)
    event = env.give(
        key,
        "c-2026-01",
        "hie-north",
        [TREATMENT, PAYMENT],
        "form-88",
        ctx=CommandContext(actor=actor),
    )
    assert event.event_type == "ConsentGiven"
    assert (event.stream_id, event.stream_version, event.position) == (key, 2, 2)
    assert (event.occurred_at, event.recorded_at) == (NOW, NOW)
    assert event.policy is None
    assert event.actor == actor
    data = event.data
    assert data.consent_id == "c-2026-01"
    assert data.recipient_org == "hie-north"
    assert data.purposes == [TREATMENT, PAYMENT]
    assert data.given_on == TODAY  # the service's date when none is given
    assert data.expires_on is None
    assert data.document_ref == "form-88"
    assert env.store.read_stream(key)[-1] == event

    state = env.state(key)
    assert state.version == 2
    assert state.consents == {
        "c-2026-01": Consent(
            consent_id="c-2026-01",
            recipient_org="hie-north",
            purposes=(TREATMENT, PAYMENT),
            given_on=TODAY,
            expires_on=None,
            document_ref="form-88",
            event_id=event.event_id,
        )
    }
    assert state.consents["c-2026-01"].status(TODAY) == "active"
    # a consent governs disclosure, not care: the level-of-care state is untouched
    assert (state.state, state.site, state.program) == (before.state, before.site, before.program)
    assert (state.episode, state.placed_at) == (before.episode, before.placed_at)
    assert state.changes == before.changes
    assert state.assessments == before.assessments


def test_give_consent_with_dates(env: Env, key: str) -> None:
    event = env.give(
        key,
        given_on=day(3).date(),
        expires_on=day(40).date(),
        occurred_at=day(9),
    )
    assert event.data.given_on == day(3).date()
    assert event.data.expires_on == day(40).date()
    assert event.occurred_at == day(9)
    assert event.recorded_at == NOW
    consent = env.state(key).consents["c-1"]
    assert (consent.given_on, consent.expires_on) == (day(3).date(), day(40).date())


@pytest.mark.parametrize(
    ("given", "recorded"),
    [
        ([TREATMENT], (TREATMENT,)),
        ([HCO, TREATMENT], (TREATMENT, HCO)),
        ([PAYMENT, HCO, TREATMENT], (TREATMENT, PAYMENT, HCO)),
        ([HCO, PAYMENT], (PAYMENT, HCO)),
        ([PAYMENT, PAYMENT, TREATMENT, PAYMENT], (TREATMENT, PAYMENT)),
    ],
)
def test_purposes_recorded_without_repeats_in_enum_order(
    env: Env, key: str, given: list[ConsentPurpose], recorded: tuple[ConsentPurpose, ...]
) -> None:
    event = env.give(key, purposes=given)
    assert event.data.purposes == list(recorded)
    assert env.state(key).consents["c-1"].purposes == recorded


def test_purposes_given_as_strings(env: Env, key: str) -> None:
    command = c.GiveConsent.model_validate(
        {
            "patient_key": key,
            "consent_id": "c-1",
            "recipient_org": "hie-north",
            "purposes": ["health_care_operations", "treatment"],
            "document_ref": "form-1",
        }
    )
    [event] = env.handle(command).events
    assert isinstance(event, ConsentGiven)
    assert event.data.purposes == [TREATMENT, HCO]


def test_unknown_purpose_is_refused_by_the_command(key: str) -> None:
    with pytest.raises(ValidationError, match=r"purposes\.0"):
        c.GiveConsent.model_validate(
            {
                "patient_key": key,
                "consent_id": "c-1",
                "recipient_org": "hie-north",
                "purposes": ["research"],
                "document_ref": "form-1",
            }
        )


def test_expires_on_the_day_given(env: Env, key: str) -> None:
    event = env.give(key, given_on=days_from_today(-2), expires_on=days_from_today(-2))
    assert event.data.expires_on == event.data.given_on == days_from_today(-2)


@pytest.mark.parametrize("org", ["a", "0", "hie-north", "org-2", "a" * 63, "a-b-c", "9-lives"])
def test_well_formed_org_codes(env: Env, key: str, org: str) -> None:
    assert env.give(key, org=org).data.recipient_org == org
    assert env.state(key).consents["c-1"].recipient_org == org


def test_give_consent_to_a_discharged_patient(env: Env, key: str) -> None:
    env.handle(
        c.Discharge(patient_key=key, reason=DischargeReason.COMPLETED, disposition=Disposition.HOME)
    )
    discharged = env.state(key)
    event = env.give(key)
    assert event.stream_version == 3
    state = env.state(key)
    assert state.state == discharged.state == env.policies.default.terminal_state
    assert list(state.consents) == ["c-1"]


def test_several_consents_to_the_same_org(env: Env, key: str) -> None:
    first = env.give(key, "c-1", purposes=[TREATMENT])
    second = env.give(key, "c-2", purposes=[PAYMENT])
    env.revoke(key, "c-1")
    consents = env.state(key).consents
    assert list(consents) == ["c-1", "c-2"]
    assert consents["c-1"].event_id == first.event_id
    assert consents["c-1"].status(TODAY) == "revoked"
    assert consents["c-2"].event_id == second.event_id
    assert consents["c-2"].status(TODAY) == "active"
    assert consents["c-2"].revoked_by is None


def test_give_with_an_idempotency_key_records_once(env: Env, key: str) -> None:
    ctx = CommandContext(idempotency_key="give-c-1")
    command = c.GiveConsent(
        patient_key=key,
        consent_id="c-1",
        recipient_org="hie-north",
        purposes=[TREATMENT],
        document_ref="form-1",
    )
    first = env.handle(command, ctx)
    again = env.handle(command, ctx)
    assert (first.replayed, again.replayed) == (False, True)
    assert again.events == first.events
    assert env.version(key) == 2


# -- revoking ---------------------------------------------------------------------------------


def test_give_then_revoke(env: Env, key: str) -> None:
    given = env.give(key, "c-1", "hie-north", [TREATMENT], given_on=days_from_today(-4))
    env.clock.advance(days=2)
    revoked = env.revoke(key, "c-1")
    assert revoked.event_type == "ConsentRevoked"
    assert (revoked.stream_id, revoked.stream_version) == (key, 3)
    assert (revoked.occurred_at, revoked.recorded_at) == (env.clock.now, env.clock.now)
    assert revoked.policy is None
    assert revoked.data.consent_id == "c-1"
    assert revoked.data.recipient_org == "hie-north"  # copied from the consent
    assert revoked.data.revoked_on == days_from_today(2)  # the service's date

    consent = env.state(key).consents["c-1"]
    assert consent.revoked_on == days_from_today(2)
    assert consent.revoked_by == revoked.event_id
    assert consent.event_id == given.event_id
    assert consent.given_on == days_from_today(-4)
    assert consent.status(days_from_today(2)) == "revoked"
    assert consent.status(days_from_today(-1)) == "revoked"  # the log has no "as of" for it


def test_revoke_with_a_date(env: Env, key: str) -> None:
    env.give(key, given_on=days_from_today(-5))
    revoked = env.revoke(key, revoked_on=days_from_today(-1), occurred_at=NOW - dt.timedelta(1))
    assert revoked.data.revoked_on == days_from_today(-1)
    assert revoked.occurred_at == NOW - dt.timedelta(days=1)
    assert env.state(key).consents["c-1"].revoked_on == days_from_today(-1)


def test_revoke_on_the_day_given(env: Env, key: str) -> None:
    env.give(key, given_on=days_from_today(-3))
    assert env.revoke(key, revoked_on=days_from_today(-3)).data.revoked_on == days_from_today(-3)


def test_revoke_an_expired_consent(env: Env, key: str) -> None:
    env.give(key, given_on=days_from_today(-9), expires_on=days_from_today(-2))
    assert env.state(key).consents["c-1"].status(TODAY) == "expired"
    revoked = env.revoke(key)
    consent = env.state(key).consents["c-1"]
    assert consent.revoked_by == revoked.event_id
    assert consent.status(TODAY) == "revoked"


def test_consent_status_by_date(env: Env, key: str) -> None:
    env.give(key, given_on=days_from_today(-1), expires_on=days_from_today(5))
    consent = env.state(key).consents["c-1"]
    assert consent.status(TODAY) == "active"
    assert consent.status(days_from_today(5)) == "active"  # expires_on is the last day in force
    assert consent.status(days_from_today(6)) == "expired"


# -- the fold ---------------------------------------------------------------------------------


def test_consents_after_replay(env: Env, key: str) -> None:
    north = env.give(key, "c-1", "hie-north", [PAYMENT, TREATMENT], "form-1")
    env.clock.advance(days=1)
    south = env.give(
        key,
        "c-2",
        "payer-south",
        [HCO],
        "form-2",
        given_on=days_from_today(0),
        expires_on=days_from_today(90),
    )
    env.clock.advance(days=1)
    state_before = env.state(key)
    result = env.handle(c.RevokeConsent(patient_key=key, consent_id="c-1"))
    [revoked] = result.events

    expected = {
        "c-1": Consent(
            consent_id="c-1",
            recipient_org="hie-north",
            purposes=(TREATMENT, PAYMENT),
            given_on=TODAY,
            expires_on=None,
            document_ref="form-1",
            event_id=north.event_id,
            revoked_on=days_from_today(2),
            revoked_by=revoked.event_id,
        ),
        "c-2": Consent(
            consent_id="c-2",
            recipient_org="payer-south",
            purposes=(HCO,),
            given_on=TODAY,
            expires_on=days_from_today(90),
            document_ref="form-2",
            event_id=south.event_id,
        ),
    }
    replayed = replay(key, env.store.read_stream(key), env.policies)
    assert replayed.consents == expected
    assert list(replayed.consents) == ["c-1", "c-2"]  # in the order given
    assert replayed.version == 4
    assert {e: t for e, t in replayed.event_types.items() if t.startswith("Consent")} == {
        north.event_id: "ConsentGiven",
        south.event_id: "ConsentGiven",
        revoked.event_id: "ConsentRevoked",
    }
    # the live path (state + appended events) equals the rebuilt one
    live = new_state_after(state_before, result.events)
    assert live == replayed
    assert state_before.consents["c-1"].revoked_by is None  # the copy left the original alone
    assert env.state(key) == replayed


def test_the_fold_ignores_a_revocation_of_a_consent_it_does_not_know(env: Env, key: str) -> None:
    other = env.admit()
    env.give(other, "c-9")
    [revoked] = env.handle(c.RevokeConsent(patient_key=other, consent_id="c-9")).events
    # the fold trusts recorded events: one for an unknown consent changes no consent
    state = env.state(key)
    moved = revoked.model_copy(update={"stream_id": key, "stream_version": state.version + 1})
    state.apply(moved)
    assert state.version == 2
    assert state.consents == {}
    assert state.event_types[revoked.event_id] == "ConsentRevoked"


# -- refusals: giving -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "org",
    [
        "",
        "HIE-North",
        "hie_north",
        "hie.north",
        "hie north",
        "-hie",
        "hie-",
        "a" * 64,
        "hie-north\n",
        "hié",
        "hie/north",
    ],
)
def test_give_with_a_malformed_org(env: Env, key: str, org: str) -> None:
    with env.refused(InvalidInput, match="recipient organization code .* is malformed") as info:
        env.give(key, org=org)
    assert type(info.value) is InvalidInput
    assert info.value.rule == "consent.org_malformed"
    assert info.value.field == "recipient_org"
    assert repr(org) in info.value.message
    assert env.state(key).consents == {}


def test_a_long_malformed_org_is_cut_short_in_the_message(env: Env, key: str) -> None:
    org = "x" * 200
    with env.refused(InvalidInput) as info:
        env.give(key, org=org)
    assert info.value.rule == "consent.org_malformed"
    assert repr("x" * 67 + "...") in info.value.message
    assert org not in info.value.message


def test_give_with_a_consent_id_already_used(env: Env, key: str) -> None:
    first = env.give(key, "c-1", "hie-north")
    with env.refused(Duplicate, match="already has a consent c-1: consent ids") as info:
        env.give(key, "c-1", "payer-south", [PAYMENT], "form-2")
    assert info.value.rule == "consent.id_used"
    assert info.value.field == "consent_id"
    assert info.value.details == {"consent_id": "c-1"}
    assert env.state(key).consents["c-1"].event_id == first.event_id


def test_a_revoked_consent_id_is_not_reused(env: Env, key: str) -> None:
    env.give(key, "c-1")
    env.revoke(key, "c-1")
    with env.refused(Duplicate) as info:
        env.give(key, "c-1")
    assert info.value.rule == "consent.id_used"
    assert info.value.details == {"consent_id": "c-1"}


def test_the_same_consent_id_on_another_patient(env: Env, key: str) -> None:
    other = env.admit()
    env.give(key, "c-1")
    assert env.give(other, "c-1").stream_id == other


def test_give_without_a_purpose(env: Env, key: str) -> None:
    with env.refused(
        InvalidInput,
        match="at least one purpose: treatment, payment, health_care_operations",
    ) as info:
        env.give(key, purposes=[])
    assert type(info.value) is InvalidInput
    assert info.value.rule == "consent.no_purpose"
    assert info.value.field == "purposes"


def test_give_dated_in_the_future(env: Env, key: str) -> None:
    tomorrow = days_from_today(1)
    with env.refused(
        InvalidClinicalTime,
        match=re.escape(f"given_on {tomorrow} is in the future (service date {TODAY})"),
    ) as info:
        env.give(key, given_on=tomorrow)
    assert info.value.rule == "consent.given_in_future"
    assert info.value.field == "given_on"
    assert info.value.details == {"given_on": str(tomorrow)}


def test_given_on_may_be_tomorrow_within_the_clock_skew(env: Env, key: str) -> None:
    env.clock.now = dt.datetime.combine(TODAY, dt.time(23, 56), tzinfo=dt.UTC)
    assert env.give(key, "c-1", given_on=days_from_today(1)).data.given_on == days_from_today(1)
    env.clock.now = dt.datetime.combine(TODAY, dt.time(23, 54), tzinfo=dt.UTC)
    with env.refused(InvalidClinicalTime) as info:
        env.give(key, "c-2", given_on=days_from_today(1))
    assert info.value.rule == "consent.given_in_future"


def test_default_dates_are_the_service_date_not_the_skewed_one(env: Env, key: str) -> None:
    env.clock.now = dt.datetime.combine(TODAY, dt.time(23, 58), tzinfo=dt.UTC)
    assert env.give(key).data.given_on == TODAY
    assert env.revoke(key).data.revoked_on == TODAY


@pytest.mark.parametrize(
    ("given_on", "expires_on"),
    [(-3, -4), (0, -1), (-30, -31)],
)
def test_give_expiring_before_given(env: Env, key: str, given_on: int, expires_on: int) -> None:
    given, expires = days_from_today(given_on), days_from_today(expires_on)
    with env.refused(
        InvalidInput, match=f"expires_on {expires} is before given_on {given}"
    ) as info:
        env.give(key, given_on=given, expires_on=expires)
    assert type(info.value) is InvalidInput
    assert info.value.rule == "consent.expires_before_given"
    assert info.value.field == "expires_on"
    assert info.value.details == {"given_on": str(given), "expires_on": str(expires)}


def test_give_expiring_before_the_default_given_on(env: Env, key: str) -> None:
    with env.refused(InvalidInput) as info:
        env.give(key, expires_on=days_from_today(-1))
    assert info.value.rule == "consent.expires_before_given"
    assert info.value.details == {
        "given_on": str(TODAY),
        "expires_on": str(days_from_today(-1)),
    }


def test_give_occurring_in_the_future(env: Env, key: str) -> None:
    with env.refused(InvalidClinicalTime, match="is in the future") as info:
        env.give(key, occurred_at=NOW + dt.timedelta(minutes=6))
    assert info.value.rule == "time.invalid"
    assert info.value.field == "occurred_at"


def test_give_at_a_stale_expected_version(env: Env, key: str) -> None:
    with env.refused(ConcurrencyConflict) as info:
        env.give(key, expected_version=0)
    assert info.value.rule == "stream.version_conflict"
    assert info.value.details == {"stream_id": key, "expected": 0, "actual": 1}


def test_give_to_an_unknown_patient(env: Env, key: str) -> None:
    with env.refused(UnknownPatient, match=f"no patient with key {UNKNOWN_KEY}") as info:
        env.give(UNKNOWN_KEY)
    assert info.value.rule == "patient.unknown"
    assert info.value.field == "patient_key"
    assert info.value.details == {"patient": UNKNOWN_KEY}
    assert UNKNOWN_KEY not in env.store.stream_ids()


def test_unknown_patient_is_checked_before_the_org(env: Env) -> None:
    with env.refused(UnknownPatient):
        env.give(UNKNOWN_KEY, org="Not An Org")


# -- refusals: revoking -----------------------------------------------------------------------


def test_revoke_an_unknown_consent(env: Env, key: str) -> None:
    env.give(key, "c-1")
    with env.refused(UnknownConsent, match=f"patient {key} has no consent c-2") as info:
        env.revoke(key, "c-2")
    assert info.value.rule == "consent.unknown"
    assert info.value.field == "consent_id"
    assert info.value.details == {"consent_id": "c-2"}
    assert env.state(key).consents["c-1"].revoked_by is None


def test_revoke_another_patients_consent(env: Env, key: str) -> None:
    other = env.admit()
    env.give(other, "c-1")
    with env.refused(UnknownConsent) as info:
        env.revoke(key, "c-1")
    assert info.value.rule == "consent.unknown"
    assert env.state(other).consents["c-1"].revoked_by is None


def test_revoke_twice(env: Env, key: str) -> None:
    env.give(key, given_on=days_from_today(-3))
    first = env.revoke(key, revoked_on=days_from_today(-1))
    with env.refused(
        Duplicate, match=f"consent c-1 was already revoked on {days_from_today(-1)}"
    ) as info:
        env.revoke(key)
    assert info.value.rule == "consent.already_revoked"
    assert info.value.field == "consent_id"
    assert info.value.details == {"consent_id": "c-1", "revoked_on": str(days_from_today(-1))}
    assert env.state(key).consents["c-1"].revoked_by == first.event_id


def test_revoke_dated_in_the_future(env: Env, key: str) -> None:
    env.give(key)
    tomorrow = days_from_today(1)
    with env.refused(
        InvalidClinicalTime,
        match=re.escape(f"revoked_on {tomorrow} is in the future (service date {TODAY})"),
    ) as info:
        env.revoke(key, revoked_on=tomorrow)
    assert info.value.rule == "consent.revoked_in_future"
    assert info.value.field == "revoked_on"
    assert info.value.details == {"revoked_on": str(tomorrow)}
    assert env.state(key).consents["c-1"].status(TODAY) == "active"


def test_revoke_dated_before_given(env: Env, key: str) -> None:
    given, revoked = days_from_today(-3), days_from_today(-4)
    env.give(key, given_on=given)
    with env.refused(
        InvalidClinicalTime, match=f"revoked_on {revoked} is before the consent was given"
    ) as info:
        env.revoke(key, revoked_on=revoked)
    assert info.value.rule == "consent.revoked_before_given"
    assert info.value.field == "revoked_on"
    assert info.value.details == {"revoked_on": str(revoked), "given_on": str(given)}


def test_revoke_occurring_in_the_future(env: Env, key: str) -> None:
    env.give(key)
    with env.refused(InvalidClinicalTime) as info:
        env.revoke(key, occurred_at=NOW + dt.timedelta(hours=1))
    assert info.value.rule == "time.invalid"
    assert info.value.field == "occurred_at"


def test_revoke_for_an_unknown_patient(env: Env, key: str) -> None:
    with env.refused(UnknownPatient, match=f"no patient with key {UNKNOWN_KEY}") as info:
        env.revoke(UNKNOWN_KEY)
    assert info.value.rule == "patient.unknown"
    assert info.value.field == "patient_key"
    assert info.value.details == {"patient": UNKNOWN_KEY}
    assert UNKNOWN_KEY not in env.store.stream_ids()


# -- consent events cannot be voided ----------------------------------------------------------


def test_void_a_consent_given(env: Env, key: str) -> None:
    given = env.give(key)
    with env.refused(InvalidStateForCommand, match="a consent is ended by revoking it") as info:
        env.void(key, given)
    assert info.value.rule == "void.consent_event"
    assert info.value.field == "event_id"
    assert info.value.details == {"event_id": str(given.event_id)}
    state = env.state(key)
    assert state.voided == set()
    assert state.consents["c-1"].status(TODAY) == "active"


def test_void_a_consent_revoked(env: Env, key: str) -> None:
    env.give(key)
    revoked = env.revoke(key)
    with env.refused(InvalidStateForCommand) as info:
        env.void(key, revoked)
    assert info.value.rule == "void.consent_event"
    assert info.value.field == "event_id"
    assert info.value.details == {"event_id": str(revoked.event_id)}
    assert env.state(key).consents["c-1"].revoked_by == revoked.event_id


def test_other_events_stay_voidable_beside_consents(env: Env, key: str) -> None:
    env.give(key)
    attended = env.one(
        c.RecordAttendance(patient_key=key, service_date=TODAY, hours=3, occurred_at=NOW)
    )
    void = env.void(key, attended)
    assert void.event_type == "EventVoided"
    assert env.state(key).voided == {attended.event_id}
    assert list(env.state(key).consents) == ["c-1"]


# -- the consent book a disclosure publisher keeps ------------------------------------------


def _governing_by_type(env: Env, org: str) -> list[tuple[str, str | None]]:
    """Feed the whole log to a `ConsentBook` for `org`: (event type, governing consent id)."""
    book = ConsentBook(org)
    seen: list[tuple[str, str | None]] = []
    for wire in env.store.iter_wire():
        governing = book.observe(wire)
        seen.append((wire.event_type, governing.consent_id if governing else None))
    return seen


def test_a_revocation_is_disclosed_under_the_consent_it_revokes(env: Env, key: str) -> None:
    env.give(key, "c-1", "hie-north", given_on=days_from_today(-3))
    env.give(key, "c-2", "hie-north", given_on=days_from_today(-2))
    env.give(key, "c-9", "payer-east")  # another organization's: never seen by hie-north
    env.revoke(key, "c-1")
    env.revoke(key, "c-2")
    assert _governing_by_type(env, "hie-north") == [
        ("PatientAdmitted", None),
        ("ConsentGiven", "c-1"),
        ("ConsentGiven", "c-2"),
        ("ConsentGiven", None),
        ("ConsentRevoked", "c-1"),  # not c-2, although c-2 is the latest in force
        ("ConsentRevoked", "c-2"),
    ]


def test_a_revocation_of_an_expired_consent_falls_back_to_one_in_force(env: Env, key: str) -> None:
    env.give(key, "c-1", "hie-north", given_on=days_from_today(-9), expires_on=days_from_today(-1))
    env.give(key, "c-2", "hie-north", given_on=days_from_today(-2))
    env.revoke(key, "c-1")
    env.clock.advance(days=1)
    env.revoke(key, "c-2")
    env.handle(c.RecordAttendance(patient_key=key, service_date=TODAY, hours=3))
    governing = _governing_by_type(env, "hie-north")
    assert governing[-3:] == [
        ("ConsentRevoked", "c-2"),  # c-1 had expired: disclosed under c-2, still in force
        ("ConsentRevoked", "c-2"),
        ("AttendanceRecorded", None),  # nothing in force any more
    ]
