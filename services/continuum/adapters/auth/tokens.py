"""Bearer JWTs: verification against an OIDC issuer's JWKS, and a local development issuer.

Only RS256 is accepted: `alg: none`, HMAC (including an HS256 token "signed" with the public
key) and every other algorithm are refused before any key is looked at, and keys only ever come
from the configured key set (never from the token's `jku`, `x5u` or `jwk` headers). Every
refusal raises `NotAuthenticated` with its own rule code (docs/auth.md); no message repeats the
token. An issuer whose keys cannot be fetched raises `IssuerUnavailable` (HTTP 503): the caller
is not at fault.

    JwtVerifier    the one verification path: RS256 signature, iss, aud, exp/nbf/iat with
                   leeway, required claims, then the claims -> `Principal`
    OidcVerifier   production: keys from the issuer's JWKS (discovered from
                   {issuer}/.well-known/openid-configuration unless a JWKS URL is configured),
                   cached, refetched once on an unknown key id (rotation), rate-limited
    DevIssuer      the embedded default: an RSA key kept in a 0600 file, tokens for any role,
                   `continuum token create`; never for production
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import ipaddress
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.exceptions import InvalidIssuedAtError, InvalidJTIError, InvalidSubjectError
from platformdirs import user_data_dir

from continuum.application.access import SITE_SCOPED, NotAuthenticated, Principal, Role
from continuum.domain.errors import ContinuumError, InvalidInput

if TYPE_CHECKING:
    from continuum.settings import Settings

ALGORITHM = "RS256"
DEV_ISSUER = "urn:care-continuum:dev-issuer"
#: Longer bearer tokens are refused before any parsing.
MAX_TOKEN_CHARS = 16_384
#: JWKS keys shorter than this are ignored (NIST SP 800-131A).
MIN_RSA_BITS = 2048
#: The most a discovery document or key set may weigh.
MAX_DOCUMENT_BYTES = 1_048_576

_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]*$")
_SHOWABLE = re.compile(r"^[A-Za-z0-9._:/+\-]{1,100}$")
_ROLES = tuple(sorted(role.value for role in Role))


class IssuerUnavailable(ContinuumError):
    """The issuer's keys could not be fetched: the service cannot verify anyone (HTTP 503)."""

    rule = "access.token.issuer_unreachable"


class TokenVerifier(Protocol):
    """Turns a bearer token into a `Principal`, or raises `NotAuthenticated`."""

    def verify(self, token: str) -> Principal: ...

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified a moment ago, if that answer still stands and
        needs nothing fetched; None means: call `verify` (which may block on the network)."""
        ...


class KeySet(Protocol):
    """The issuer's public keys, by key id (`kid`)."""

    def key(self, kid: str | None) -> rsa.RSAPublicKey: ...

    def cached(self, kid: str | None) -> rsa.RSAPublicKey | None:
        """The key as `key` would give it now without fetching anything, else None."""
        ...


def _refuse(rule: str, message: str, field: str | None = None, **details: Any) -> NotAuthenticated:
    return NotAuthenticated(message, rule=f"access.token.{rule}", field=field, **details)


def _show(value: object) -> str:
    """A value from a token, fit for a message: short, plain, or not shown at all."""
    if isinstance(value, list) and 0 < len(value) <= 5:
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, str) and _SHOWABLE.match(value):
        return repr(value)
    return "nothing" if value is None else "(a value not shown)"


