"""care-continuum: an event-sourced service for the substance-use-disorder continuum of care.

Layers, outermost to innermost (imports only point inward):

    entrypoints/  CLI (and later HTTP, consumers): build a command, call the application
    adapters/     SQL event store, alembic migrations, in-memory store for unit tests
    application/  command handlers: load a patient, let the domain decide, append events
    domain/       policy documents, the state machine, the rules, the error tree
    continuum_events (events/)  the event contract, shared with projections and integrators
"""

__version__ = "0.1.0"
