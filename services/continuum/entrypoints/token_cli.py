"""`continuum token`: tokens from the local development issuer (CONTINUUM_AUTH_MODE=dev only).

    continuum token create --role clinician --site site-a     print a signed RS256 token
    continuum token jwks                                      print the issuer's public keys

In oidc mode both refuse: production tokens come from the configured issuer (docs/auth.md).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from continuum.adapters.auth.tokens import DevIssuer

token_app = typer.Typer(
    help="Development tokens (CONTINUUM_AUTH_MODE=dev only; production tokens come from the "
    "configured OIDC issuer).",
    no_args_is_help=True,
)

#: Exit code for "not in this configuration" (cli.py: 8, configuration not ready).
EXIT_CONFIGURATION = 8


def _dev_issuer() -> DevIssuer:
    from continuum.adapters.auth.tokens import DevIssuer
    from continuum.entrypoints.cli import _fail, _settings

    settings = _settings()
    if settings.auth_mode != "dev":
        _fail(
            EXIT_CONFIGURATION,
            "CONTINUUM_AUTH_MODE is oidc: tokens come from the configured issuer "
            f"({settings.auth_issuer}); the development issuer is off in this mode",
        )
    return DevIssuer.load_or_create(settings.dev_issuer_key_file, audience=settings.auth_audience)


@token_app.command("create")
def create(
    role: Annotated[
        str,
        typer.Option(help="case_manager, clinician, auditor, integration or admin."),
    ],
    site: Annotated[
        list[str] | None,
        typer.Option(
            "--site",
            help="A site the token reaches (repeat; required for case_manager and clinician).",
        ),
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="The token's sub (default: dev-ROLE).")
    ] = None,
    org: Annotated[str | None, typer.Option(help="The caller's organization code.")] = None,
    ttl: Annotated[int, typer.Option(min=60, max=30 * 86_400, help="Lifetime in seconds.")] = 3600,
) -> None:
    """Print a signed development token (RS256) for ROLE."""
    from continuum.application.access import SITE_SCOPED, Role
    from continuum.domain.errors import InvalidInput
    from continuum.entrypoints.cli import _errors

    with _errors():
        allowed = ", ".join(r.value for r in Role)
        if role not in {r.value for r in Role}:
            raise InvalidInput(
                f"--role must be one of {allowed}; got {role[:40]!r}", field="role", role=role
            )
        if Role(role) in SITE_SCOPED and not site:
            raise InvalidInput(
                f"--role {role} needs at least one --site: {role} tokens reach only the sites "
                "they name",
                field="site",
            )
        issuer = _dev_issuer()
        token = issuer.issue(
            subject or f"dev-{role}",
            Role(role),
            sites=site or [],
            organization=org,
            ttl_seconds=ttl,
        )
        typer.echo(token)


@token_app.command("jwks")
def jwks() -> None:
    """Print the development issuer's public key set (JWKS)."""
    from continuum.entrypoints.cli import _errors

    with _errors():
        typer.echo(json.dumps(_dev_issuer().jwks(), indent=2))
