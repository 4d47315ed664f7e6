"""Who may do what: roles, permissions and the minimum-necessary rules (HIPAA, 42 CFR Part 2).

Every entrypoint (HTTP, CLI exports, replays) authenticates a caller into a `Principal` and
asks `require` before it acts. The rules live here, in one table, so that the role x endpoint
matrix in the tests and in docs/api.md is checked against one source.

    role          patient data                    writes                         identity
    case_manager  patients of its sites           reassessments, transitions     yes
    clinician     patients of its sites           every clinical command         yes
    auditor       every patient; log export,      never                          no
                  replay, the access log
    integration   none (it sends, it never reads) every clinical command, feeds  never
    admin         none; census, metrics, consent  consent records                no
                  registry, operations
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from continuum.application.ports import AccessEntry, AccessLog
from continuum.domain.errors import ContinuumError


class Role(StrEnum):
    CASE_MANAGER = "case_manager"
    CLINICIAN = "clinician"
    AUDITOR = "auditor"
    INTEGRATION = "integration"
    ADMIN = "admin"


class Permission(StrEnum):
    #: A patient's record: state, timeline, FHIR export (patient-level data).
    READ_PATIENT = "patient:read"
    #: Name, date of birth and MRN beside the pseudonymous key.
    READ_IDENTITY = "identity:read"
    ADMIT = "patient:admit"
    REASSESS = "patient:reassess"
    TRANSITION = "patient:transition"
    ATTEND = "patient:attend"
    DISCHARGE = "patient:discharge"
    READMIT = "patient:readmit"
    VOID = "patient:void"
    #: Aggregate counts (census, occupancy, daily census, outcome metrics).
    READ_AGGREGATES = "aggregates:read"
    #: The step-down audit trail (one row per patient transition: patient-level).
    READ_AUDIT_TRAIL = "audit-trail:read"
    #: The whole event log (export) and replays into a scratch read model.
    EXPORT_LOG = "log:export"
    #: Who read what: the access log.
    READ_ACCESS_LOG = "access-log:read"
    #: Consent given / revoked per recipient organization.
    MANAGE_CONSENT = "consent:write"
    READ_CONSENT = "consent:read"
    #: The disclosure record: which event went to which organization under which consent.
    READ_DISCLOSURES = "disclosures:read"
    #: Hospital feeds (ADT) posted over HTTP.
    POST_FEED = "feed:post"


class PurposeOfUse(StrEnum):
    """Why data is read: HL7 v3 PurposeOfUse codes (the subset this service accepts)."""

    TREAT = "TREAT"  # treatment
    ETREAT = "ETREAT"  # emergency treatment
    CAREMGT = "CAREMGT"  # care management
    HPAYMT = "HPAYMT"  # payment
    HOPERAT = "HOPERAT"  # health care operations
    HCOMPL = "HCOMPL"  # compliance (audits)
    HLEGAL = "HLEGAL"  # legal
    HSYSADMIN = "HSYSADMIN"  # system administration
    HRESCH = "HRESCH"  # research (only with the legal basis Part 2 requires)
    PUBHLTH = "PUBHLTH"  # public health


P = Permission
_CLINICAL_WRITES = frozenset({P.ADMIT, P.REASSESS, P.TRANSITION, P.ATTEND, P.DISCHARGE})
_CLINICAL_WRITES |= {P.READMIT, P.VOID}

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.CASE_MANAGER: frozenset(
        {
            P.READ_PATIENT,
            P.READ_IDENTITY,
            P.REASSESS,
            P.TRANSITION,
            P.READ_AGGREGATES,
            P.READ_AUDIT_TRAIL,
            P.READ_CONSENT,
        }
    ),
    Role.CLINICIAN: frozenset(
        {P.READ_PATIENT, P.READ_IDENTITY, P.READ_AGGREGATES, P.READ_AUDIT_TRAIL, P.READ_CONSENT}
        | _CLINICAL_WRITES
        | {P.MANAGE_CONSENT}
    ),
    Role.AUDITOR: frozenset(
        {
            P.READ_PATIENT,
            P.READ_AGGREGATES,
            P.READ_AUDIT_TRAIL,
            P.EXPORT_LOG,
            P.READ_ACCESS_LOG,
            P.READ_CONSENT,
            P.READ_DISCLOSURES,
        }
    ),
    Role.INTEGRATION: frozenset(_CLINICAL_WRITES | {P.POST_FEED}),
    Role.ADMIN: frozenset({P.READ_AGGREGATES, P.MANAGE_CONSENT, P.READ_CONSENT}),
}

#: Roles whose patient access is limited to the sites named in their token.
SITE_SCOPED = frozenset({Role.CASE_MANAGER, Role.CLINICIAN})

#: The purpose recorded when a caller states none.
DEFAULT_PURPOSE: dict[Role, PurposeOfUse] = {
    Role.CASE_MANAGER: PurposeOfUse.CAREMGT,
    Role.CLINICIAN: PurposeOfUse.TREAT,
    Role.AUDITOR: PurposeOfUse.HCOMPL,
    Role.INTEGRATION: PurposeOfUse.HOPERAT,
    Role.ADMIN: PurposeOfUse.HSYSADMIN,
}


class AccessDenied(ContinuumError):
    """The caller is authenticated but may not do this (HTTP 403)."""

    rule = "access.denied"


class NotAuthenticated(ContinuumError):
    """No credentials, or credentials that do not verify (HTTP 401)."""

    rule = "access.unauthenticated"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    `subject` is the token's `sub`; `sites` limits site-scoped roles (empty: no site at all);
    `organization` names the caller's organization (integrations, consent recipients)."""

    subject: str
    role: Role
    sites: frozenset[str] = field(default_factory=frozenset)
    organization: str | None = None
    #: The token's `jti`, kept in the access log to tie a read to one credential.
    token_id: str | None = None

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def sees_identity(self) -> bool:
        return self.can(Permission.READ_IDENTITY)

    def covers_site(self, site: str | None) -> bool:
        """May this caller touch a patient at `site`? Unscoped roles reach every site."""
        if self.role not in SITE_SCOPED:
            return True
        return site is not None and site in self.sites

    def site_filter(self) -> frozenset[str] | None:
        """The sites a query must be limited to, or None for every site."""
        return self.sites if self.role in SITE_SCOPED else None


