"""OidcVerifier against a real HTTP issuer on 127.0.0.1 (stdlib http.server in a thread):
discovery, key caching, rotation with one rate-limited refetch, an unreachable issuer, and a
key set holding the wrong key."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from continuum.adapters.auth.tokens import (
    IssuerUnavailable,
    OidcVerifier,
    jwk_thumbprint,
    rsa_public_jwk,
)
from continuum.application.access import NotAuthenticated, Role

AUDIENCE = "care-continuum"


@dataclass
class Key:
    private: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    @property
    def jwk(self) -> dict[str, str]:
        return rsa_public_jwk(self.private.public_key())

    @property
    def kid(self) -> str:
        return jwk_thumbprint(self.jwk)

    def published(self, kid: str | None = None) -> dict[str, str]:
        return {**self.jwk, "kid": kid or self.kid, "use": "sig", "alg": "RS256"}


@dataclass
class Issuer:
    """What the fake issuer serves; tests change it while the server runs."""

    base: str = ""
    keys: list[dict[str, str]] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    issuer_override: str | None = None

    @property
    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer_override or self.base,
            "jwks_uri": f"{self.base}/protocol/openid-connect/certs",
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def token(self, key: Key, *, kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": self.base,
            "aud": AUDIENCE,
            "sub": "synthetic-oidc-user",
            "iat": now,
            "exp": now + 300,
            "jti": f"jti-{now}",
            "role": "auditor",
            **claims,
        }
        return jwt.encode(body, key.private, algorithm="RS256", headers={"kid": kid or key.kid})


def _handler(state: Issuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            state.hits[path] += 1
            if path in state.status:
                self._send(state.status[path], {"error": "down for the test"})
            elif path == "/.well-known/openid-configuration":
                self._send(200, state.discovery)
            elif path == "/protocol/openid-connect/certs":
                self._send(200, {"keys": list(state.keys)})
            else:
                self._send(404, {"error": "not found"})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    state = Issuer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_discovery_then_cached_keys(issuer: Issuer) -> None:
    key = Key()
    issuer.keys = [key.published()]
    verifier = OidcVerifier(issuer.base, AUDIENCE)
    assert verifier.jwks_url is None  # nothing fetched before the first token
    principal = verifier.verify(issuer.token(key))
    assert (principal.subject, principal.role) == ("synthetic-oidc-user", Role.AUDITOR)
    assert verifier.jwks_url == f"{issuer.base}/protocol/openid-connect/certs"
    for _ in range(5):
        verifier.verify(issuer.token(key))
    assert issuer.hits == Counter(
        {"/.well-known/openid-configuration": 1, "/protocol/openid-connect/certs": 1}
    )


def test_configured_jwks_url_skips_discovery(issuer: Issuer) -> None:
    key = Key()
    issuer.keys = [key.published()]
    verifier = OidcVerifier(
        issuer.base, AUDIENCE, jwks_url=f"{issuer.base}/protocol/openid-connect/certs"
    )
    assert verifier.verify(issuer.token(key)).role is Role.AUDITOR
    assert issuer.hits["/.well-known/openid-configuration"] == 0


def test_key_rotation_verifies_after_one_rate_limited_refetch(issuer: Issuer) -> None:
    old, new = Key(), Key()
    issuer.keys = [old.published()]
    clock = FakeClock()
    verifier = OidcVerifier(issuer.base, AUDIENCE, min_refresh_seconds=30, clock=clock)
    certs = "/protocol/openid-connect/certs"
    assert verifier.verify(issuer.token(old)).role is Role.AUDITOR
    assert issuer.hits[certs] == 1

    # The issuer rotates: the new key's kid is only in the refreshed key set.
    issuer.keys = [old.published(), new.published()]
    clock.now += 60
    rotated = issuer.token(new, role="clinician", sites=["site-a"])
    principal = verifier.verify(rotated)
    assert (principal.role, principal.sites) == (Role.CLINICIAN, frozenset({"site-a"}))
    assert issuer.hits[certs] == 2
    assert verifier.verify(rotated).role is Role.CLINICIAN  # cached now
    assert verifier.verify(issuer.token(old)).role is Role.AUDITOR
    assert issuer.hits[certs] == 2

    # Forged key ids right after a fetch do not reach the issuer (rate limit) ...
    stranger = Key()
    for n in range(10):
        with pytest.raises(NotAuthenticated) as caught:
            verifier.verify(issuer.token(stranger, kid=f"forged-{n}"))
        assert caught.value.rule == "access.token.unknown_key"
    assert issuer.hits[certs] == 2
    # ... and once the pause is over, one of them causes exactly one more fetch.
    clock.now += 31
    for n in range(10):
        with pytest.raises(NotAuthenticated):
            verifier.verify(issuer.token(stranger, kid=f"forged-again-{n}"))
    assert issuer.hits[certs] == 3


def test_withdrawn_keys_stop_verifying_after_the_cache_ages(issuer: Issuer) -> None:
    old, new = Key(), Key()
    issuer.keys = [old.published()]
    clock = FakeClock()
    verifier = OidcVerifier(issuer.base, AUDIENCE, max_key_age_seconds=600, clock=clock)
    token = issuer.token(old)
    verifier.verify(token)
    issuer.keys = [new.published()]
    clock.now += 300
    verifier.verify(token)  # still cached
    assert verifier.cached(token) is not None  # and answered without a fetch
    clock.now += 301
    assert verifier.cached(token) is None  # the key set is due for a refresh: verify fetches
    with pytest.raises(NotAuthenticated) as caught:
        verifier.verify(token)
    assert caught.value.rule == "access.token.unknown_key"
    assert verifier.verify(issuer.token(new)).role is Role.AUDITOR


def test_cached_keys_survive_an_issuer_outage(issuer: Issuer) -> None:
    key = Key()
    issuer.keys = [key.published()]
    clock = FakeClock()
    verifier = OidcVerifier(issuer.base, AUDIENCE, max_key_age_seconds=600, clock=clock)
    verifier.verify(issuer.token(key))
    issuer.status["/protocol/openid-connect/certs"] = 503
    clock.now += 700  # the cache is due for a refresh, which fails
    assert verifier.verify(issuer.token(key)).role is Role.AUDITOR
    assert issuer.hits["/protocol/openid-connect/certs"] == 2


def test_jwks_endpoint_down(issuer: Issuer) -> None:
    issuer.status["/protocol/openid-connect/certs"] = 503
    verifier = OidcVerifier(issuer.base, AUDIENCE)
    token = issuer.token(Key())
    with pytest.raises(IssuerUnavailable) as caught:
        verifier.verify(token)
    error = caught.value
    assert error.rule == "access.token.issuer_unreachable"
    assert f"{issuer.base}/protocol/openid-connect/certs" in error.message
    assert "HTTP 503" in error.message
    assert "CONTINUUM_AUTH_JWKS_URL" in error.message
    assert token not in str(error)
    # The issuer is not hammered: a retry within the pause reports the same failure.
    with pytest.raises(IssuerUnavailable):
        verifier.verify(token)
    assert issuer.hits["/protocol/openid-connect/certs"] == 1


def test_nothing_listening(issuer: Issuer) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/keys"
    verifier = OidcVerifier(issuer.base, AUDIENCE, jwks_url=url, timeout_seconds=2)
    with pytest.raises(IssuerUnavailable, match="Connection refused") as caught:
        verifier.verify(issuer.token(Key()))
    assert url in caught.value.message


def test_discovery_down_names_the_discovery_url(issuer: Issuer) -> None:
    issuer.status["/.well-known/openid-configuration"] = 404
    verifier = OidcVerifier(issuer.base + "/", AUDIENCE)
    with pytest.raises(IssuerUnavailable) as caught:
        verifier.verify(issuer.token(Key()))
    assert f"{issuer.base}/.well-known/openid-configuration" in caught.value.message
    assert "CONTINUUM_AUTH_ISSUER" in caught.value.message


def test_discovery_for_another_issuer_is_refused(issuer: Issuer) -> None:
    issuer.issuer_override = "https://someone-else.example"
    verifier = OidcVerifier(issuer.base, AUDIENCE)
    with pytest.raises(IssuerUnavailable, match="someone-else"):
        verifier.verify(issuer.token(Key()))


def test_jwks_with_the_wrong_key_is_a_signature_error(issuer: Issuer) -> None:
    signer, impostor = Key(), Key()
    # The key set publishes another key under the signer's kid.
    issuer.keys = [impostor.published(kid=signer.kid)]
    verifier = OidcVerifier(issuer.base, AUDIENCE)
    token = issuer.token(signer)
    with pytest.raises(NotAuthenticated) as caught:
        verifier.verify(token)
    assert caught.value.rule == "access.token.signature"
    assert token not in str(caught.value)


def test_token_claims_checked_against_the_configured_issuer(issuer: Issuer) -> None:
    key = Key()
    issuer.keys = [key.published()]
    verifier = OidcVerifier(issuer.base, AUDIENCE, role_claim="realm_access.roles")
    keycloak_style = issuer.token(
        key, role=None, realm_access={"roles": ["offline_access", "integration"]}
    )
    assert verifier.verify(keycloak_style).role is Role.INTEGRATION
    with pytest.raises(NotAuthenticated) as caught:
        verifier.verify(issuer.token(key, iss="https://other.example"))
    assert caught.value.rule == "access.token.issuer"
    with pytest.raises(NotAuthenticated) as caught:
        verifier.verify(issuer.token(key, aud="another-api"))
    assert caught.value.rule == "access.token.audience"


def test_unusable_key_set(issuer: Issuer) -> None:
    issuer.keys = [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]
    verifier = OidcVerifier(issuer.base, AUDIENCE)
    with pytest.raises(IssuerUnavailable, match="no RS256 signature key"):
        verifier.verify(issuer.token(Key()))


def test_an_issuer_that_answers_junk(issuer: Issuer) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer_junk() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"this is not HTTP\r\n\r\n")

        thread = threading.Thread(target=answer_junk, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}/keys"
        verifier = OidcVerifier(issuer.base, AUDIENCE, jwks_url=url, timeout_seconds=5)
        with pytest.raises(IssuerUnavailable) as caught:
            verifier.verify(issuer.token(Key()))
        thread.join(timeout=5)
    assert url in caught.value.message
