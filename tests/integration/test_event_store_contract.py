"""The EventStore contract (application/ports.py), run against every backend.

The `store` fixture is parametrized over the in-memory fake, SQLite and PostgreSQL, so each
test here proves the same guarantee three times.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence

import pytest

from continuum.application.ports import EventStore
from continuum.application.service import new_patient_key
from continuum.domain import commands as c
from continuum.domain.errors import ConcurrencyConflict, Duplicate
from continuum.domain.policy import PolicyRegistry
from continuum_events import Actor, ActorRole, PatientEvent
from tests.support import scratch_patient

IDENTITY = c.Identity(
    given_name="Zenobia",
    family_name="Quackenbush-Vale",
    birth_date=dt.date(1971, 3, 4),
    mrn="MRN-5550123",
)
IDENTITY_STRINGS = ("Zenobia", "Quackenbush", "MRN-5550123", "1971-03-04")

MakeStream = Callable[..., list[PatientEvent]]


@pytest.fixture
def make_stream(policies: PolicyRegistry) -> MakeStream:
    """Realistic events for one new patient, built by the service on a scratch store.

    Returns an admission followed by `attendances` attendance records, unpositioned, ready to be
    appended to the store under test with `expected_version=0`.
    """

    def make(attendances: int = 2, *, actor: Actor | None = None) -> list[PatientEvent]:
        return scratch_patient(policies, attendances, actor=actor)

    return make


def restream(events: Sequence[PatientEvent], stream_id: str, first_version: int = 1):
    """The same events for another stream, with fresh event ids."""
    return [
        e.model_copy(update={"event_id": uuid.uuid4(), "stream_id": stream_id, "stream_version": v})
        for v, e in enumerate(events, start=first_version)
    ]


def envelope(event: PatientEvent) -> dict[str, object]:
    return event.model_dump(exclude={"position"})


def export(store: EventStore) -> list[str]:
    return [json.dumps(e.to_json_dict()) for e in store.iter_all()]


def state_of(store: EventStore) -> tuple[int, list[str], list[str]]:
    """Everything an append could have changed, for "nothing was written" checks."""
    ids = [str(e.event_id) for e in store.iter_all()]
    return store.head_position(), store.stream_ids(), ids


# -- round trip --------------------------------------------------------------------------------


def test_append_then_read_stream_round_trips_every_envelope_field(
    store: EventStore, make_stream: MakeStream
) -> None:
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    events = make_stream(2, actor=Actor(id="clin-42", role=ActorRole.CLINICIAN))
    # A non-UTC offset and microseconds: the store may normalize to UTC but not lose the instant.
    events[1] = events[1].model_copy(
        update={"occurred_at": dt.datetime(2026, 1, 6, 14, 30, 15, 123456, tzinfo=india)}
    )
    pk = events[0].stream_id

    result = store.append(pk, 0, events)

    assert result.stream_id == pk
    assert result.stream_version == 3
    assert result.replayed is False
    assert [e.event_id for e in result.events] == [e.event_id for e in events]
    stored = store.read_stream(pk)
    assert len(stored) == len(events)
    for original, back in zip(events, stored, strict=True):
        assert type(back) is type(original)
        assert back.event_id == original.event_id
        assert back.event_type == original.event_type
        assert back.schema_version == original.schema_version
        assert back.stream_id == original.stream_id == pk
        assert back.stream_version == original.stream_version
        for field in ("occurred_at", "recorded_at"):
            value = getattr(back, field)
            assert value.tzinfo is not None, field
            assert value.utcoffset() is not None, field
            assert value == getattr(original, field), field
        assert back.actor == original.actor == Actor(id="clin-42", role=ActorRole.CLINICIAN)
        assert back.correlation_id == original.correlation_id
        assert back.causation_id == original.causation_id
        assert back.policy == original.policy
        assert back.data == original.data
        assert envelope(back) == envelope(original)
        assert back.position is not None
    assert stored[0].policy is not None  # the admission carries its policy reference
    assert stored[1].occurred_at == dt.datetime(2026, 1, 6, 9, 0, 15, 123456, tzinfo=dt.UTC)
    # The result and the global log carry the same positions as the stream.
    assert [e.position for e in result.events] == [e.position for e in stored]
    assert store.read_all() == stored


# -- global order ------------------------------------------------------------------------------


def _three_streams(store: EventStore, make_stream: MakeStream) -> dict[str, list[PatientEvent]]:
    """A: 3 events, B: 2, A: +1, C: 1 -> 7 events, streams interleaved in the global order."""
    a, b, cc = make_stream(3), make_stream(1), make_stream(0)
    pa, pb, pc = a[0].stream_id, b[0].stream_id, cc[0].stream_id
    store.append(pa, 0, a[:3])
    store.append(pb, 0, b)
    store.append(pa, 3, a[3:])
    store.append(pc, 0, cc)
    return {pa: a, pb: b, pc: cc}


def test_positions_are_dense_from_one_and_keep_each_streams_order(
    store: EventStore, make_stream: MakeStream
) -> None:
    streams = _three_streams(store, make_stream)

    log = store.read_all()
    assert [e.position for e in log] == list(range(1, 8))
    assert store.head_position() == 7
    assert sorted(str(e.event_id) for e in log) == sorted(
        str(e.event_id) for events in streams.values() for e in events
    )
    for stream_id, events in streams.items():
        in_log = [e for e in log if e.stream_id == stream_id]
        assert [e.stream_version for e in in_log] == list(range(1, len(events) + 1))
        assert [e.event_id for e in in_log] == [e.event_id for e in events]
        assert store.read_stream(stream_id) == in_log
    # Appends land in the order they were made.
    pa = next(iter(streams))
    assert [e.stream_id == pa for e in log] == [True, True, True, False, False, True, False]


def test_read_all_pages_by_after_and_limit(store: EventStore, make_stream: MakeStream) -> None:
    _three_streams(store, make_stream)
    everything = store.read_all()

    assert [e.position for e in store.read_all(0, 2)] == [1, 2]
    assert [e.position for e in store.read_all(2, 2)] == [3, 4]
    assert [e.position for e in store.read_all(after=4, limit=100)] == [5, 6, 7]
    assert [e.position for e in store.read_all(6, 1)] == [7]
    assert store.read_all(7) == []
    assert store.read_all(100) == []
    assert store.read_all(3, 3) == everything[3:6]

    assert list(store.iter_all(batch=2)) == everything
    assert list(store.iter_all(batch=1000)) == everything
    assert [e.position for e in store.iter_all(after=3, batch=2)] == [4, 5, 6, 7]
    assert list(store.iter_all(after=7)) == []


def test_shards_split_a_window_of_the_log_by_patient(
    store: EventStore, make_stream: MakeStream
) -> None:
    """A parallel rebuild's shards: together exactly the window's events, in order, each
    patient in one shard only."""
    for _ in range(4):
        _three_streams(store, make_stream)  # 12 patients, 28 events
    window = store.read_bodies(3, 20)
    assert [row[0] for row in window] == list(range(4, 24))
    for count in (2, 3):
        shards = [store.read_shard_bodies(3, 23, index, count) for index in range(count)]
        merged = sorted((row for shard in shards for row in shard), key=lambda row: row[0])
        assert merged == window
        for shard in shards:
            assert [row[0] for row in shard] == sorted(row[0] for row in shard)
        owners = [{row[1] for row in shard} for shard in shards]
        assert sum(len(o) for o in owners) == len(set().union(*owners))
    assert store.read_shard_bodies(28, 28, 0, 2) == []


def test_empty_store(store: EventStore) -> None:
    assert store.head_position() == 0
    assert store.read_all() == []
    assert list(store.iter_all()) == []
    assert store.stream_ids() == []
    assert store.read_stream(new_patient_key()) == []
    assert store.identity(new_patient_key()) is None
    assert store.find_idempotent("never-used") is None


def test_stream_ids_lists_every_stream_with_events(
    store: EventStore, make_stream: MakeStream
) -> None:
    streams = _three_streams(store, make_stream)
    assert store.stream_ids() == sorted(streams)


# -- optimistic concurrency ----------------------------------------------------------------------


def test_stale_expected_version_raises_conflict_with_expected_and_actual(
    store: EventStore, make_stream: MakeStream
) -> None:
    events = make_stream(3)
    pk = events[0].stream_id
    store.append(pk, 0, events[:3])
    before = state_of(store)

    # Someone else already wrote version 3: a writer that loaded version 2 is refused.
    stale = restream(events[2:3], pk, first_version=3)
    with pytest.raises(ConcurrencyConflict) as caught:
        store.append(pk, 2, stale)
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (pk, 2, 3)
    assert caught.value.rule == "stream.version_conflict"

    # Expecting a version the stream has not reached is a conflict too.
    ahead = restream(events[:1], pk, first_version=6)
    with pytest.raises(ConcurrencyConflict) as caught:
        store.append(pk, 5, ahead)
    assert (caught.value.expected, caught.value.actual) == (5, 3)

    assert state_of(store) == before
    assert [e.event_id for e in store.read_stream(pk)] == [e.event_id for e in events[:3]]

    # The right expected version still works afterwards.
    store.append(pk, 3, events[3:])
    assert len(store.read_stream(pk)) == 4


def test_conflict_when_stream_does_not_exist_and_expected_is_positive(
    store: EventStore, make_stream: MakeStream
) -> None:
    pk = new_patient_key()
    events = restream(make_stream(0), pk, first_version=3)
    with pytest.raises(ConcurrencyConflict) as caught:
        store.append(pk, 2, events)
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (pk, 2, 0)
    assert state_of(store) == (0, [], [])


# -- atomicity -----------------------------------------------------------------------------------


def test_append_is_atomic_when_the_second_event_has_a_stored_event_id(
    store: EventStore, make_stream: MakeStream
) -> None:
    first = make_stream(1)
    store.append(first[0].stream_id, 0, first)
    before = state_of(store)

    second = make_stream(1)
    pk = second[0].stream_id
    second[1] = second[1].model_copy(update={"event_id": first[1].event_id})
    with pytest.raises(Duplicate) as caught:
        store.append(pk, 0, second, identity=IDENTITY, idempotency_key="k-atomic")
    assert caught.value.rule == "event.duplicate_id"

    assert state_of(store) == before
    assert store.read_stream(pk) == []
    assert store.identity(pk) is None
    assert store.find_idempotent("k-atomic") is None


def test_append_is_atomic_when_the_second_event_repeats_the_first_events_id(
    store: EventStore, make_stream: MakeStream
) -> None:
    events = make_stream(1)
    pk = events[0].stream_id
    events[1] = events[1].model_copy(update={"event_id": events[0].event_id})
    with pytest.raises(Duplicate) as caught:
        store.append(pk, 0, events, identity=IDENTITY)
    assert caught.value.rule == "event.duplicate_id"
    assert state_of(store) == (0, [], [])
    assert store.identity(pk) is None


# -- idempotency -------------------------------------------------------------------------------


def test_same_idempotency_key_returns_the_first_result_and_writes_nothing(
    store: EventStore, make_stream: MakeStream
) -> None:
    events = make_stream(1)
    pk = events[0].stream_id
    first = store.append(pk, 0, events, idempotency_key="k-1", request_hash="h-1")
    assert first.replayed is False
    before = state_of(store)

    # A client retry: same key and command, same expected version, possibly new event ids.
    for retry in (events, restream(events, pk)):
        again = store.append(pk, 0, retry, idempotency_key="k-1", request_hash="h-1")
        assert again.replayed is True
        assert again.stream_id == pk
        assert again.stream_version == first.stream_version == 2
        assert [e.event_id for e in again.events] == [e.event_id for e in first.events]
        assert [envelope(e) for e in again.events] == [envelope(e) for e in first.events]
        assert state_of(store) == before

    found = store.find_idempotent("k-1", "h-1")
    assert found is not None
    assert found.replayed is True
    assert [e.event_id for e in found.events] == [e.event_id for e in events]
    assert store.find_idempotent("k-1") is not None  # no hash given: no comparison


def test_same_idempotency_key_with_a_different_request_is_a_duplicate(
    store: EventStore, make_stream: MakeStream
) -> None:
    events = make_stream(0)
    pk = events[0].stream_id
    store.append(pk, 0, events, idempotency_key="k-2", request_hash="h-1")
    before = state_of(store)

    other = make_stream(0)
    with pytest.raises(Duplicate) as caught:
        store.append(other[0].stream_id, 0, other, idempotency_key="k-2", request_hash="h-2")
    assert caught.value.rule == "idempotency.key_reused"
    with pytest.raises(Duplicate):
        store.append(pk, 1, restream(events, pk, 2), idempotency_key="k-2", request_hash="h-2")
    with pytest.raises(Duplicate):
        store.find_idempotent("k-2", "h-2")
    assert state_of(store) == before


# -- identity ----------------------------------------------------------------------------------


def test_identity_is_stored_apart_and_never_in_an_event(
    store: EventStore, make_stream: MakeStream
) -> None:
    events = make_stream(2)
    pk = events[0].stream_id
    store.append(pk, 0, events[:1], identity=IDENTITY)
    store.append(pk, 1, events[1:])

    assert store.identity(pk) == IDENTITY
    exported = export(store) + [json.dumps(e.to_json_dict()) for e in store.read_stream(pk)]
    assert len(exported) == 6
    for text in exported:
        for secret in IDENTITY_STRINGS:
            assert secret.lower() not in text.lower(), secret
        assert pk in text  # the pseudonymous key is what events carry


def test_identity_can_be_absent(store: EventStore, make_stream: MakeStream) -> None:
    events = make_stream(0)
    store.append(events[0].stream_id, 0, events)
    assert store.identity(events[0].stream_id) is None


def test_duplicate_mrn_is_refused_and_writes_nothing(
    store: EventStore, make_stream: MakeStream
) -> None:
    first = make_stream(0)
    owner = first[0].stream_id
    store.append(owner, 0, first, identity=IDENTITY)
    before = state_of(store)

    second = make_stream(1)
    pk = second[0].stream_id
    twin = IDENTITY.model_copy(update={"given_name": "Other", "family_name": "Person"})
    with pytest.raises(Duplicate) as caught:
        store.append(pk, 0, second, identity=twin, idempotency_key="k-mrn")
    assert caught.value.rule == "identity.duplicate_mrn"
    assert caught.value.field == "identity.mrn"

    assert state_of(store) == before
    assert store.read_stream(pk) == []
    assert store.identity(pk) is None
    assert store.identity(owner) == IDENTITY
    assert store.find_idempotent("k-mrn") is None

    # Without an MRN there is nothing to collide on.
    no_mrn = IDENTITY.model_copy(update={"mrn": None})
    store.append(pk, 0, second, identity=no_mrn)
    assert store.identity(pk) == no_mrn


# -- malformed appends -------------------------------------------------------------------------


def test_append_of_nothing_is_a_value_error(store: EventStore) -> None:
    with pytest.raises(ValueError, match="at least one event"):
        store.append(new_patient_key(), 0, [])
    assert state_of(store) == (0, [], [])


@pytest.mark.parametrize(
    ("expected_version", "versions"),
    [
        pytest.param(0, [2], id="first-event-not-v1"),
        pytest.param(0, [1, 3], id="gap-in-batch"),
        pytest.param(0, [1, 1], id="repeat-in-batch"),
        pytest.param(1, [1], id="does-not-follow-expected"),
    ],
)
def test_append_with_wrong_stream_version_is_a_value_error(
    store: EventStore, make_stream: MakeStream, expected_version: int, versions: list[int]
) -> None:
    template = make_stream(3)
    pk = template[0].stream_id
    if expected_version:
        store.append(pk, 0, template[:expected_version])
    before = state_of(store)
    events = [
        template[i].model_copy(update={"event_id": uuid.uuid4(), "stream_version": v})
        for i, v in enumerate(versions, start=expected_version)
    ]
    with pytest.raises(ValueError, match="expected"):
        store.append(pk, expected_version, events)
    assert state_of(store) == before


def test_append_of_an_event_for_another_stream_is_a_value_error(
    store: EventStore, make_stream: MakeStream
) -> None:
    events = make_stream(1)
    pk = events[0].stream_id
    events[1] = events[1].model_copy(update={"stream_id": new_patient_key()})
    with pytest.raises(ValueError, match=pk):
        store.append(pk, 0, events)
    assert state_of(store) == (0, [], [])


# -- identity look-ups and updates (inbound hospital feeds) ----------------------------------


def test_patient_key_is_found_by_mrn_and_identity_can_be_updated(
    store: EventStore, make_stream: MakeStream
) -> None:
    events = make_stream(0)
    pk = events[0].stream_id
    store.append(pk, 0, events, identity=IDENTITY)
    assert IDENTITY.mrn is not None
    assert store.patient_key_for_mrn(IDENTITY.mrn) == pk
    assert store.patient_key_for_mrn("NO-SUCH-MRN") is None

    renamed = IDENTITY.model_copy(update={"family_name": "Renamed"})
    store.update_identity(pk, renamed)
    assert store.identity(pk) == renamed
    assert store.read_stream(pk) == [
        e.model_copy(update={"position": p}) for p, e in enumerate(events, start=1)
    ]


def test_identity_update_cannot_take_another_patients_mrn(
    store: EventStore, make_stream: MakeStream
) -> None:
    first, second = make_stream(0), make_stream(0)
    store.append(first[0].stream_id, 0, first, identity=IDENTITY)
    store.append(second[0].stream_id, 0, second)
    with pytest.raises(Duplicate) as caught:
        store.update_identity(second[0].stream_id, IDENTITY)
    assert caught.value.rule == "identity.duplicate_mrn"
    assert store.identity(second[0].stream_id) is None
