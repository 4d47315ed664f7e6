"""The state-machine diagram in docs/architecture.md is generated from the policy's Machine and
must be regenerated (`python -m continuum.domain.diagram --write`) whenever that changes."""

from __future__ import annotations

from continuum.domain import diagram
from continuum.domain.machine import PolicyMachine
from continuum.domain.policy import PolicyRegistry


def test_committed_diagram_is_current() -> None:
    committed = diagram.current(diagram.DOC.read_text(encoding="utf-8"))
    assert committed is not None, "docs/architecture.md lost its state-machine markers"
    assert committed == diagram.block(PolicyRegistry.bundled().default), (
        "docs/architecture.md is stale: run `python -m continuum.domain.diagram --write`"
    )


def test_every_transition_of_the_machine_is_drawn(policies: PolicyRegistry) -> None:
    policy = policies.default
    text = diagram.render(policy)
    machine = PolicyMachine(policy)
    moves = {(s, d) for t, s, d in machine.transitions_table() if t.startswith("move:")}
    rows = {
        line.split("|")[1].strip(" *"): line.split("|")[2:-1]
        for line in text.splitlines()
        if line.startswith("| **")
    }
    drawn = {
        (source, dest)
        for source, cells in rows.items()
        for dest, cell in zip(machine.level_states, cells, strict=True)
        if cell.strip() == "x"
    }
    assert drawn == moves
    for trigger, source, dest in machine.transitions_table():
        if not trigger.startswith("move:"):
            kind = trigger.split(":")[0]
            assert f"{diagram._id(source)} --> {diagram._id(dest)}: {kind}" in text


def test_a_changed_policy_changes_the_diagram(policies: PolicyRegistry) -> None:
    policy = policies.default
    moves = dict(policy.allowed_moves)
    dest = next(iter(moves))
    fewer = policy.model_copy(update={"allowed_moves": {**moves, dest: frozenset()}})
    assert diagram.render(fewer) != diagram.render(policy)
