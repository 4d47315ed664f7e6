"""The domain's exceptions: one tree, every refusal specific.

    ContinuumError                     base; `rule` is a stable machine-readable code
    ├── InvalidInput                   a value is malformed or outside what the policy allows
    │   ├── UnknownLevel               level code not in the policy
    │   ├── RatingOutOfRange           dimension rating not on the policy's scale
    │   └── InvalidClinicalTime        occurred_at in the future or before what it follows
    ├── CommandRefused                 the input is well-formed but a rule says no
    │   ├── InvalidStateForCommand     e.g. transition a discharged patient, admit an active one
    │   ├── TransitionNotAllowed       the policy's transition table has no such move
    │   └── GuardFailed                a guard on an allowed move failed, with the values
    │       ├── ReassessmentMissing
    │       ├── ReassessmentStale
    │       ├── VarianceReasonRequired
    │       └── HoursOutsideBand
    ├── NotFound
    │   ├── UnknownPatient
    │   ├── UnknownEvent
    │   ├── UnknownPolicy
    │   └── UnknownConsent             no consent with that id on the patient's record
    ├── ConcurrencyConflict            expected stream version differs from the actual one
    ├── Duplicate                      already done: event voided twice, MRN registered,
    │                                  consent id used, consent revoked twice, ...
    ├── PolicyInvalid                  a policy document fails validation on load
    └── StoreNotReady                  the database schema is missing or behind: run a migration

`MachineError` from the transitions library never leaves the domain.
"""

from __future__ import annotations

from typing import Any


class ContinuumError(Exception):
    """Base of every error the service raises on purpose.

    `rule` names the rule that refused (stable, for clients and metrics); `field` names the
    offending input field when there is one; `details` carries the values involved; `policy` is
    "id@version" when a policy rule decided.
    """

    rule: str = "continuum.error"

    def __init__(
        self,
        message: str,
        *,
        rule: str | None = None,
        field: str | None = None,
        policy: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if rule is not None:
            self.rule = rule
        self.field = field
        self.policy = policy
        self.details = details

    def __str__(self) -> str:
        suffix = f" [rule {self.rule}"
        if self.policy:
            suffix += f", policy {self.policy}"
        return f"{self.message}{suffix}]"

    def as_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "rule": self.rule,
            "message": self.message,
            "field": self.field,
            "policy": self.policy,
            "details": {k: _plain(v) for k, v in self.details.items()},
        }


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


class InvalidInput(ContinuumError):
    rule = "input.invalid"


class UnknownLevel(InvalidInput):
    rule = "level.unknown"


class RatingOutOfRange(InvalidInput):
    rule = "assessment.rating_out_of_range"


class InvalidClinicalTime(InvalidInput):
    rule = "time.invalid"


class CommandRefused(ContinuumError):
    rule = "command.refused"


class InvalidStateForCommand(CommandRefused):
    rule = "state.invalid_for_command"


class TransitionNotAllowed(CommandRefused):
    rule = "transition.not_allowed"


class GuardFailed(CommandRefused):
    rule = "transition.guard_failed"


class ReassessmentMissing(GuardFailed):
    rule = "reassessment.missing"


class ReassessmentStale(GuardFailed):
    rule = "reassessment.stale"


class VarianceReasonRequired(GuardFailed):
    rule = "placement.variance_reason_required"


class HoursOutsideBand(GuardFailed):
    rule = "placement.hours_outside_band"


class NotFound(ContinuumError):
    rule = "not_found"


class UnknownPatient(NotFound):
    rule = "patient.unknown"


class UnknownEvent(NotFound):
    rule = "event.unknown"


class UnknownPolicy(NotFound):
    rule = "policy.unknown"


class UnknownConsent(NotFound):
    rule = "consent.unknown"


class ConcurrencyConflict(ContinuumError):
    rule = "stream.version_conflict"

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"patient {stream_id} changed meanwhile: expected version {expected}, "
            f"actual {actual}; reload and retry",
            stream_id=stream_id,
            expected=expected,
            actual=actual,
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class Duplicate(ContinuumError):
    rule = "duplicate"


class PolicyInvalid(ContinuumError):
    rule = "policy.invalid"


class StoreNotReady(ContinuumError):
    rule = "store.not_ready"
