"""OpenID Connect ID tokens (``auth.google`` registration): verify one, name its user.

``OidcVerifier`` checks an ID token the way Google documents for its own and
the OpenID Connect core specification requires of any provider: an
asymmetric signature by a key from the provider's published key set (JWKS),
the issuer, the audience (and the authorized party when there are several
audiences), the expiry and issue times, and a verified email address.

The key set is fetched over HTTPS on first use and cached for as long as the
provider's ``Cache-Control`` allows. A token naming an unknown key triggers a
refetch (keys rotate), but never more often than ``min_refresh_interval``, so
tokens with made-up key ids cannot turn into a flood of requests to the
provider. Every refusal is a ``Forbidden`` whose message is a fixed text that
carries no token data, so callers can key rate-limited logs by it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt

from .protocol import is_valid_user_id
from .protocol.errors import Forbidden, Overloaded

__all__ = ["OidcIdentity", "OidcVerifier", "user_id_for"]

log = logging.getLogger(__name__)

RSA_ALGORITHMS = frozenset(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"))
# A JWS EC algorithm names its curve, so an EC key allows exactly one.
EC_ALGORITHM_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
ALLOWED_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_ALGORITHM_BY_CURVE.values())

MAX_JWKS_BYTES = 1 << 20
MIN_CACHE_SECONDS = 60.0
MAX_CACHE_SECONDS = 86400.0
DEFAULT_CACHE_SECONDS = 3600.0
# NIST and RFC 7518 section 3.3: smaller RSA keys are forgeable in practice.
MIN_RSA_BITS = 2048
MAX_SUBJECT_CHARS = 255
_READ_CHUNK = 64 * 1024
_MAX_AGE = re.compile(r"^\s*max-age\s*=\s*\"?(\d+)\"?\s*$", re.IGNORECASE)
_HASHED_SUBJECT_HEX_CHARS = 40

# The refusal texts; fixed so that logs keyed by them stay bounded.
MALFORMED = "ID token malformed"
ALGORITHM_NOT_ALLOWED = "ID token algorithm not allowed"
UNKNOWN_KEY = "ID token signed with an unknown key"
SIGNATURE_INVALID = "ID token signature invalid"
WRONG_ISSUER = "ID token has the wrong issuer"
WRONG_AUDIENCE = "ID token has the wrong audience"
WRONG_AUTHORIZED_PARTY = "ID token has the wrong authorized party"
EXPIRED = "ID token expired"
ISSUED_IN_FUTURE = "ID token issued in the future"
NOT_YET_VALID = "ID token not yet valid"
NO_SUBJECT = "ID token has no valid subject"
EMAIL_NOT_VERIFIED = "ID token email not verified"
KEYS_UNAVAILABLE = "identity provider key set unavailable, retry later"


@dataclass(frozen=True)
class OidcIdentity:
    issuer: str
    subject: str
    email: str | None


@dataclass(frozen=True)
class _VerificationKey:
    public_key: Any  # a cryptography RSA or EC public key
    algorithms: frozenset[str]


@dataclass(frozen=True)
class _KeySet:
    keys: Mapping[str, _VerificationKey]
    expires_at: float


class _KeySetError(ValueError):
    """The provider answered, but not with a usable key set."""


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to HTTPS: the keys' authenticity rests on TLS."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme != "https":
            raise _KeySetError(f"refusing redirect to non-HTTPS URL {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class OidcVerifier:
    def __init__(
        self,
        *,
        issuers: Sequence[str],
        audiences: Sequence[str],
        jwks_url: str,
        ssl_context: ssl.SSLContext | None = None,
        clock_skew: float = 60.0,
        min_refresh_interval: float = 10.0,
        fetch_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        if isinstance(issuers, str) or isinstance(audiences, str):
            # A bare string would be taken as a set of one-character names.
            raise TypeError("issuers and audiences must be sequences of strings")
        if not issuers or not audiences:
            raise ValueError("issuers and audiences must not be empty")
        if urlsplit(jwks_url).scheme != "https":
            raise ValueError(f"jwks_url must be an https URL, not {jwks_url!r}")
        self._issuers = frozenset(issuers)
        self._audiences = frozenset(audiences)
        self._jwks_url = jwks_url
        self._ssl_context = ssl_context
        self._clock_skew = clock_skew
        self._min_refresh_interval = min_refresh_interval
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._key_set: _KeySet | None = None
        self._last_fetch_at: float | None = None
        self._fetch_lock = threading.Lock()
        self._opener: urllib.request.OpenerDirector | None = None

    def verify(self, token: str) -> OidcIdentity:
        """The identity an ID token asserts; raises Forbidden (or Overloaded) if none."""
        if not isinstance(token, str):
            raise Forbidden(MALFORMED)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Forbidden(MALFORMED) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise Forbidden(ALGORITHM_NOT_ALLOWED)
        kid = header.get("kid")
        if not kid:
            raise Forbidden(UNKNOWN_KEY)
        key = self._key_for(kid)
        if alg not in key.algorithms:
            raise Forbidden(ALGORITHM_NOT_ALLOWED)
        try:
            # PyJWT checks only the signature here: its claim checks use its
            # own clock, and the OIDC rules below need ours.
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=[alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise Forbidden(SIGNATURE_INVALID) from None
        except jwt.InvalidAlgorithmError:
            raise Forbidden(ALGORITHM_NOT_ALLOWED) from None
        except jwt.PyJWTError:
            raise Forbidden(MALFORMED) from None
        return self._check_claims(claims)

    def _check_claims(self, claims: dict[str, Any]) -> OidcIdentity:
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self._issuers:
            raise Forbidden(WRONG_ISSUER)
        self._check_audience(claims.get("aud"), claims.get("azp"))
        now = self._clock()
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf", 0)
        if not (_is_number(exp) and _is_number(iat) and _is_number(nbf)):
            raise Forbidden(MALFORMED)
        if exp + self._clock_skew < now:
            raise Forbidden(EXPIRED)
        if iat - self._clock_skew > now:
            raise Forbidden(ISSUED_IN_FUTURE)
        if nbf - self._clock_skew > now:
            raise Forbidden(NOT_YET_VALID)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS:
            raise Forbidden(NO_SUBJECT)
        email = claims.get("email")
        if email is not None and not isinstance(email, str):
            raise Forbidden(MALFORMED)
        # Some providers send the string "true"; anything else, or nothing,
        # leaves the address unproven (``is``: the number 1 equals True).
        verified = claims.get("email_verified")
        if verified is not True and verified != "true":
            raise Forbidden(EMAIL_NOT_VERIFIED)
        return OidcIdentity(issuer=issuer, subject=subject, email=email)

    def _check_audience(self, aud: Any, azp: Any) -> None:
        if isinstance(aud, str):
            aud = [aud]
        if not (isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud)):
            raise Forbidden(WRONG_AUDIENCE)
        if self._audiences.isdisjoint(aud):
            raise Forbidden(WRONG_AUDIENCE)
        # With several audiences, the party the token was issued to must be
        # us, or another audience could replay it here (OIDC core 3.1.3.7).
        if len(aud) > 1 and (not isinstance(azp, str) or azp not in self._audiences):
            raise Forbidden(WRONG_AUTHORIZED_PARTY)

    def _key_for(self, kid: str) -> _VerificationKey:
        key_set = self._key_set
        if key_set is not None and kid in key_set.keys and self._clock() < key_set.expires_at:
            return key_set.keys[kid]
        with self._fetch_lock:
            # Re-read under the lock: whoever held it may have just fetched.
            key_set = self._key_set
            now = self._clock()
            stale = key_set is None or now >= key_set.expires_at or kid not in key_set.keys
            # A clock stepped back must not hold fetches off until it catches up.
            recently = (
                self._last_fetch_at is not None
                and 0 <= now - self._last_fetch_at < self._min_refresh_interval
            )
            if stale and not recently:
                self._last_fetch_at = now
                self._refresh()
                key_set = self._key_set
        if key_set is None:
            # Worth retrying once another fetch may be tried (PROTOCOL.md 7: -32003 says when).
            raise Overloaded(KEYS_UNAVAILABLE, retry_after_ms=max(1000, round(self._min_refresh_interval * 1000)))
        key = key_set.keys.get(kid)
        if key is None:
            raise Forbidden(UNKNOWN_KEY)
        return key

    def _refresh(self) -> None:
        try:
            body, lifetime = self._fetch()
            keys = _parse_key_set(body)
        except (OSError, ValueError, RecursionError, http.client.HTTPException) as error:
            if self._key_set is None:
                log.warning("cannot fetch identity provider keys from %s: %s", self._jwks_url, error)
            else:
                log.warning(
                    "cannot refresh identity provider keys from %s, keeping the cached ones: %s",
                    self._jwks_url,
                    error,
                )
            return
        self._key_set = _KeySet(keys, self._clock() + lifetime)

    def _fetch(self) -> tuple[bytes, float]:
        """The key set document and how long it may be cached, in seconds."""
        if self._opener is None:
            context = self._ssl_context or ssl.create_default_context()
            self._opener = urllib.request.build_opener(
                urllib.request.HTTPSHandler(context=context), _HttpsOnlyRedirects()
            )
        request = urllib.request.Request(self._jwks_url, headers={"Accept": "application/json"})
        # The socket timeout bounds each read; the deadline bounds a provider
        # that trickles the body a byte at a time.
        deadline = time.monotonic() + self._fetch_timeout
        with self._opener.open(request, timeout=self._fetch_timeout) as response:
            if response.status != 200:
                raise _KeySetError(f"HTTP status {response.status}")
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_JWKS_BYTES:
                chunk = response.read(_READ_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise _KeySetError(f"no complete answer within {self._fetch_timeout} s")
            if size > MAX_JWKS_BYTES:
                raise _KeySetError(f"key set larger than {MAX_JWKS_BYTES} bytes")
            lifetime = _cache_lifetime(
                response.headers.get("Cache-Control"), response.headers.get("Age")
            )
        return b"".join(chunks), lifetime


def _is_number(value: Any) -> bool:
    # bool is an int subclass, and true is no timestamp; json.loads accepts
    # NaN and Infinity, which no comparison would ever find expired.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cache_lifetime(cache_control: str | None, age: str | None) -> float:
    """Seconds the key set stays fresh: max-age less the Age a cache added, clamped."""
    max_age = None
    for directive in (cache_control or "").split(","):
        match = _MAX_AGE.match(directive)
        if match:
            max_age = int(match.group(1))
            break
        if directive.strip().lower() in ("no-cache", "no-store"):
            max_age = 0
    if max_age is None:
        return DEFAULT_CACHE_SECONDS
    if age is not None and age.strip().isdigit():
        max_age -= int(age)
    return min(max(float(max_age), MIN_CACHE_SECONDS), MAX_CACHE_SECONDS)


def _parse_key_set(body: bytes) -> dict[str, _VerificationKey]:
    document = json.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _KeySetError('the key set is not a JSON object with a "keys" list')
    keys: dict[str, _VerificationKey] = {}
    for jwk in document["keys"]:
        parsed = _verification_key(jwk)
        # A kid names one key; should a provider repeat one, the first wins.
        if parsed is not None and jwk["kid"] not in keys:
            keys[jwk["kid"]] = parsed
    if not keys:
        raise _KeySetError("the key set has no usable signing key")
    return keys


def _verification_key(jwk: Any) -> _VerificationKey | None:
    """The key and the algorithms it may verify, or None for a key we never use."""
    if not isinstance(jwk, dict):
        return None
    kid, kty, alg, crv = jwk.get("kid"), jwk.get("kty"), jwk.get("alg"), jwk.get("crv")
    if not isinstance(kid, str) or not kid or jwk.get("use", "sig") != "sig":
        return None
    # A published private part means a broken provider; its keys are not trusted.
    if "d" in jwk:
        return None
    if kty == "RSA":
        algorithms = RSA_ALGORITHMS
    elif kty == "EC" and isinstance(crv, str) and crv in EC_ALGORITHM_BY_CURVE:
        algorithms = frozenset((EC_ALGORITHM_BY_CURVE[crv],))
    else:
        # oct keys would be HMAC secrets (algorithm confusion); OKP and
        # others are outside the algorithms OIDC providers sign ID tokens with.
        return None
    if alg is not None:
        if not isinstance(alg, str) or alg not in algorithms:
            return None
        algorithms = frozenset((alg,))
    try:
        public_key = jwt.PyJWK(jwk, algorithm=min(algorithms)).key
    except (jwt.PyJWTError, TypeError, ValueError, KeyError):
        # The provider's document is input too: a key we cannot read is skipped.
        return None
    if kty == "RSA" and public_key.key_size < MIN_RSA_BITS:
        return None
    return _VerificationKey(public_key, algorithms)


def user_id_for(prefix: str, subject: str) -> str:
    """Stable user id from provider prefix and subject: f"{prefix}-{subject}" when that is a valid
    user id (devastator.protocol.is_valid_user_id: 1-64 chars of [A-Za-z0-9._@-]), else
    f"{prefix}-" + first 40 hex chars of sha256(subject)."""
    plain = f"{prefix}-{subject}"
    if is_valid_user_id(plain):
        return plain
    # surrogatepass: JSON may carry lone surrogates, and every subject needs an id.
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()
    hashed = f"{prefix}-{digest[:_HASHED_SUBJECT_HEX_CHARS]}"
    if not is_valid_user_id(hashed):
        raise ValueError(f"provider prefix {prefix!r} cannot form a valid user id")
    return hashed
