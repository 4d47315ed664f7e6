"""The continuum state machine, built from a policy document with the `transitions` library.

One `Machine` per policy version, shared by every patient (`model=None`). Commands ask
`may_trigger` on a throw-away probe (once per state and trigger: the machine never changes after
it is built, so the answer is kept); replay sets the recorded state with `set_state`, so guards
and callbacks never re-run on history.
"""

from __future__ import annotations

import threading
from typing import Any

from transitions import Machine

from continuum.domain.policy import Policy

NEW = "new"


class _Probe:
    """A fresh model object per question, so no trigger attributes linger on real state."""

    def __init__(self, state: str) -> None:
        self.state = state

    def ask(self, trigger: str) -> bool:
        may: Any = getattr(self, "may_trigger")  # noqa: B009 - bound by transitions at run time
        return bool(may(trigger))


class PolicyMachine:
    """States: `new`, every level of the policy (aftercare included), the terminal state."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.terminal = policy.terminal_state
        self.level_states = [level.code for level in policy.levels]
        self.states = [NEW, *self.level_states, self.terminal]
        self._machine = Machine(
            model=None,
            states=self.states,
            initial=NEW,
            auto_transitions=False,
            model_attribute="state",
        )
        for level in policy.admission_levels:
            self._machine.add_transition(f"admit:{level}", NEW, level)
            self._machine.add_transition(f"readmit:{level}", self.terminal, level)
        for dest, sources in policy.allowed_moves.items():
            sources_: list[Any] = sorted(sources)
            self._machine.add_transition(f"move:{dest}", sources_, dest)
        levels: list[Any] = list(self.level_states)
        self._machine.add_transition("discharge", levels, self.terminal)
        # `transitions` is not thread-safe: adding and removing probes is serialized, and each
        # answer is computed once (the HTTP API decides commands on many threads).
        self._answers: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()

    def may(self, state: str, trigger: str) -> bool:
        answer = self._answers.get((state, trigger))
        if answer is not None:
            return answer
        with self._lock:
            probe = _Probe(state)
            self._machine.add_model(probe, initial=state)
            try:
                answer = probe.ask(trigger)
            finally:
                self._machine.remove_model(probe)
            self._answers[(state, trigger)] = answer
        return answer

    def set_state(self, model: object, state: str) -> None:
        """Put `model` into `state` without running guards or callbacks (replay)."""
        self._machine.set_state(state, model=model)

    def is_active(self, state: str) -> bool:
        return state in self.level_states

    def transitions_table(self) -> list[tuple[str, str, str]]:
        """(trigger, source, dest) for every transition: the data behind diagrams and docs."""
        rows: list[tuple[str, str, str]] = []
        for trigger, event in self._machine.events.items():
            for source, transitions in event.transitions.items():
                rows.extend((trigger, source, str(t.dest)) for t in transitions)
        return rows


_MACHINES: dict[str, PolicyMachine] = {}


def machine_for(policy: Policy) -> PolicyMachine:
    """The shared machine of one policy document (built once per distinct content)."""
    machine = _MACHINES.get(policy.fingerprint)
    if machine is None:
        machine = _MACHINES[policy.fingerprint] = PolicyMachine(policy)
    return machine
