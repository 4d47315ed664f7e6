"""`continuum token` end to end: the installed console script mints development tokens that the
development verifier accepts, and refuses what the verifier would refuse."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from continuum.adapters.auth.tokens import (
    DEV_ISSUER,
    DevIssuer,
    JwtVerifier,
    StaticKeys,
    public_key_from_jwk,
    verifier_from_settings,
)
from continuum.application.access import NotAuthenticated, Role
from continuum.entrypoints.cli import app
from continuum.settings import Settings

EXE = Path(sys.executable).parent / "continuum"
ROLES = "case_manager, clinician, auditor, integration, admin"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No CONTINUUM_* from the outer environment; the user data dir inside tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTINUUM_")}
    env.update(
        CONTINUUM_DATABASE_URL=f"sqlite:///{tmp_path / 'cli.sqlite3'}",
        XDG_DATA_HOME=str(tmp_path / "data"),
        HOME=str(tmp_path / "home"),
    )
    env.update(extra)
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXE), "token", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_token_create_prints_a_token_the_dev_verifier_accepts(tmp_path: Path) -> None:
    env = _env(tmp_path)
    done = _run(
        env,
        "create",
        "--role",
        "clinician",
        "--site",
        "site-a",
        "--site",
        "site-b",
        "--subject",
        "synthetic-clinician-7",
        "--org",
        "org-east",
        "--ttl",
        "600",
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == token + "\n"
    assert token.count(".") == 2

    # The key was made in the user data dir (platformdirs honours XDG_DATA_HOME), mode 0600.
    key_file = tmp_path / "data" / "care-continuum" / "dev-issuer.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    config = Settings(database_url=env["CONTINUUM_DATABASE_URL"], dev_issuer_key_file=key_file)
    principal = verifier_from_settings(config).verify(token)
    assert principal.subject == "synthetic-clinician-7"
    assert principal.role is Role.CLINICIAN
    assert principal.sites == frozenset({"site-a", "site-b"})
    assert principal.organization == "org-east"
    assert principal.token_id

    # `token jwks` publishes the key that signed it.
    jwks = _run(env, "jwks")
    assert jwks.returncode == 0, jwks.stderr
    [entry] = json.loads(jwks.stdout)["keys"]
    key = public_key_from_jwk(entry)
    assert key is not None
    assert entry["kid"] == DevIssuer.load_or_create(key_file, audience="care-continuum").kid
    from_jwks = JwtVerifier(StaticKeys({entry["kid"]: key}), issuer=DEV_ISSUER, audience="x")
    with pytest.raises(NotAuthenticated) as caught:  # minted for the configured audience only
        from_jwks.verify(token)
    assert caught.value.rule == "access.token.audience"
    from_jwks.audience = "care-continuum"
    assert from_jwks.verify(token).subject == "synthetic-clinician-7"


def test_unknown_role_exits_non_zero_naming_the_roles(tmp_path: Path) -> None:
    done = _run(_env(tmp_path), "create", "--role", "system")
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""
    assert ROLES in done.stderr
    assert "'system'" in done.stderr


runner = CliRunner()


def test_site_scoped_role_needs_a_site(tmp_path: Path) -> None:
    env = _env(tmp_path)
    result = runner.invoke(app, ["token", "create", "--role", "case_manager"], env=env)
    assert result.exit_code == 3, result.stderr
    assert "--site" in result.stderr
    assert result.stdout == ""
    # Unscoped roles need none, and the audience follows CONTINUUM_AUTH_AUDIENCE.
    env["CONTINUUM_AUTH_AUDIENCE"] = "another-deployment"
    env["CONTINUUM_DEV_ISSUER_KEY_FILE"] = str(tmp_path / "k.pem")
    result = runner.invoke(app, ["token", "create", "--role", "integration"], env=env)
    assert result.exit_code == 0, result.stderr
    issuer = DevIssuer.load_or_create(tmp_path / "k.pem", audience="another-deployment")
    principal = issuer.verifier().verify(result.stdout.strip())
    assert (principal.subject, principal.role) == ("dev-integration", Role.INTEGRATION)


def test_oidc_mode_refuses_to_mint(tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        CONTINUUM_AUTH_MODE="oidc",
        CONTINUUM_AUTH_ISSUER="https://login.example.org/realms/care",
    )
    for args in (["token", "create", "--role", "auditor"], ["token", "jwks"]):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 8, result.stderr
        assert "tokens come from the configured issuer" in result.stderr
        assert "https://login.example.org/realms/care" in result.stderr
    assert not (tmp_path / "data").exists()  # no development key was made
    missing_issuer = {**env, "CONTINUUM_AUTH_ISSUER": ""}
    result = runner.invoke(app, ["token", "jwks"], env=missing_issuer)
    assert result.exit_code == 3
    assert "CONTINUUM_AUTH_ISSUER" in result.stderr