def require(principal: Principal, permission: Permission, *, site: str | None = None) -> None:
    """Refuse unless the principal holds `permission` (and covers `site`, when given)."""
    if not principal.can(permission):
        raise AccessDenied(
            f"role {principal.role.value} may not {permission.value}",
            rule="access.role",
            role=principal.role.value,
            permission=permission.value,
        )
    if site is not None and not principal.covers_site(site):
        raise AccessDenied(
            f"role {principal.role.value} is limited to sites "
            f"{', '.join(sorted(principal.sites)) or '(none)'}; this patient is at {site}",
            rule="access.site",
            role=principal.role.value,
            site=site,
        )


def require_any_site(principal: Principal, sites: Iterable[str], permission: Permission) -> None:
    """For a patient seen at several sites over time: one covered site is enough."""
    require(principal, permission)
    wanted = list(sites)
    if principal.role in SITE_SCOPED and not any(principal.covers_site(s) for s in wanted):
        raise AccessDenied(
            f"role {principal.role.value} is limited to sites "
            f"{', '.join(sorted(principal.sites)) or '(none)'}; this patient is at "
            f"{', '.join(sorted(set(wanted))) or 'no site'}",
            rule="access.site",
            role=principal.role.value,
        )


class AccessAudit:
    """Records every access to patient-level data in the access log (HIPAA 164.312(b))."""

    def __init__(
        self,
        log: AccessLog,
        *,
        channel: str,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.log = log
        self.channel = channel
        self.clock = clock

    def record(
        self,
        principal: Principal,
        *,
        action: str,
        resource: str,
        purpose: PurposeOfUse | None = None,
        allowed: bool = True,
        patient_key: str | None = None,
        request_id: str | None = None,
        records: int | None = None,
    ) -> None:
        self.log.record(
            AccessEntry(
                at=self.clock(),
                subject=principal.subject,
                role=principal.role.value,
                channel=self.channel,
                action=action,
                resource=resource[:256],
                purpose=(purpose or DEFAULT_PURPOSE[principal.role]).value,
                outcome="allowed" if allowed else "denied",
                patient_key=patient_key,
                token_id=principal.token_id,
                request_id=request_id,
                records=records,
            )
        )
