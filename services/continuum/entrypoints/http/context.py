"""What the routes need, built once per process and shared by every request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine

from continuum.application.access import AccessAudit, Principal
from continuum.application.disclosure import DisclosureRecord
from continuum.application.ports import AccessLog
from continuum.bootstrap import App
from continuum_projections.readmodel import ReadModel
from continuum_projections.reports import Capacity


class Verifier(Protocol):
    """Turns a bearer token into a Principal, or raises NotAuthenticated."""

    def verify(self, token: str) -> Principal: ...

    def cached(self, token: str) -> Principal | None: ...


@dataclass
class ApiContext:
    app: App
    verifier: Verifier
    access_log: AccessLog
    disclosures: DisclosureRecord
    audit: AccessAudit
    read_model: ReadModel
    capacity: Capacity | None
    level_order: list[str]

    @property
    def read_engine(self) -> Engine:
        return self.read_model.engine
