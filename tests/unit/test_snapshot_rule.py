"""The one rule for where census snapshots are cut (`readmodel._snapshot_cuts`), worked by
hand; the integration tests check that every place that cuts snapshots agrees."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from continuum_projections import readmodel as rm


@pytest.fixture(autouse=True)
def every_three(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rm, "SNAPSHOT_EVERY", 3)


def test_a_snapshot_is_cut_after_the_last_delta_of_the_instant_that_reaches_the_count() -> None:
    # a:1 b:1 -> 2; c brings 2 more -> 4 >= 3: cut at c with 4 (its deltas go together);
    # d:1 e:1 f:1 -> 3: cut at f with 3; g:2 is left over for the next batch.
    per_instant = [("a", 1), ("b", 1), ("c", 2), ("d", 1), ("e", 1), ("f", 1), ("g", 2)]
    assert list(rm._snapshot_cuts(per_instant)) == [("c", 4), ("f", 3)]


def test_deltas_already_after_the_last_snapshot_count_towards_the_next() -> None:
    assert list(rm._snapshot_cuts([("a", 1), ("b", 5)], since=2)) == [("a", 3), ("b", 5)]
    assert list(rm._snapshot_cuts([], since=2)) == []


def test_it_takes_nothing_past_the_instant_it_yields() -> None:
    taken: list[str] = []

    def per_instant() -> Iterator[tuple[str, int]]:
        for instant in "abcdef":
            taken.append(instant)
            yield instant, 1

    cuts = rm._snapshot_cuts(per_instant())
    assert next(cuts) == ("c", 3)
    assert taken == ["a", "b", "c"]  # the caller's running totals stop at c