# -- keys ------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(number: int) -> str:
    return _b64url(number.to_bytes((number.bit_length() + 7) // 8, "big"))


def _uint_b64url(text: str) -> int:
    if not isinstance(text, str) or not text or not _SEGMENT.match(text):
        raise ValueError("not base64url")
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def rsa_public_jwk(key: rsa.RSAPublicKey) -> dict[str, str]:
    """The required members of an RSA public JWK (RFC 7517 / 7518)."""
    numbers = key.public_numbers()
    return {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint of an RSA JWK: SHA-256 over the required members (e, kty, n) in
    lexicographic order, without whitespace, base64url-encoded."""
    canonical = json.dumps(
        {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def public_key_from_jwk(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey | None:
    """An RS256 signature key from one JWK, or None for a key this service must not use
    (another type or algorithm, an encryption key, too short, or unreadable). Private members,
    if an issuer publishes them by mistake, are ignored."""
    if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig":
        return None
    if jwk.get("alg", ALGORITHM) != ALGORITHM:
        return None
    operations = jwk.get("key_ops")
    if isinstance(operations, list) and "verify" not in operations:
        return None
    try:
        key = rsa.RSAPublicNumbers(_uint_b64url(jwk["e"]), _uint_b64url(jwk["n"])).public_key()
    except (KeyError, ValueError, TypeError):
        return None
    return key if key.key_size >= MIN_RSA_BITS else None


class StaticKeys:
    """Keys known in advance (the development issuer's own key, tests)."""

    def __init__(self, keys: Mapping[str, rsa.RSAPublicKey]) -> None:
        self._keys = dict(keys)

    def key(self, kid: str | None) -> rsa.RSAPublicKey:
        return _pick(self._keys, kid, "this service's key set")

    def cached(self, kid: str | None) -> rsa.RSAPublicKey | None:
        return _known(self._keys, kid)


def _known(keys: Mapping[str, rsa.RSAPublicKey], kid: str | None) -> rsa.RSAPublicKey | None:
    """What `_pick` would return, or None where it would refuse."""
    if kid is None:
        return next(iter(keys.values())) if len(keys) == 1 else None
    return keys.get(kid)


def _pick(keys: Mapping[str, rsa.RSAPublicKey], kid: str | None, where: str) -> rsa.RSAPublicKey:
    if kid is None:
        if len(keys) == 1:
            return next(iter(keys.values()))
        raise _refuse(
            "unknown_key",
            f"the token names no key id (kid) and {where} holds {len(keys)} keys",
            "kid",
        )
    if kid in keys:
        return keys[kid]
    raise _refuse(
        "unknown_key",
        f"the token's key id {_show(kid)} is not in {where} (a key rotated out, or a token from "
        "another issuer)",
        "kid",
    )


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_url_problem(url: str) -> str | None:
    """Why `url` may not carry an issuer's keys, or None: HTTPS, or plain HTTP to this host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return None
    return (
        f"{url[:200]!r} is not an https:// URL (plain http is allowed only to localhost): keys "
        "fetched over an unprotected channel could be replaced by anyone on the path"
    )


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        problem = insecure_url_problem(newurl)
        if problem is not None:
            raise urllib.error.URLError(f"redirected to an insecure URL: {problem}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_json(url: str, timeout: float, what: str, hint: str) -> Any:
    """GET a JSON document; any failure is an `IssuerUnavailable` naming `url` and `hint`."""

    def unavailable(reason: str) -> IssuerUnavailable:
        reason = " ".join(reason.split())[:200]
        return IssuerUnavailable(
            f"cannot fetch {what} from {url}: {reason}. {hint}", url=url, reason=reason
        )

    handlers: list[urllib.request.BaseHandler] = [_SafeRedirects()]
    if _is_loopback(urllib.parse.urlsplit(url).hostname):
        handlers.append(urllib.request.ProxyHandler({}))  # a local issuer is never behind one
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response and its socket
        raise unavailable(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise unavailable(str(exc.reason)) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, junk
        raise unavailable(f"{type(exc).__name__}: {exc}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise unavailable(f"the response is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise unavailable("the response is not JSON") from None


class JwksKeys:
    """An issuer's JWKS over HTTPS: fetched on first use and cached.

    A token whose key id is not cached triggers one refetch (the issuer rotated its keys), but
    at most one fetch per `min_refresh_seconds`, so a flood of forged key ids cannot turn this
    service into a load generator against the issuer. The cache is also refreshed after
    `max_age_seconds`, so keys the issuer withdrew stop being trusted; if that refresh fails the
    cached keys stay in use. Looking up a cached key takes no lock."""

    HINT = (
        "Check CONTINUUM_AUTH_JWKS_URL (or the jwks_uri that the issuer's discovery document "
        "names) and that the issuer is reachable from this host"
    )

    def __init__(
        self,
        url: str | Callable[[], str],
        *,
        timeout_seconds: float = 5.0,
        min_refresh_seconds: float = 30.0,
        max_age_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self.timeout_seconds = timeout_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._last_error: IssuerUnavailable | None = None
        self._lock = threading.Lock()
        #: How many times the key set was fetched (for tests and metrics).
        self.fetches = 0

    @property
    def url(self) -> str:
        return self._url if isinstance(self._url, str) else self._url()

    def key(self, kid: str | None) -> rsa.RSAPublicKey:
        loaded_at = self._loaded_at
        if loaded_at is None:
            self._refresh(None, must_succeed=True)
        elif self.clock() - loaded_at >= self.max_age_seconds and not self._paused():
            self._refresh(loaded_at, must_succeed=False)
        keys = self._keys
        if kid is None or kid in keys:
            return _pick(keys, kid, "the issuer's key set")
        self._refresh(self._loaded_at, must_succeed=True)  # rotation: one refetch, rate-limited
        return _pick(self._keys, kid, "the issuer's key set")

    def cached(self, kid: str | None) -> rsa.RSAPublicKey | None:
        """The cached key, unless `key` would fetch first (nothing loaded yet, a refresh due,
        or a key id not in the cache)."""
        loaded_at = self._loaded_at
        if loaded_at is None:
            return None
        if self.clock() - loaded_at >= self.max_age_seconds and not self._paused():
            return None
        return _known(self._keys, kid)

    def _paused(self) -> bool:
        """Was the issuer asked too recently to ask again? An issuer that never answered is
        retried sooner than one whose keys are cached."""
        attempted = self._attempted_at
        if attempted is None:
            return False
        pause = self.min_refresh_seconds if self._keys else min(self.min_refresh_seconds, 5.0)
        return self.clock() - attempted < pause

    def _refresh(self, seen_loaded_at: float | None, *, must_succeed: bool) -> None:
        with self._lock:
            if self._loaded_at != seen_loaded_at:
                return  # another thread refreshed while this one waited
            if self._paused():
                error = self._last_error
                if must_succeed and not self._keys and error is not None:
                    raise IssuerUnavailable(error.message, **error.details)
                return
            now = self.clock()
            self._attempted_at = now
            try:
                url = self.url
                document = _fetch_json(url, self.timeout_seconds, "the issuer's key set", self.HINT)
                keys = self._parse(url, document)
            except IssuerUnavailable as exc:
                self._last_error = exc
                if must_succeed:
                    raise
                return
            self.fetches += 1
            self._keys = keys
            self._loaded_at = now
            self._last_error = None

    def _parse(self, url: str, document: Any) -> dict[str, rsa.RSAPublicKey]:
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise IssuerUnavailable(
                f"{url} is not a JWK set (no 'keys' list). {self.HINT}", url=url
            )
        keys: dict[str, rsa.RSAPublicKey] = {}
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            key = public_key_from_jwk(entry)
            if key is None:
                continue
            kid = entry.get("kid")
            keys[kid if isinstance(kid, str) else jwk_thumbprint(entry)] = key
        if not keys:
            raise IssuerUnavailable(
                f"the key set at {url} holds no RS256 signature key of at least {MIN_RSA_BITS} "
                f"bits. {self.HINT}",
                url=url,
            )
        return keys


# -- verification ----------------------------------------------------------------------------


def _unverified_claims(token: str) -> dict[str, Any]:
    """The payload, read only to explain a refusal once its signature has verified."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _when(claims: Mapping[str, Any], name: str) -> str:
    value: Any = claims.get(name)
    try:
        at = dt.datetime.fromtimestamp(int(value), dt.UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unreadable time"
    return at.isoformat().replace("+00:00", "Z")


class JwtVerifier:
    """RS256 JWTs from one issuer for one audience, turned into a `Principal`. Both the OIDC
    verifier and the development issuer's verifier are this class; only the key set differs."""

    def __init__(
        self,
        keys: KeySet,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: int = 30,
        role_claim: str = "role",
    ) -> None:
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds must not be negative")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds
        self.role_claim = role_claim
        #: Tokens that verified: a client sends the same token with every request, and
        #: decoding and checking it is a large part of a command's CPU. An entry holds the
        #: principal, when to verify again (at most `CACHE_SECONDS` on, never past `exp`), and
        #: the key id and key that signed it: each hit asks the key set again (a dict lookup
        #: while its cache is fresh), so a withdrawn key stops its tokens as soon as the key
        #: set drops it, as without this cache.
        self._verified: dict[str, tuple[Principal, float, str | None, rsa.RSAPublicKey]] = {}

    CACHE_SECONDS = 30.0
    CACHE_ENTRIES = 4096

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; `NotAuthenticated` naming the reason otherwise."""
        now = time.time()
        hit = self._verified.get(token) if isinstance(token, str) else None
        if hit is not None and now < hit[1] and self.keys.key(hit[2]) is hit[3]:
            return hit[0]
        principal, expires, kid, key = self._verify(token)
        if len(self._verified) >= self.CACHE_ENTRIES:
            self._verified.clear()
        self._verified[token] = (principal, min(expires, now + self.CACHE_SECONDS), kid, key)
        return principal

    def cached(self, token: str) -> Principal | None:
        """`verify`'s answer from its cache, if that needs no call to the issuer."""
        hit = self._verified.get(token) if isinstance(token, str) else None
        if hit is None or time.time() >= hit[1]:
            return None
        return hit[0] if self.keys.cached(hit[2]) is hit[3] else None

    def _verify(self, token: str) -> tuple[Principal, float, str | None, rsa.RSAPublicKey]:
        if not isinstance(token, str) or not token.strip():
            raise _refuse(
                "missing", "no bearer token was given (Authorization: Bearer <JWT>)", "token"
            )
        if len(token) > MAX_TOKEN_CHARS:
            raise _refuse("malformed", f"the bearer token is longer than {MAX_TOKEN_CHARS} chars")
        parts = token.split(".")
        if len(parts) != 3 or not all(_SEGMENT.match(part) for part in parts) or "" in parts[:2]:
            raise _refuse(
                "malformed",
                "the bearer token is not a JWT (three base64url parts: header.payload.signature)",
            )
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, RecursionError):  # RecursionError: absurdly nested JSON
            raise _refuse("malformed", "the bearer token's header cannot be read") from None
        algorithm = header.get("alg")
        if algorithm != ALGORITHM:
            said = "no signature (alg none)" if algorithm == "none" else _show(algorithm)
            raise _refuse(
                "algorithm",
                f"tokens must be signed with {ALGORITHM}; this one says {said}",
                "alg",
            )
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        key = self.keys.key(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["exp", "iat", "sub"]},
            )
        except jwt.InvalidSignatureError:
            raise _refuse(
                "signature",
                "the token's signature does not verify: it was altered, or signed by a key that "
                "is not the issuer's",
            ) from None
        except jwt.ExpiredSignatureError:
            expired = _when(_unverified_claims(token), "exp")
            raise _refuse(
                "expired",
                f"the token expired at {expired} (allowing {self.leeway_seconds} s of clock "
                "skew); get a new one",
                "exp",
            ) from None
        except jwt.ImmatureSignatureError:
            seen = _unverified_claims(token)
            name = (
                "nbf" if _later_than(seen.get("nbf"), time.time() + self.leeway_seconds) else "iat"
            )
            raise _refuse(
                "not_yet_valid",
                f"the token is not valid before {_when(seen, name)} ({name}, allowing "
                f"{self.leeway_seconds} s of clock skew): check the clocks of this host and "
                "of the issuer",
                name,
            ) from None
        except jwt.InvalidAudienceError:
            found = _unverified_claims(token).get("aud")
            raise _refuse(
                "audience",
                f"the token is meant for {_show(found)}, not for this service "
                f"({self.audience!r}; CONTINUUM_AUTH_AUDIENCE)",
                "aud",
            ) from None
        except jwt.InvalidIssuerError:
            found = _unverified_claims(token).get("iss")
            raise _refuse(
                "issuer",
                f"the token was issued by {_show(found)}, not by {self.issuer!r}",
                "iss",
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _refuse(
                "claims", f"the token lacks the required {exc.claim!r} claim", exc.claim
            ) from None
        except (InvalidIssuedAtError, InvalidSubjectError, InvalidJTIError) as exc:
            raise _refuse("claims", f"a claim of the token is invalid: {exc}") from None
        except jwt.DecodeError as exc:
            if "claim" in str(exc):  # exp or nbf not a number
                raise _refuse("claims", f"a claim of the token is invalid: {exc}") from None
            raise _refuse(
                "malformed", f"the bearer token cannot be decoded ({type(exc).__name__})"
            ) from None
        except (jwt.PyJWTError, RecursionError) as exc:
            raise _refuse(
                "malformed", f"the bearer token is invalid ({type(exc).__name__})"
            ) from None
        principal = principal_from_claims(claims, role_claim=self.role_claim)
        return principal, float(claims["exp"]), kid, key


def _later_than(value: Any, limit: float) -> bool:
    try:
        return int(value) > limit
    except (TypeError, ValueError, OverflowError):
        return False


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (Keycloak's
    `realm_access.roles`) when no claim has the whole name."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _token_id(jti: Any) -> str | None:
    if not isinstance(jti, str) or not jti:
        return None
    if len(jti) <= 64 and jti.isprintable():
        return jti
    return "sha256:" + hashlib.sha256(jti.encode("utf-8", "replace")).hexdigest()[:57]


def principal_from_claims(claims: Mapping[str, Any], *, role_claim: str = "role") -> Principal:
    """Verified claims -> `Principal`: `sub`, one role of `Role` in `role_claim` (a string, or a
    list holding exactly one of ours), `sites` (required for site-scoped roles), `org`, `jti`."""
    subject = claims.get("sub")
    if (
        not isinstance(subject, str)
        or not subject.strip()
        or len(subject) > 128
        or not subject.isprintable()
    ):
        raise _refuse("claims", "the token's sub claim must be 1-128 printable characters", "sub")
    raw_role = _claim(claims, role_claim)
    if isinstance(raw_role, list):  # issuers that put roles in an array: exactly one of ours
        ours = sorted({r for r in raw_role if isinstance(r, str) and r in _ROLES})
        if len(ours) > 1:
            raise _refuse(
                "role",
                f"the token's {role_claim!r} claim names several roles of this service "
                f"({', '.join(ours)}); a token must carry exactly one",
                role_claim,
            )
        raw_role = ours[0] if ours else None
    if not isinstance(raw_role, str) or raw_role not in _ROLES:
        found = "is missing" if raw_role is None else f"is {_show(raw_role)}"
        raise _refuse(
            "role",
            f"the token's {role_claim!r} claim {found}; it must be one of {', '.join(_ROLES)}",
            role_claim,
        )
    role = Role(raw_role)
    sites = claims.get("sites", [])
    if sites is None:
        sites = []
    if not isinstance(sites, list) or not all(isinstance(s, str) and _CODE.match(s) for s in sites):
        raise _refuse(
            "claims",
            "the token's sites claim must be a list of site codes (letters, digits, . _ : -)",
            "sites",
        )
    if role in SITE_SCOPED and not sites:
        raise _refuse(
            "claims",
            f"a {role.value} token must name its sites (a non-empty sites claim)",
            "sites",
        )
    organization = claims.get("org")
    if organization is not None and not (
        isinstance(organization, str) and _CODE.match(organization)
    ):
        raise _refuse("claims", "the token's org claim must be an organization code", "org")
    return Principal(
        subject=subject,
        role=role,
        sites=frozenset(sites),
        organization=organization,
        token_id=_token_id(claims.get("jti")),
    )


class OidcVerifier(JwtVerifier):
    """A production OIDC issuer: RS256 tokens checked against its JWKS, which is discovered
    from `{issuer}/.well-known/openid-configuration` unless `jwks_url` is given."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        jwks_url: str | None = None,
        leeway_seconds: int = 30,
        role_claim: str = "role",
        timeout_seconds: float = 5.0,
        min_refresh_seconds: float = 30.0,
        max_key_age_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, url in (("issuer", issuer), ("jwks_url", jwks_url)):
            problem = None if url is None else insecure_url_problem(url)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")
        self.jwks_url = jwks_url
        self.timeout_seconds = timeout_seconds
        self._discovery_lock = threading.Lock()
        self.jwks = JwksKeys(
            self._jwks_url,
            timeout_seconds=timeout_seconds,
            min_refresh_seconds=min_refresh_seconds,
            max_age_seconds=max_key_age_seconds,
            clock=clock,
        )
        super().__init__(
            self.jwks,
            issuer=issuer,
            audience=audience,
            leeway_seconds=leeway_seconds,
            role_claim=role_claim,
        )

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def _jwks_url(self) -> str:
        with self._discovery_lock:
            if self.jwks_url is None:
                self.jwks_url = self._discover()
            return self.jwks_url

    def _discover(self) -> str:
        where = self.discovery_url
        hint = (
            "Check CONTINUUM_AUTH_ISSUER (the issuer URL exactly as in the tokens' iss, without "
            "/.well-known/...), that the issuer is reachable from this host, or set "
            "CONTINUUM_AUTH_JWKS_URL"
        )
        document = _fetch_json(where, self.timeout_seconds, "the OpenID discovery document", hint)
        if not isinstance(document, dict):
            raise IssuerUnavailable(f"{where} is not a discovery document. {hint}", url=where)
        named = document.get("issuer")
        if named is not None and named != self.issuer:
            # OpenID Connect Discovery 1.0 section 4.3: they MUST be identical.
            raise IssuerUnavailable(
                f"{where} describes issuer {_show(named)}, not {self.issuer!r}: set "
                "CONTINUUM_AUTH_ISSUER to exactly the issuer's iss value",
                url=where,
            )
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not uri:
            raise IssuerUnavailable(f"{where} names no jwks_uri. {hint}", url=where)
        problem = insecure_url_problem(uri)
        if problem is not None:
            raise IssuerUnavailable(f"{where} names jwks_uri {problem}", url=where)
        return uri


# -- the development issuer ------------------------------------------------------------------


def default_key_file() -> Path:
    """Where the development issuer keeps its private key unless told otherwise."""
    return Path(user_data_dir("care-continuum")) / "dev-issuer.pem"


class DevIssuer:
    """The embedded default's local issuer. Its private key lives in a file only this user can
    read; anyone who can read it can mint any role, so it is for development and tests only."""

    issuer = DEV_ISSUER

    def __init__(self, private_key: rsa.RSAPrivateKey, *, audience: str) -> None:
        self.private_key = private_key
        self.audience = audience
        self._jwk = rsa_public_jwk(private_key.public_key())
        #: RFC 7638 thumbprint of the public key: stable for the key, new for a new key.
        self.kid = jwk_thumbprint(self._jwk)

    @classmethod
    def generate(cls, *, audience: str) -> DevIssuer:
        """A throwaway issuer whose key lives only in memory."""
        return cls(
            rsa.generate_private_key(public_exponent=65537, key_size=2048), audience=audience
        )

    @classmethod
    def load_or_create(cls, path: Path | None = None, *, audience: str) -> DevIssuer:
        """The issuer whose key is in `path` (default: `default_key_file()`), creating the key
        (RSA 2048, PKCS#8 PEM, mode 0600) on first use."""
        path = path or default_key_file()
        if not path.exists():
            _create_key_file(path)
        problem = _key_file_problem(path)
        if problem is not None:
            raise ContinuumError(problem, rule="auth.dev_key", path=str(path))
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise ContinuumError(
                f"cannot read the development issuer's key {path}: {type(exc).__name__}. Delete "
                "the file to have a new key made (tokens signed by the old key stop working)",
                rule="auth.dev_key",
                path=str(path),
            ) from None
        if not isinstance(loaded, rsa.RSAPrivateKey) or loaded.key_size < MIN_RSA_BITS:
            raise ContinuumError(
                f"{path} does not hold an RSA private key of at least {MIN_RSA_BITS} bits",
                rule="auth.dev_key",
                path=str(path),
            )
        return cls(loaded, audience=audience)

    def issue(
        self,
        subject: str,
        role: Role | str,
        *,
        sites: Iterable[str] = (),
        organization: str | None = None,
        ttl_seconds: int = 3600,
        now: dt.datetime | None = None,
    ) -> str:
        """A signed RS256 token. The claims pass the same checks the verifier makes (role one of
        `Role`, sites for site-scoped roles) or `InvalidInput` is raised and nothing is signed.
        A negative `ttl_seconds` or a future `now` make expired or not-yet-valid tokens."""
        issued = int((now or dt.datetime.now(dt.UTC)).timestamp())
        claims: dict[str, Any] = {
            "iss": DEV_ISSUER,
            "aud": self.audience,
            "sub": subject,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_seconds,
            "jti": uuid.uuid4().hex,
            "role": role.value if isinstance(role, Role) else role,
            "sites": list(sites),
        }
        if organization is not None:
            claims["org"] = organization
        try:
            principal_from_claims(claims)
        except NotAuthenticated as exc:
            raise InvalidInput(exc.message, field=exc.field) from None
        return jwt.encode(claims, self.private_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        """The public key set, as an issuer serves it at its jwks_uri."""
        return {"keys": [{**self._jwk, "kid": self.kid, "use": "sig", "alg": ALGORITHM}]}

    def verifier(self, *, leeway_seconds: int = 30) -> JwtVerifier:
        """A verifier for this issuer's tokens: the same code path as `OidcVerifier`, with this
        issuer's public key as a static key set instead of a fetched JWKS."""
        return JwtVerifier(
            StaticKeys({self.kid: self.private_key.public_key()}),
            issuer=DEV_ISSUER,
            audience=self.audience,
            leeway_seconds=leeway_seconds,
        )


def _create_key_file(path: Path) -> None:
    """Write a new key to `path` atomically and never over an existing file: a concurrent
    process that made the file first wins, and nobody reads a half-written key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError:  # a file system without hard links
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(pem)
    finally:
        temporary.unlink(missing_ok=True)


def _key_file_problem(path: Path) -> str | None:
    if os.name != "posix":
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return (
            f"the development issuer's key {path} is readable by other users (mode "
            f"{mode:04o}): anyone who reads it can mint tokens for any role. Run "
            f"`chmod 600 {path}`"
        )
    return None


def verifier_from_settings(settings: Settings) -> TokenVerifier:
    """The verifier the settings ask for: `CONTINUUM_AUTH_MODE=oidc` verifies the configured
    issuer's tokens; `dev` (the default) the local development issuer's."""
    if settings.auth_mode == "oidc":
        if not settings.auth_issuer:
            raise ValueError("CONTINUUM_AUTH_MODE=oidc needs CONTINUUM_AUTH_ISSUER")
        return OidcVerifier(
            settings.auth_issuer,
            settings.auth_audience,
            jwks_url=settings.auth_jwks_url,
            leeway_seconds=settings.auth_leeway_seconds,
            role_claim=settings.auth_role_claim,
        )
    issuer = DevIssuer.load_or_create(settings.dev_issuer_key_file, audience=settings.auth_audience)
    return issuer.verifier(leeway_seconds=settings.auth_leeway_seconds)
