"""Bearer token verification (continuum.adapters.auth.tokens) with real RS256 signatures.

Keys are generated here with cryptography; subjects are synthetic. Every refused token must
raise NotAuthenticated with its own rule, and no message may repeat the token.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from continuum.adapters.auth.tokens import (
    DEV_ISSUER,
    DevIssuer,
    JwtVerifier,
    OidcVerifier,
    StaticKeys,
    jwk_thumbprint,
    principal_from_claims,
    public_key_from_jwk,
    rsa_public_jwk,
    verifier_from_settings,
)
from continuum.application.access import SITE_SCOPED, NotAuthenticated, Principal, Role
from continuum.domain.errors import ContinuumError, InvalidInput
from continuum.settings import Settings

AUDIENCE = "care-continuum-test"


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer(_rsa_key(), audience=AUDIENCE)


@pytest.fixture(scope="module")
def verifier(issuer: DevIssuer) -> JwtVerifier:
    return issuer.verifier(leeway_seconds=30)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": DEV_ISSUER,
        "aud": AUDIENCE,
        "sub": "synthetic-user-1",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "jti-0001",
        "role": "clinician",
        "sites": ["site-a"],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(
    issuer: DevIssuer,
    claims: dict[str, Any],
    *,
    key: rsa.RSAPrivateKey | None = None,
    algorithm: str = "RS256",
    kid: str | None = "same",
) -> str:
    headers = {} if kid is None else {"kid": issuer.kid if kid == "same" else kid}
    return jwt.encode(claims, key or issuer.private_key, algorithm=algorithm, headers=headers)


def _rs256_raw(key: rsa.RSAPrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """Sign any payload at all (PyJWT's encoder refuses some, e.g. a non-string iss)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def _refused(verifier: JwtVerifier, token: str, rule: str) -> NotAuthenticated:
    with pytest.raises(NotAuthenticated) as caught:
        verifier.verify(token)
    error = caught.value
    assert error.rule == f"access.token.{rule}", (error.rule, error.message)
    text = json.dumps(error.as_dict()) + str(error)
    if len(token) > 8:
        assert token not in text
        for part in token.split("."):
            assert len(part) < 12 or part not in text, "a refusal echoed part of the token"
    return error


# -- the happy path --------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_dev_issuer_round_trip_for_every_role(
    issuer: DevIssuer, verifier: JwtVerifier, role: Role
) -> None:
    sites = ["site-a", "site-b"] if role in SITE_SCOPED else []
    token = issuer.issue(f"synthetic-{role.value}", role, sites=sites, organization="org-1")
    principal = verifier.verify(token)
    assert principal == Principal(
        subject=f"synthetic-{role.value}",
        role=role,
        sites=frozenset(sites),
        organization="org-1",
        token_id=principal.token_id,
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert principal.token_id == claims["jti"]
    assert len(claims["jti"]) == 32
    assert claims["iss"] == DEV_ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == 3600
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "typ": "JWT", "kid": issuer.kid}


