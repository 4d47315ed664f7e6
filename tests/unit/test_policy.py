"""Policy documents: loading, validation, the placement rule, hours bands, the registry."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from continuum.domain.errors import PolicyInvalid, RatingOutOfRange, UnknownLevel, UnknownPolicy
from continuum.domain.policy import BUNDLED, Policy, PolicyRegistry, load_policy_text
from continuum_events import AgeGroup, PolicyRef

# -- a tiny TOML writer, so each invalid document is one mutation of a valid one --------------


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(doc: Mapping[str, Any]) -> str:
    lines: list[str] = []
    tables: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in doc.items():
        if key in {"levels", "transitions", "placement"}:
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_value(value)}")
    for key, rows in tables:
        for row in rows:
            lines.append(f"\n[[{key}]]")
            lines.extend(f'"{k}" = {_value(v)}' for k, v in row.items())
    return "\n".join(lines) + "\n"


def _level(code: str, rank: int, **extra: Any) -> dict[str, Any]:
    return {
        "code": code,
        "name": f"Level {code}",
        "rank": rank,
        "setting": "ambulatory",
        "encounter_class": "AMB",
        **extra,
    }


BASE: dict[str, Any] = {
    "id": "tiny",
    "version": "1",
    "title": "Tiny test policy",
    "edition": "test",
    "illustrative": True,
    "notice": "for tests only",
    "code_system": "https://example.test/levels",
    "terminal_state": "discharged",
    "rating_scale": ["0", "1", "2"],
    "admission_levels": ["1", "2"],
    "dimensions": [{"code": "a", "name": "A"}, {"code": "b", "name": "B"}],
    "levels": [
        _level("aftercare", 0, setting="continuing_care"),
        _level("1", 10, hours_per_week={"adult": {"below_hours": 9}}),
        _level("2", 20, hours_per_week={"adult": {"min_hours": 9, "below_hours": 20}}),
    ],
    "transitions": [
        {"from": ["1", "2", "aftercare"], "to": ["1", "2"]},
        {"from": ["1"], "to": ["aftercare"]},
    ],
    "placement": [
        {"dimensions": ["a"], "min_rating": "2", "level": "2"},
        {"dimensions": ["a", "b"], "min_rating": "1", "level": "1"},
        {"dimensions": ["a", "b"], "min_rating": "0", "level": "aftercare"},
    ],
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def load(doc: Mapping[str, Any]) -> Policy:
    return load_policy_text(to_toml(doc), source="tiny.toml")


def ratings(values: str) -> dict[str, str]:
    return {str(i + 1): r for i, r in enumerate(values)}


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return PolicyRegistry.bundled()


@pytest.fixture(scope="module")
def asam3(registry: PolicyRegistry) -> Policy:
    return registry.get("asam-3", "2026.1")


@pytest.fixture(scope="module")
def asam4(registry: PolicyRegistry) -> Policy:
    return registry.get("asam-4", "2026.1")


# -- bundled documents --------------------------------------------------------------------------


def test_bundled_policies_load(registry: PolicyRegistry) -> None:
    assert sorted(p.label for p in registry.all()) == ["asam-3@2026.1", "asam-4@2026.1"]
    assert registry.default_id == "asam-3"
    assert registry.default.ref == PolicyRef(id="asam-3", version="2026.1")
    assert PolicyRegistry.bundled("asam-4").default.label == "asam-4@2026.1"


def test_bundled_asam3_contents(asam3: Policy) -> None:
    assert asam3.illustrative is True
    assert asam3.reassessment_window_days == 7
    assert asam3.terminal_state == "discharged"
    assert [d.code for d in asam3.dimensions] == ["1", "2", "3", "4", "5", "6"]
    assert asam3.rating_scale == ["0", "1", "2", "3", "4"]
    assert "aftercare" not in asam3.admission_levels
    assert asam3.level("2.5").name == "Partial hospitalization (PHP)"
    assert asam3.level("2.1").rank < asam3.level("2.5").rank < asam3.level("3.1").rank
    assert asam3.level("4-WM").withdrawal_management is True
    assert asam3.level("4").withdrawal_management is False
    # the transition table: 0.5 is an entry point only, detox never steps straight to aftercare
    assert asam3.allowed_moves["0.5"] == frozenset({"0.5"})
    assert asam3.allowed_moves["aftercare"] == frozenset({"1", "OTP", "2.1", "aftercare"})
    assert "4-WM" in asam3.allowed_moves["2.1"]


def test_bundled_asam4_has_no_separate_withdrawal_levels(asam4: Policy) -> None:
    codes = [level.code for level in asam4.levels]
    assert not [code for code in codes if code.endswith("-WM")]
    assert "3.3" not in codes
    assert "1.7" in codes
    assert asam4.code_system.endswith("asam-4-levels")


def test_every_bundled_file_is_loaded(registry: PolicyRegistry) -> None:
    names = sorted(entry.name for entry in BUNDLED.iterdir() if entry.name.endswith(".toml"))
    assert names == ["asam-3.toml", "asam-4.toml"]
    assert len(registry.all()) == len(names)


def test_the_tiny_document_is_valid() -> None:
    policy = load(base())
    assert policy.label == "tiny@1"
    assert policy.allowed_moves == {
        "1": frozenset({"1", "2", "aftercare"}),
        "2": frozenset({"1", "2", "aftercare"}),
        "aftercare": frozenset({"1"}),
    }


# -- invalid documents ------------------------------------------------------------------------


def test_bad_toml_is_policy_invalid() -> None:
    with pytest.raises(PolicyInvalid, match=r"policy broken\.toml is not valid TOML") as info:
        load_policy_text('id = "x"\nversion = ', source="broken.toml")
    assert info.value.rule == "policy.invalid"
    assert info.value.details == {"source": "broken.toml"}


def _invalid(doc: Mapping[str, Any]) -> str:
    with pytest.raises(PolicyInvalid) as info:
        load(doc)
    assert info.value.message.startswith("policy tiny.toml is invalid: ")
    return info.value.message


def test_unknown_level_in_transitions() -> None:
    doc = base()
    doc["transitions"][1]["to"] = ["aftercare", "9"]
    assert "transitions[1] names unknown level '9'" in _invalid(doc)


def test_unknown_source_level_in_transitions() -> None:
    doc = base()
    doc["transitions"][0]["from"] = ["1", "3.5"]
    assert "transitions[0] names unknown level '3.5'" in _invalid(doc)


def test_unknown_level_in_admission_levels() -> None:
    doc = base()
    doc["admission_levels"] = ["1", "2", "7"]
    assert "admission_levels names unknown level '7'" in _invalid(doc)


def test_unknown_level_in_placement() -> None:
    doc = base()
    doc["placement"][0]["level"] = "3.7"
    assert "placement[0] indicates unknown level '3.7'" in _invalid(doc)


def test_placement_rating_not_on_scale() -> None:
    doc = base()
    doc["placement"][1]["min_rating"] = "4"
    assert "placement[1] min_rating '4' not on rating_scale" in _invalid(doc)


def test_placement_unknown_dimension() -> None:
    doc = base()
    doc["placement"][0]["dimensions"] = ["z"]
    assert "placement[0] names unknown dimension 'z'" in _invalid(doc)


def test_last_placement_rule_must_be_catch_all_dimensions() -> None:
    doc = base()
    doc["placement"][-1]["dimensions"] = ["a"]
    assert "the last placement rule must match every assessment" in _invalid(doc)


def test_last_placement_rule_must_be_catch_all_rating() -> None:
    doc = base()
    doc["placement"] = doc["placement"][:2]  # the last rule now starts at "1", not "0"
    assert "the last placement rule must match every assessment" in _invalid(doc)


def test_duplicate_level_codes() -> None:
    doc = base()
    doc["levels"].append(_level("2", 30))
    assert "level codes repeat: ['1', '2', '2', 'aftercare']" in _invalid(doc)


def test_missing_aftercare() -> None:
    doc = base()
    doc["levels"][0]["code"] = "0"
    doc["transitions"][0]["from"] = ["1", "2"]
    doc["transitions"] = doc["transitions"][:1]
    doc["placement"][-1]["level"] = "1"
    assert "the policy needs an 'aftercare' state" in _invalid(doc)


def test_terminal_state_clashes_with_level_code() -> None:
    doc = base()
    doc["terminal_state"] = "2"
    assert "terminal_state '2' clashes with a level code" in _invalid(doc)


def test_terminal_state_cannot_be_new() -> None:
    doc = base()
    doc["terminal_state"] = "new"
    assert "terminal_state 'new' clashes with a level code" in _invalid(doc)


def test_repeated_dimension_codes() -> None:
    doc = base()
    doc["dimensions"].append({"code": "a", "name": "A again"})
    assert "dimension codes repeat" in _invalid(doc)


def test_repeated_rating_scale_values() -> None:
    doc = base()
    doc["rating_scale"] = ["0", "1", "1", "2"]
    assert "rating_scale values repeat" in _invalid(doc)


def test_unknown_field_is_refused() -> None:
    doc = base()
    doc["placement_algorithm"] = "asam"
    assert "placement_algorithm: Extra inputs are not permitted" in _invalid(doc)


def test_missing_field_names_its_location() -> None:
    doc = base()
    del doc["notice"]
    assert "notice: Field required" in _invalid(doc)


def test_bad_level_field_names_its_location() -> None:
    doc = base()
    doc["levels"][1]["setting"] = "outer-space"
    assert "levels.1.setting" in _invalid(doc)


def test_registry_refuses_the_same_version_twice(tmp_path: Path) -> None:
    (tmp_path / "copy.toml").write_text(
        (BUNDLED / "asam-3.toml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    with pytest.raises(PolicyInvalid, match=r"policy asam-3@2026\.1 is loaded twice"):
        PolicyRegistry.bundled(extra_dirs=[tmp_path])


def test_invalid_extra_document_names_its_path(tmp_path: Path) -> None:
    doc = base()
    doc["terminal_state"] = "1"
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    with pytest.raises(PolicyInvalid, match="clashes with a level code") as info:
        PolicyRegistry.bundled(extra_dirs=[tmp_path])
    assert info.value.details["source"] == str(path)


# -- the registry ---------------------------------------------------------------------------


def test_unknown_default_policy() -> None:
    with pytest.raises(UnknownPolicy, match="no policy with id 'asam-9'; loaded: asam-3, asam-4"):
        PolicyRegistry.bundled("asam-9")


def test_unknown_policy_lookups(registry: PolicyRegistry) -> None:
    with pytest.raises(UnknownPolicy, match="no policy with id 'nope'") as info:
        registry.latest("nope")
    assert info.value.rule == "policy.unknown"
    assert info.value.field == "policy"
    with pytest.raises(UnknownPolicy, match=r"policy asam-3@1999\.1 is not loaded"):
        registry.get("asam-3", "1999.1")


def _asam3_version(version: str) -> str:
    text = (BUNDLED / "asam-3.toml").read_text(encoding="utf-8")
    assert 'version = "2026.1"' in text
    return text.replace('version = "2026.1"', f'version = "{version}"', 1)


def test_latest_picks_the_highest_version(tmp_path: Path) -> None:
    (tmp_path / "asam-3-2026.2.toml").write_text(_asam3_version("2026.2"), encoding="utf-8")
    registry = PolicyRegistry.bundled(extra_dirs=[tmp_path])
    assert registry.latest("asam-3").version == "2026.2"
    assert registry.default.label == "asam-3@2026.2"
    assert registry.get("asam-3", "2026.1").version == "2026.1"
    assert registry.latest("asam-4").version == "2026.1"


def test_latest_compares_version_parts_as_numbers(tmp_path: Path) -> None:
    for version in ["2026.9", "2026.10", "2025.99"]:
        (tmp_path / f"asam-3-{version}.toml").write_text(_asam3_version(version), encoding="utf-8")
    registry = PolicyRegistry.bundled(extra_dirs=[tmp_path])
    assert registry.latest("asam-3").version == "2026.10"
    assert len(registry.all()) == 5


# -- level lookups ------------------------------------------------------------------------------


def test_unknown_level_lookup(asam3: Policy) -> None:
    with pytest.raises(UnknownLevel, match=r"level '2\.2' is not in policy asam-3@2026\.1") as info:
        asam3.level("2.2", field="to_level")
    assert info.value.field == "to_level"
    assert info.value.policy == "asam-3@2026.1"
    assert info.value.details == {"level": "2.2"}


def test_asam3_level_codes_are_not_asam4_codes(asam4: Policy) -> None:
    with pytest.raises(UnknownLevel):
        asam4.level("3.7-WM")


# -- the placement rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "level"),
    [
        ("000000", "aftercare"),
        ("100000", "1"),
        ("111111", "1"),
        ("020000", "2.1"),
        ("000022", "2.1"),
        ("200000", "2-WM"),
        ("222222", "2-WM"),
        ("000300", "2.5"),
        ("000030", "3.1"),
        ("000003", "3.1"),
        ("001040", "3.5"),
        ("000004", "3.5"),
        ("003000", "3.7"),
        ("300000", "3.7-WM"),
        ("333333", "3.7-WM"),
        ("040000", "4"),
        ("004444", "4"),
        ("400000", "4-WM"),
        ("444444", "4-WM"),
    ],
)
def test_asam3_indicated_level(asam3: Policy, values: str, level: str) -> None:
    assert asam3.indicated_level(ratings(values)) == level


@pytest.mark.parametrize(
    ("values", "level"),
    [
        ("000000", "aftercare"),
        ("010000", "1.5"),
        ("000020", "2.1"),
        ("000003", "2.5"),
        ("200000", "2.7"),
        ("000300", "3.1"),
        ("000040", "3.5"),
        ("030000", "3.7"),
        ("004000", "4"),
    ],
)
def test_asam4_indicated_level(asam4: Policy, values: str, level: str) -> None:
    assert asam4.indicated_level(ratings(values)) == level


def test_highest_risk_dimension_dominates_never_the_average(asam3: Policy) -> None:
    # one dimension at 4 (average 0.67) needs more intensive care than all at 2 (average 2)
    single_four = asam3.indicated_level(ratings("000040"))
    all_twos = asam3.indicated_level(ratings("222220"))
    assert (single_four, all_twos) == ("3.5", "2-WM")
    assert asam3.level(single_four).rank > asam3.level(all_twos).rank
    # adding low ratings elsewhere never lowers the indicated level
    assert asam3.indicated_level(ratings("111141")) == "3.5"
    # a four in dimension 1 beats a three everywhere else
    assert asam3.indicated_level(ratings("433333")) == "4-WM"


def test_indicated_level_validates_the_ratings(asam3: Policy) -> None:
    with pytest.raises(RatingOutOfRange, match="missing 6") as info:
        asam3.indicated_level(ratings("00000"))
    assert info.value.field == "ratings"
    assert info.value.details["missing"] == ["6"]
    with pytest.raises(RatingOutOfRange, match="unknown 7"):
        asam3.indicated_level(ratings("0000000"))
    with pytest.raises(RatingOutOfRange, match="rating for dimension 2 is '5'") as info:
        asam3.indicated_level(ratings("050000"))
    assert info.value.field == "ratings.2"
    assert info.value.details["allowed"] == ["0", "1", "2", "3", "4"]


def test_validate_ratings_prefixes_the_field(asam3: Policy) -> None:
    with pytest.raises(RatingOutOfRange) as info:
        asam3.validate_ratings(ratings("00x000"), field="assessment.ratings")
    assert info.value.field == "assessment.ratings.3"
    assert info.value.details["value"] == "x"


# -- hours bands ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "age", "hours", "inside"),
    [
        ("2.1", AgeGroup.ADULT, 9, True),
        ("2.1", AgeGroup.ADULT, 8.5, False),
        ("2.1", AgeGroup.ADULT, 19.9, True),
        ("2.1", AgeGroup.ADULT, 20, False),
        ("2.1", AgeGroup.ADOLESCENT, 6, True),
        ("2.1", AgeGroup.ADOLESCENT, 5.9, False),
        ("2.5", AgeGroup.ADULT, 20, True),
        ("2.5", AgeGroup.ADULT, 19.5, False),
        ("2.5", AgeGroup.ADULT, 60, True),
        ("1", AgeGroup.ADULT, 8.9, True),
        ("1", AgeGroup.ADULT, 9, False),
        ("1", AgeGroup.ADULT, 0, True),
        ("1", AgeGroup.ADOLESCENT, 5.5, True),
        ("1", AgeGroup.ADOLESCENT, 6, False),
        ("3.1", AgeGroup.ADULT, 5, True),
        ("3.1", AgeGroup.ADULT, 4, False),
    ],
)
def test_band_min_inclusive_below_exclusive(
    asam3: Policy, level: str, age: AgeGroup, hours: float, inside: bool
) -> None:
    band = asam3.band_for(level, age)
    assert band is not None
    assert band.contains(hours) is inside


def test_band_descriptions(asam3: Policy) -> None:
    descriptions = {
        level: band.describe()
        for level in ["1", "2.1", "2.5"]
        if (band := asam3.band_for(level, AgeGroup.ADULT)) is not None
    }
    assert descriptions == {
        "1": "< 9 h/week",
        "2.1": ">= 9 and < 20 h/week",
        "2.5": ">= 20 h/week",
    }


def test_levels_without_a_band(asam3: Policy, asam4: Policy) -> None:
    assert asam3.band_for("3.5", AgeGroup.ADULT) is None
    assert asam3.band_for("aftercare", AgeGroup.ADOLESCENT) is None
    assert asam4.band_for("2.1", AgeGroup.ADULT) is None
    with pytest.raises(UnknownLevel):
        asam3.band_for("2.2", AgeGroup.ADULT)


def test_band_needs_an_ordered_range() -> None:
    from continuum.domain.policy import Band

    with pytest.raises(ValueError, match="min_hours 20 must be below below_hours 9"):
        Band(min_hours=20, below_hours=9)
    with pytest.raises(ValueError, match="needs min_hours, below_hours or both"):
        Band()


def test_two_loads_of_one_document_share_one_machine() -> None:
    from continuum.domain.machine import machine_for

    first, second = PolicyRegistry.bundled().default, PolicyRegistry.bundled().default
    assert first is not second
    assert machine_for(first) is machine_for(second)
    assert machine_for(PolicyRegistry.bundled("asam-4").default) is not machine_for(first)
