"""The console's two forms (reassessment, transition): posted fields -> the API's request
bodies, and the service's refusals -> a message beside the field at fault.

Nothing here decides anything clinical. The bodies are the API's own (`http.models`), the
rules run in the service, and a refusal names its field (`ContinuumError.field`, or the
pydantic location of an invalid value), which is mapped back to the input that holds it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from continuum.domain.errors import ConcurrencyConflict, ContinuumError
from continuum.entrypoints.http import models as m

CONFLICT_MESSAGE = "Someone else changed this patient; reload."


@dataclass
class FormState:
    """What a form shows: the values entered and, after a refusal, the errors."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    #: A refusal not tied to one input (shown above the form), with its rule.
    summary: str | None = None
    rule: str | None = None
    conflict: bool = False
    saved: str | None = None

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.summary or self.conflict)


class FormInvalid(Exception):
    """The posted fields do not make a request body; `errors` maps input names to reasons."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def _blank_to_none(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _moment(value: str | None, name: str) -> dt.datetime | None:
    """A `datetime-local` input (no offset): read as UTC, which the label says."""
    text = _blank_to_none(value)
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FormInvalid({name: "enter a date and time such as 2026-11-20T14:30"}) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _friendly(error: Mapping[str, Any]) -> str:
    kind = str(error.get("type", ""))
    if kind == "string_pattern_mismatch":
        return "use letters, digits and . _ : - only (at most 64 characters, no spaces)"
    if kind == "missing":
        return "required"
    if kind in ("float_parsing", "float_type"):
        return "enter a number"
    return str(error.get("msg", "invalid"))


def _validation_errors(exc: ValidationError, aliases: Mapping[str, str]) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors():
        path = ".".join(str(part) for part in error.get("loc", ()))
        name = input_for(path, aliases)
        errors.setdefault(name, _friendly(error))
    return errors


def input_for(path: str, aliases: Mapping[str, str]) -> str:
    """The form input holding a body path: `assessment.ratings.3` -> `rating_3`."""
    if path.startswith("assessment.ratings."):
        return "rating_" + path.rsplit(".", 1)[1]
    if path in aliases:
        return aliases[path]
    if path.startswith("assessment."):
        return path.removeprefix("assessment.")
    return path or "form"


REASSESSMENT_ALIASES = {"assessment.ratings": "ratings", "assessment": "ratings"}
TRANSITION_ALIASES: dict[str, str] = {}


def reassessment_body(form: Mapping[str, str], dimensions: Sequence[str]) -> m.ReassessmentBody:
    occurred = _moment(form.get("occurred_at"), "occurred_at")
    hours = _blank_to_none(form.get("hours_scheduled"))
    ratings = {d: form.get(f"rating_{d}", "") for d in dimensions}
    missing = {f"rating_{d}": "choose a rating" for d, v in ratings.items() if not v}
    if missing:
        raise FormInvalid(missing)
    raw: dict[str, Any] = {
        "occurred_at": occurred,
        "assessment": {
            "instrument": form.get("instrument", "").strip(),
            "assessor_id": form.get("assessor_id", "").strip(),
            "ratings": ratings,
            "hours_scheduled": hours,
        },
    }
    try:
        return m.ReassessmentBody.model_validate(raw)
    except ValidationError as exc:
        raise FormInvalid(_validation_errors(exc, REASSESSMENT_ALIASES)) from None


def transition_body(form: Mapping[str, str]) -> m.TransitionBody:
    occurred = _moment(form.get("occurred_at"), "occurred_at")
    raw: dict[str, Any] = {
        "occurred_at": occurred,
        "to_level": form.get("to_level", "").strip(),
        "site": _blank_to_none(form.get("site")),
        "reassessment_event_id": _blank_to_none(form.get("reassessment_event_id")),
        "variance_reason": _blank_to_none(form.get("variance_reason")),
        "authorization_ref": _blank_to_none(form.get("authorization_ref")),
    }
    if not raw["to_level"]:
        raise FormInvalid({"to_level": "choose the level to move to"})
    try:
        return m.TransitionBody.model_validate(raw)
    except ValidationError as exc:
        raise FormInvalid(_validation_errors(exc, TRANSITION_ALIASES)) from None


def expected_version(form: Mapping[str, str]) -> int:
    """The stream version the form was rendered at; the change is refused if it moved."""
    text = form.get("version", "")
    if not text.isdigit() or len(text) > 9:
        raise FormInvalid({"form": "the form lost its patient version; reload the page"})
    return int(text)


def refusal(
    state: FormState, exc: ContinuumError, inputs: Sequence[str], aliases: Mapping[str, str]
) -> FormState:
    """Put the service's refusal beside its field (or above the form)."""
    state.rule = exc.rule
    if isinstance(exc, ConcurrencyConflict):
        state.conflict = True
        state.summary = (
            f"{CONFLICT_MESSAGE} (The form was opened at version {exc.expected}; the patient "
            f"is now at version {exc.actual}. Nothing was saved.)"
        )
        return state
    message = exc.message
    if exc.policy:
        message += f" [rule {exc.rule}, policy {exc.policy}]"
    else:
        message += f" [rule {exc.rule}]"
    name = input_for(exc.field, aliases) if exc.field else None
    if name is not None and name in inputs:
        state.errors[name] = message
    else:
        state.summary = message
    return state