def test_every_token_has_its_own_jti(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    ids = {verifier.verify(issuer.issue("synthetic-a", "auditor")).token_id for _ in range(20)}
    assert len(ids) == 20


def test_site_scoped_roles_without_sites_are_not_issued(issuer: DevIssuer) -> None:
    with pytest.raises(InvalidInput, match="must name its sites") as caught:
        issuer.issue("synthetic-a", Role.CASE_MANAGER)
    assert caught.value.field == "sites"
    with pytest.raises(InvalidInput, match="must be one of"):
        issuer.issue("synthetic-a", "system")


# -- the key file and the key id -------------------------------------------------------------


def test_rfc7638_thumbprint_example() -> None:
    # RFC 7638 section 3.1: the example key and its thumbprint.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo"
        "c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
        "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI"
        "4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dev-issuer.pem"
    first = DevIssuer.load_or_create(path, audience=AUDIENCE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["dev-issuer.pem"]  # no temporary left
    second = DevIssuer.load_or_create(path, audience=AUDIENCE)
    assert second.kid == first.kid == jwk_thumbprint(rsa_public_jwk(first.private_key.public_key()))
    # A token from one instance verifies with the other: the key is the file's.
    assert second.verifier().verify(first.issue("synthetic-a", "admin")).role is Role.ADMIN
    other = DevIssuer.load_or_create(tmp_path / "other.pem", audience=AUDIENCE)
    assert other.kid != first.kid


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dev-issuer.pem"
    DevIssuer.load_or_create(path, audience=AUDIENCE)
    os.chmod(path, 0o644)
    with pytest.raises(ContinuumError, match="chmod 600") as caught:
        DevIssuer.load_or_create(path, audience=AUDIENCE)
    assert caught.value.rule == "auth.dev_key"


def test_key_file_that_is_not_a_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dev-issuer.pem"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(ContinuumError, match="Delete the file") as caught:
        DevIssuer.load_or_create(path, audience=AUDIENCE)
    assert caught.value.rule == "auth.dev_key"


def test_jwks_holds_the_public_key_only(issuer: DevIssuer) -> None:
    document = issuer.jwks()
    [entry] = document["keys"]
    assert entry["kid"] == issuer.kid
    assert entry["alg"] == "RS256"
    assert entry["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(entry)
    key = public_key_from_jwk(entry)
    assert key is not None
    from_jwks = JwtVerifier(StaticKeys({entry["kid"]: key}), issuer=DEV_ISSUER, audience=AUDIENCE)
    assert from_jwks.verify(issuer.issue("synthetic-a", "auditor")).subject == "synthetic-a"


def test_unusable_jwks_entries_are_ignored() -> None:
    strong = rsa_public_jwk(_rsa_key().public_key())
    weak = rsa_public_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    )
    assert public_key_from_jwk(strong) is not None
    assert public_key_from_jwk({**strong, "alg": "RS256", "use": "sig"}) is not None
    assert public_key_from_jwk(weak) is None
    assert public_key_from_jwk({**strong, "use": "enc"}) is None
    assert public_key_from_jwk({**strong, "alg": "HS256"}) is None
    assert public_key_from_jwk({**strong, "key_ops": ["encrypt"]}) is None
    assert public_key_from_jwk({"kty": "oct", "k": "c2VjcmV0"}) is None
    assert public_key_from_jwk({"kty": "RSA", "n": "!!", "e": "AQAB"}) is None
    assert public_key_from_jwk({"kty": "RSA", "e": "AQAB"}) is None


# -- time ------------------------------------------------------------------------------------


def test_expired(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    token = issuer.issue("synthetic-a", "auditor", ttl_seconds=-3600)
    error = _refused(verifier, token, "expired")
    assert error.field == "exp"
    assert "get a new one" in error.message


def test_not_yet_valid(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    token = issuer.issue("synthetic-a", "auditor", now=later)
    error = _refused(verifier, token, "not_yet_valid")
    assert error.field == "nbf"
    assert "clocks" in error.message
    # A token with only a future iat (no nbf) is refused the same way.
    future_iat = _sign(issuer, _claims(iat=int(time.time()) + 600, nbf=None))
    assert _refused(verifier, future_iat, "not_yet_valid").field == "iat"


def test_leeway_accepts_clock_skew_within_and_refuses_beyond(issuer: DevIssuer) -> None:
    now = int(time.time())
    verifier = issuer.verifier(leeway_seconds=30)
    strict = issuer.verifier(leeway_seconds=0)
    just_expired = _sign(issuer, _claims(iat=now - 600, nbf=now - 600, exp=now - 10))
    assert verifier.verify(just_expired).subject == "synthetic-user-1"
    _refused(strict, just_expired, "expired")
    long_expired = _sign(issuer, _claims(iat=now - 600, nbf=now - 600, exp=now - 120))
    _refused(verifier, long_expired, "expired")

    slightly_early = _sign(issuer, _claims(iat=now + 10, nbf=now + 10))
    assert verifier.verify(slightly_early).subject == "synthetic-user-1"
    _refused(strict, slightly_early, "not_yet_valid")
    far_early = _sign(issuer, _claims(iat=now, nbf=now + 120))
    _refused(verifier, far_early, "not_yet_valid")


# -- signatures and algorithms ---------------------------------------------------------------


def test_tampered_payload(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    good = issuer.issue("synthetic-a", "auditor")
    header, _, signature = good.split(".")
    forged = _b64(json.dumps(_claims(role="admin", sites=[]), separators=(",", ":")).encode())
    _refused(verifier, f"{header}.{forged}.{signature}", "signature")


def test_tampered_signature(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    good = issuer.issue("synthetic-a", "auditor")
    header, payload, signature = good.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    _refused(verifier, f"{header}.{payload}.{_b64(bytes(raw))}", "signature")
    _refused(verifier, f"{header}.{payload}.", "signature")


def test_signed_by_another_key_with_the_same_kid(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    token = _sign(issuer, _claims(), key=_rsa_key())
    _refused(verifier, token, "signature")


def test_wrong_audience(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    error = _refused(verifier, _sign(issuer, _claims(aud="someone-else")), "audience")
    assert "'someone-else'" in error.message
    assert AUDIENCE in error.message
    _refused(verifier, _sign(issuer, _claims(aud=["a", "b"])), "audience")
    # An audience list that includes this service is fine.
    assert verifier.verify(_sign(issuer, _claims(aud=["other", AUDIENCE])))


def test_wrong_issuer(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    error = _refused(verifier, _sign(issuer, _claims(iss="https://evil.example")), "issuer")
    assert error.field == "iss"
    assert "https://evil.example" in error.message


def test_unsigned_alg_none(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    token = jwt.encode(_claims(), key="", algorithm="none")
    assert token.endswith(".")
    error = _refused(verifier, token, "algorithm")
    assert "alg none" in error.message
    with_kid = jwt.encode(_claims(), key="", algorithm="none", headers={"kid": issuer.kid})
    _refused(verifier, with_kid, "algorithm")


class _SpyKeys:
    """A key set that records every lookup (an algorithm refusal must come first)."""

    def __init__(self, inner: StaticKeys) -> None:
        self.inner = inner
        self.lookups: list[str | None] = []

    def key(self, kid: str | None) -> rsa.RSAPublicKey:
        self.lookups.append(kid)
        return self.inner.key(kid)


def test_hs256_signed_with_the_public_key_is_refused(issuer: DevIssuer) -> None:
    """The classic confusion: an attacker HMACs a token with the (public) PEM as the secret,
    hoping the verifier feeds the same PEM to an HS256 check."""
    spy = _SpyKeys(StaticKeys({issuer.kid: issuer.private_key.public_key()}))
    verifier = JwtVerifier(spy, issuer=DEV_ISSUER, audience=AUDIENCE)
    public_pem = issuer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (public_pem, json.dumps(issuer.jwks()["keys"][0]).encode()):
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": issuer.kid}).encode())
        payload = _b64(json.dumps(_claims(role="admin", sites=[])).encode())
        mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        token = f"{header}.{payload}.{_b64(mac)}"
        # A correct HMAC over the token: a verifier that let the header pick the algorithm
        # and used the published key as the secret would accept it.
        assert hmac.compare_digest(
            base64.urlsafe_b64decode(token.split(".")[2] + "="),
            hmac.new(secret, token.rsplit(".", 1)[0].encode(), hashlib.sha256).digest(),
        )
        error = _refused(verifier, token, "algorithm")
        assert "'HS256'" in error.message
    assert spy.lookups == []


@pytest.mark.parametrize("algorithm", ["RS512", "PS256", "RS384"])
def test_other_rsa_algorithms_are_refused_even_with_the_right_key(
    issuer: DevIssuer, verifier: JwtVerifier, algorithm: str
) -> None:
    token = _sign(issuer, _claims(), algorithm=algorithm)
    _refused(verifier, token, "algorithm")


def test_unknown_kid(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    other = _rsa_key()
    error = _refused(
        verifier, _sign(issuer, _claims(), key=other, kid="rotated-2031"), "unknown_key"
    )
    assert error.field == "kid"
    assert "'rotated-2031'" in error.message


def test_token_without_kid_uses_the_only_key(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    assert verifier.verify(_sign(issuer, _claims(), kid=None)).role is Role.CLINICIAN
    two = JwtVerifier(
        StaticKeys({"a": issuer.private_key.public_key(), "b": _rsa_key().public_key()}),
        issuer=DEV_ISSUER,
        audience=AUDIENCE,
    )
    _refused(two, _sign(issuer, _claims(), kid=None), "unknown_key")


# -- claims ----------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["sub", "exp", "iat"])
def test_missing_required_claims(issuer: DevIssuer, verifier: JwtVerifier, claim: str) -> None:
    claims = _claims()
    del claims[claim]
    error = _refused(verifier, _sign(issuer, claims), "claims")
    assert error.field == claim


@pytest.mark.parametrize(
    ("claims", "field"),
    [
        ({"sub": ""}, "sub"),
        ({"sub": "x" * 129}, "sub"),
        ({"sub": "line\nbreak"}, "sub"),
        ({"sub": 42}, None),
        ({"exp": "tomorrow"}, None),
        ({"iat": "today"}, None),
        ({"sites": "site-a"}, "sites"),
        ({"sites": ["site a; drop"]}, "sites"),
        ({"sites": [1, 2]}, "sites"),
        ({"org": {"name": "x"}}, "org"),
    ],
)
def test_invalid_claims(
    issuer: DevIssuer, verifier: JwtVerifier, claims: dict[str, Any], field: str | None
) -> None:
    error = _refused(verifier, _sign(issuer, _claims(**claims)), "claims")
    if field is not None:
        assert error.field == field


@pytest.mark.parametrize("role", ["system", "SYSTEM", "superuser", "", "Clinician", 1, None])
def test_unknown_role(issuer: DevIssuer, verifier: JwtVerifier, role: Any) -> None:
    error = _refused(verifier, _sign(issuer, _claims(role=role)), "role")  # None: no role claim
    assert error.field == "role"
    assert "admin, auditor, case_manager, clinician, integration" in error.message


def test_case_manager_without_sites(issuer: DevIssuer, verifier: JwtVerifier) -> None:
    empty: list[list[str] | None] = [[], None]
    for sites in empty:
        claims = _claims(role="case_manager", sites=sites)
        error = _refused(verifier, _sign(issuer, claims), "claims")
        assert error.field == "sites"
        assert "case_manager" in error.message
    # Unscoped roles need no sites.
    assert verifier.verify(_sign(issuer, _claims(role="auditor", sites=None))).sites == frozenset()


def test_role_claim_is_configurable_and_may_be_a_list() -> None:
    # Entra ID: app roles in "roles"; Keycloak: realm roles under realm_access.roles.
    entra = principal_from_claims({"sub": "synthetic-e", "roles": ["auditor"]}, role_claim="roles")
    assert entra.role is Role.AUDITOR
    keycloak = principal_from_claims(
        {
            "sub": "synthetic-k",
            "realm_access": {"roles": ["offline_access", "clinician", "default-roles-care"]},
            "sites": ["site-a"],
        },
        role_claim="realm_access.roles",
    )
    assert keycloak.role is Role.CLINICIAN
    with pytest.raises(NotAuthenticated, match="several roles") as caught:
        principal_from_claims(
            {"sub": "synthetic-k", "roles": ["auditor", "admin"]}, role_claim="roles"
        )
    assert caught.value.rule == "access.token.role"
    with pytest.raises(NotAuthenticated) as caught:
        principal_from_claims(
            {"sub": "synthetic-k", "roles": ["offline_access"]}, role_claim="roles"
        )
    assert caught.value.rule == "access.token.role"
    # A claim whose name itself has dots (namespaced claims) is found as a whole.
    namespaced = principal_from_claims(
        {"sub": "synthetic-n", "https://care.example/role": "admin"},
        role_claim="https://care.example/role",
    )
    assert namespaced.role is Role.ADMIN


def test_long_jti_is_hashed_to_fit_the_access_log() -> None:
    short = principal_from_claims({"sub": "s", "role": "admin", "jti": "abc"})
    assert short.token_id == "abc"
    long = principal_from_claims({"sub": "s", "role": "admin", "jti": "x" * 300})
    assert long.token_id is not None
    assert len(long.token_id) == 64
    assert long.token_id.startswith("sha256:")


# -- garbage ---------------------------------------------------------------------------------

_HEADER = _b64(b'{"alg":"RS256","typ":"JWT"}')

GARBAGE = [
    "",
    "   ",
    "not-a-jwt",
    "a.b",
    "a.b.c.d",
    "...",
    "..",
    f"{_HEADER}..sig",
    "eyJ.eyJ.c2ln",
    "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    _b64(b"[1,2,3]") + ".e30.c2ln",
    _b64(b"not json") + ".e30.c2ln",
    _b64(b'{"alg":"RS256","kid":7}') + ".e30.c2ln",
    _b64(b'{"alg":"RS256","crit":["exp"]}') + ".e30.c2ln",
    _b64(b"[" * 5000 + b"]" * 5000) + ".e30.c2ln",
    f"{_HEADER}.{_b64(b'[' * 5000 + b']' * 5000)}.c2ln",
    f"{_HEADER}.e30.c2ln!",
    f"{_HEADER}.e30.c2ln\n",
    "é.é.é",
    "x" * 20_000,
    "\x00.\x00.\x00",
]


@pytest.mark.parametrize("token", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_refused_cleanly(verifier: JwtVerifier, token: str) -> None:
    with pytest.raises(NotAuthenticated) as caught:
        verifier.verify(token)
    assert caught.value.rule in {
        "access.token.missing",
        "access.token.malformed",
        "access.token.algorithm",
        "access.token.unknown_key",
        "access.token.signature",
    }, caught.value.rule
    if len(token.strip()) > 8:
        assert token not in str(caught.value)


def test_missing_token(verifier: JwtVerifier) -> None:
    _refused(verifier, "", "missing")
    _refused(verifier, "  ", "missing")


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(
            st.text(
                alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                max_size=60,
            ),
            min_size=3,
            max_size=3,
        ).map(".".join),
        st.builds(
            lambda header, payload, sig: f"{_b64(header)}.{_b64(payload)}.{_b64(sig)}",
            st.one_of(
                st.binary(max_size=80),
                st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=4).map(
                    lambda h: json.dumps({**h, "alg": "RS256"}).encode()
                ),
            ),
            st.binary(max_size=80),
            st.binary(max_size=300),
        ),
    )
)
def test_arbitrary_input_only_ever_raises_not_authenticated(
    verifier: JwtVerifier, token: str
) -> None:
    with pytest.raises(NotAuthenticated):
        verifier.verify(token)


_PROPERTY_ISSUER = DevIssuer(_rsa_key(), audience=AUDIENCE)
_PROPERTY_VERIFIER = _PROPERTY_ISSUER.verifier()


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["sub", "role", "sites", "org", "jti", "exp", "iat", "nbf", "aud", "iss"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(allow_nan=False),
            st.text(max_size=20),
            st.lists(st.text(max_size=10), max_size=3),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        ),
    )
)
def test_signed_but_arbitrary_claims_verify_or_refuse_cleanly(claims: dict[str, Any]) -> None:
    issuer = _PROPERTY_ISSUER
    header = {"alg": "RS256", "kid": issuer.kid}
    token = _rs256_raw(issuer.private_key, header, {**_claims(), **claims})
    try:
        principal = _PROPERTY_VERIFIER.verify(token)
    except NotAuthenticated as exc:
        rule = exc.rule
        assert rule.startswith("access.token."), rule
    else:
        assert isinstance(principal.role, Role)
        assert principal.role not in SITE_SCOPED or principal.sites


# -- settings --------------------------------------------------------------------------------


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'x.sqlite3'}",
        dev_issuer_key_file=tmp_path / "dev.pem",
        **values,
    )


def test_verifier_from_settings_dev_mode(tmp_path: Path) -> None:
    config = _settings(tmp_path, auth_leeway_seconds=5)
    assert config.auth_mode == "dev"
    assert config.auth_audience == "care-continuum"
    assert config.auth_leeway_seconds == 5
    verifier = verifier_from_settings(config)
    issuer = DevIssuer.load_or_create(tmp_path / "dev.pem", audience=config.auth_audience)
    token = issuer.issue("synthetic-a", "clinician", sites=["site-z"])
    principal = verifier.verify(token)
    assert (principal.role, principal.sites) == (Role.CLINICIAN, frozenset({"site-z"}))
    other = DevIssuer(_rsa_key(), audience=config.auth_audience)
    with pytest.raises(NotAuthenticated):
        verifier.verify(other.issue("synthetic-a", "auditor"))


def test_verifier_from_settings_oidc_mode(tmp_path: Path) -> None:
    config = _settings(
        tmp_path,
        auth_mode="oidc",
        auth_issuer="https://login.example.org/realms/care",
        auth_role_claim="realm_access.roles",
        auth_leeway_seconds=60,
    )
    verifier = verifier_from_settings(config)
    assert isinstance(verifier, OidcVerifier)
    assert verifier.issuer == "https://login.example.org/realms/care"
    assert verifier.discovery_url == (
        "https://login.example.org/realms/care/.well-known/openid-configuration"
    )
    assert (verifier.role_claim, verifier.leeway_seconds) == ("realm_access.roles", 60)


def test_oidc_settings_need_an_issuer_over_https(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="CONTINUUM_AUTH_ISSUER"):
        _settings(tmp_path, auth_mode="oidc")
    with pytest.raises(
        ValidationError, match=re.escape("CONTINUUM_AUTH_ISSUER: 'http://login.example.org'")
    ):
        _settings(tmp_path, auth_mode="oidc", auth_issuer="http://login.example.org")
    with pytest.raises(ValidationError, match="CONTINUUM_AUTH_JWKS_URL"):
        _settings(
            tmp_path,
            auth_mode="oidc",
            auth_issuer="https://login.example.org",
            auth_jwks_url="ftp://login.example.org/keys",
        )
    # Plain HTTP is fine to this host (a local test issuer).
    assert _settings(tmp_path, auth_mode="oidc", auth_issuer="http://127.0.0.1:8081").auth_issuer
    with pytest.raises(ValidationError, match="auth_leeway_seconds"):
        _settings(tmp_path, auth_leeway_seconds=3600)
    with pytest.raises(ValidationError, match="auth_mode"):
        _settings(tmp_path, auth_mode="none")


def test_oidc_verifier_refuses_insecure_urls() -> None:
    with pytest.raises(ValueError, match="not an https:// URL"):
        OidcVerifier("http://login.example.org", AUDIENCE)
    with pytest.raises(ValueError, match="jwks_url"):
        OidcVerifier("https://login.example.org", AUDIENCE, jwks_url="http://keys.example.org/")


# -- the cache of verified tokens -------------------------------------------------------------


def test_a_cached_token_is_refused_once_it_expires(issuer: DevIssuer) -> None:
    verifier = issuer.verifier(leeway_seconds=0)
    token = _sign(issuer, _claims(exp=int(time.time()) + 2))
    assert verifier.verify(token).subject == "synthetic-user-1"
    assert verifier.verify(token).subject == "synthetic-user-1"  # from the cache
    time.sleep(3.1)  # past exp: the cache never outlives the token
    _refused(verifier, token, "expired")


def test_a_cached_token_does_not_vouch_for_an_altered_copy(issuer: DevIssuer) -> None:
    verifier = issuer.verifier()
    token = _sign(issuer, _claims(sub="synthetic-user-7"))
    assert verifier.verify(token).subject == "synthetic-user-7"
    header, _payload, signature = token.split(".")
    forged = _b64(json.dumps({**_claims(sub="synthetic-user-7"), "role": "admin"}).encode())
    _refused(verifier, f"{header}.{forged}.{signature}", "signature")


def test_the_cache_of_verified_tokens_is_bounded(issuer: DevIssuer) -> None:
    verifier = issuer.verifier()
    verifier.CACHE_ENTRIES = 3
    tokens = [_sign(issuer, _claims(sub=f"synthetic-user-{n}")) for n in range(7)]
    for n, token in enumerate(tokens):
        assert verifier.verify(token).subject == f"synthetic-user-{n}"
        assert 1 <= len(verifier._verified) <= 3


def test_a_cached_token_is_refused_once_its_key_leaves_the_key_set(issuer: DevIssuer) -> None:
    verifier = issuer.verifier()
    token = _sign(issuer, _claims(sub="synthetic-user-9"))
    assert verifier.verify(token).subject == "synthetic-user-9"
    verifier.keys = StaticKeys({"rotated-2032": _rsa_key().public_key()})
    _refused(verifier, token, "unknown_key")


def test_cached_answers_only_what_verify_would_answer_without_work(issuer: DevIssuer) -> None:
    """`cached` (used by the API in line, before going to a thread) gives a principal only
    for a token verified a moment ago whose key is still in the key set, as it stands."""
    verifier = issuer.verifier(leeway_seconds=0)
    token = _sign(issuer, _claims(sub="synthetic-user-4", exp=int(time.time()) + 2))
    assert verifier.cached(token) is None  # never verified: verify must run
    assert verifier.verify(token).subject == "synthetic-user-4"
    hit = verifier.cached(token)
    assert hit is not None and hit.subject == "synthetic-user-4"
    header, _payload, signature = token.split(".")
    forged = _b64(json.dumps({**_claims(sub="synthetic-user-4"), "role": "admin"}).encode())
    assert verifier.cached(f"{header}.{forged}.{signature}") is None
    keys = verifier.keys
    verifier.keys = StaticKeys({"rotated-2032": _rsa_key().public_key()})
    assert verifier.cached(token) is None  # its key left the key set
    verifier.keys = keys
    assert verifier.cached(token) is not None
    time.sleep(2.1)  # past exp
    assert verifier.cached(token) is None
    _refused(verifier, token, "expired")
