"""The hash chain function, sealing and verification on the in-memory adapters.

The SQL adapters, tampering behind the service's back and the topic comparison are in
tests/integration/test_verify_chain.py and test_verify_topic.py."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace

import pytest

from continuum.adapters.memory import InMemoryEventStore, InMemoryLogSeals
from continuum.application.ports import Seal, SealConflict, WireEvent
from continuum.application.sealing import seal
from continuum.application.verify import (
    TopicMessage,
    compare_topic,
    parse_expected_head,
    verify_chain,
)
from continuum.domain.policy import PolicyRegistry
from continuum_events.chain import DOMAIN, GENESIS, chain_hash, is_chain_hash
from tests.support import scratch_patient

WIRE = b'{"event_id":"e1","position":1}'
H1 = chain_hash(GENESIS, 1, WIRE)


def test_genesis_is_64_zeros_and_the_layout_is_the_documented_one() -> None:
    assert GENESIS == "0" * 64
    assert DOMAIN == b"continuum-chain-v1\n"
    layout = b"continuum-chain-v1\n" + b"0" * 64 + b"\n1\n" + WIRE
    assert hashlib.sha256(layout).hexdigest() == H1
    assert is_chain_hash(H1)


def test_chain_hash_is_deterministic() -> None:
    assert chain_hash(GENESIS, 1, WIRE) == chain_hash(GENESIS, 1, bytes(WIRE)) == H1
    assert chain_hash(H1, 2, WIRE) == chain_hash(H1, 2, WIRE)


@pytest.mark.parametrize(
    ("previous", "position", "wire"),
    [
        ("1" + GENESIS[1:], 1, WIRE),  # another previous hash
        (GENESIS, 2, WIRE),  # another position
        (GENESIS, 1, WIRE.replace(b"e1", b"e2")),  # one byte of content
        (GENESIS, 1, WIRE + b" "),  # one byte more
        (GENESIS, 11, WIRE[1:]),  # position and wire shifted: the separators tell them apart
    ],
)
def test_chain_hash_changes_with_each_input(previous: str, position: int, wire: bytes) -> None:
    assert chain_hash(previous, position, wire) != H1


@pytest.mark.parametrize("previous", ["", "0" * 63, "G" * 64, GENESIS.upper().replace("0", "A")])
def test_a_malformed_previous_hash_is_refused(previous: str) -> None:
    with pytest.raises(ValueError, match="previous hash"):
        chain_hash(previous, 1, WIRE)


@pytest.mark.parametrize("position", [0, -1, True])
def test_a_non_positive_position_is_refused(position: int) -> None:
    with pytest.raises(ValueError, match="position"):
        chain_hash(GENESIS, position, WIRE)


def test_expected_head_forms() -> None:
    assert parse_expected_head(H1) == (None, H1)
    assert parse_expected_head(f"7:{H1.upper()}") == (7, H1)
    for bad in ("abc", f"x:{H1}", f"0:{H1}", f"7:{H1[:-1]}"):
        with pytest.raises(ValueError, match="expected head"):
            parse_expected_head(bad)


# -- sealing and verifying on the in-memory adapters ------------------------------------------


def filled_store(policies: PolicyRegistry, patients: int = 4) -> InMemoryEventStore:
    store = InMemoryEventStore()
    for _ in range(patients):
        events = scratch_patient(policies, attendances=3)
        store.append(events[0].stream_id, 0, events)
    return store


def test_seal_then_verify_is_clean_and_sealing_again_is_a_no_op(policies: PolicyRegistry) -> None:
    store, seals = filled_store(policies), InMemoryLogSeals()
    progress: list[int] = []
    stats = seal(store, seals, batch=5, on_progress=lambda s: progress.append(s.position))
    assert stats.sealed == store.head_position() == 16
    assert progress == [5, 10, 15, 16]
    expected = GENESIS
    for event in store.iter_wire():
        expected = chain_hash(expected, event.position, event.value)
    assert stats.head == expected
    assert seal(store, seals).sealed == 0
    report = verify_chain(store, seals, expect_head=f"16:{expected}")
    assert report.ok and report.findings == []
    assert (report.checked, report.sealed, report.head_hash) == (16, 16, expected)


def test_unsealed_events_are_a_warning_only(policies: PolicyRegistry) -> None:
    store, seals = filled_store(policies, 2), InMemoryLogSeals()
    seal(store, seals)
    events = scratch_patient(policies, attendances=1)
    store.append(events[0].stream_id, 0, events)
    report = verify_chain(store, seals)
    assert report.ok
    [warning] = report.findings
    assert (warning.kind, warning.severity, warning.position) == ("unsealed", "warning", 9)
    assert "continuum seal" in warning.message


def test_a_wrong_expected_head_is_a_finding(policies: PolicyRegistry) -> None:
    store, seals = filled_store(policies, 1), InMemoryLogSeals()
    seal(store, seals)
    for expected in ("1" * 64, f"2:{'1' * 64}", f"99:{GENESIS}"):
        report = verify_chain(store, seals, expect_head=expected)
        assert [f.kind for f in report.findings] == ["head_mismatch"], expected


def test_a_forged_seal_is_named_as_the_seal_not_the_event(policies: PolicyRegistry) -> None:
    store = filled_store(policies, 2)
    honest = InMemoryLogSeals()
    seal(store, honest)
    forged = InMemoryLogSeals()
    forged.add([s if s.position != 3 else Seal(3, s.event_id, "f" * 64) for s in honest.read()])
    report = verify_chain(store, forged)
    assert [(f.kind, f.position) for f in report.findings] == [("seal", 3)]


def test_racing_sealers_write_one_chain(policies: PolicyRegistry) -> None:
    store, seals = filled_store(policies, 10), InMemoryLogSeals()
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def sealer() -> None:
        start.wait()
        try:
            seal(store, seals, batch=3)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=sealer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    assert verify_chain(store, seals).findings == []
    assert [s.position for s in seals.read(0, 1000)] == list(range(1, 41))


def test_adding_a_sealed_position_again_is_refused_whole() -> None:
    seals = InMemoryLogSeals()
    seals.add([Seal(1, "a", H1)])
    with pytest.raises(SealConflict):
        seals.add([Seal(2, "b", H1), Seal(1, "a", H1)])
    assert seals.read() == [Seal(1, "a", H1)]


# -- the topic comparison, fed messages directly (the broker tests are in tests/integration) -


def as_messages(wires: list[WireEvent], partition: int = 0) -> list[TopicMessage]:
    return [
        TopicMessage(partition, i, w.stream_id.encode(), w.value, w.event_id)
        for i, w in enumerate(wires)
    ]


def test_topic_order_does_not_change_what_counts_as_a_duplicate(
    policies: PolicyRegistry,
) -> None:
    store = filled_store(policies, 2)
    wires = list(store.iter_wire())
    faithful = as_messages(wires)
    target = faithful[3]
    assert target.value is not None
    forged = replace(target, partition=1, offset=0, value=target.value.replace(b"3.5", b"3.7"))
    assert forged.value != target.value
    resent = replace(target, partition=0, offset=len(faithful))
    for order in ([forged, *faithful, resent], [*faithful, resent, forged]):
        report = compare_topic(store, order, store_head=store.head_position())
        assert [(f.kind, f.position) for f in report.findings] == [("differs", 4)], order
        assert (report.duplicates, report.messages) == (1, len(wires) + 2)


def test_topic_missing_lagging_and_extra_messages(policies: PolicyRegistry) -> None:
    store = filled_store(policies, 2)
    wires = list(store.iter_wire())
    messages = as_messages(wires[:2] + wires[3:6])  # 3 missing, 7 and 8 not relayed yet
    stranger = replace(messages[0], offset=99, value=b'{"position": 42, "event_id": "x"}')
    report = compare_topic(store, [*messages, stranger], store_head=8)
    assert [(f.kind, f.position) for f in report.findings] == [
        ("extra", 42),
        ("missing", 3),
        ("lag", 7),
    ]
    assert report.lag == 2 and report.topic_head == 6
