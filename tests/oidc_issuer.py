"""A local OpenID Connect issuer for tests: real HTTPS, real keys, any token.

``OidcIssuer`` serves a discovery document and a JWKS over TLS from
127.0.0.1, under its own throwaway CA, and mints ID tokens signed with its
RSA keys. ``mint`` can also produce every kind of bad token (foreign key,
lying header, ``alg: none``, HMAC keyed with a public key), so verifier tests
need no hand-built JWTs. The ``oidc_issuer`` fixture starts one per test.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms

from local_ca import LocalCa

AUDIENCE = "test-client-id.apps.googleusercontent.com"
TOKEN_LIFETIME = 3600
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_CURRENT = object()  # mint's default kid: the issuer's current key


class OidcIssuer:
    """An HTTPS OpenID provider on an ephemeral port; see the module docstring.

    Tests steer it through plain attributes: ``max_age`` (the JWKS
    Cache-Control max-age, None to send no Cache-Control), ``jwks_status``
    (answer /jwks with this HTTP status instead of the keys), ``extra_jwks``
    (more JWK dicts to publish after the issuer's own keys) and ``jwks_body``
    (raw bytes to serve as /jwks instead of the key set).
    """

    audience = AUDIENCE

    def __init__(self, tmp_dir: Path):
        self._dir = Path(tmp_dir)
        self.max_age: int | None = 3600
        self.jwks_status = 200
        self.extra_jwks: list[Any] = []
        self.jwks_body: bytes | None = None
        self.fetches = 0
        self._keys: dict[str, rsa.RSAPrivateKey] = {}
        self._current_kid = ""
        self._rotations = 0
        self._server: WSGIServer | None = None

    def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self.rotate()
        ca = LocalCa("Test OIDC issuer CA")
        ca.write(self.ca_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*ca.write_server(self._dir, "127.0.0.1", stem="oidc-server"))
        self._server = WSGIServer(
            ("127.0.0.1", 0), self._app, ssl_context=context, spawn=Pool(64), log=None
        )
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)

    @property
    def issuer(self) -> str:
        assert self._server is not None, "start() the issuer first"
        return f"https://127.0.0.1:{self._server.server_port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def ca_file(self) -> Path:
        return self._dir / "oidc-ca.pem"

    @property
    def current_kid(self) -> str:
        return self._current_kid

    @property
    def current_key(self) -> rsa.RSAPrivateKey:
        return self._keys[self._current_kid]

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this issuer's CA (and nothing else)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def rotate(self, *, keep_old: bool = True) -> str:
        """Make a new RSA-2048 key current and publish it; returns its kid."""
        if not keep_old:
            self._keys.clear()
        self._rotations += 1
        kid = f"key-{self._rotations}"
        self._keys[kid] = _signing_key(self._rotations)
        self._current_kid = kid
        return kid

    def discovery_document(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        keys = [self.public_jwk(key, kid) for kid, key in self._keys.items()]
        return {"keys": keys + self.extra_jwks}

    @staticmethod
    def public_jwk(private_key: Any, kid: str, **members: Any) -> dict[str, Any]:
        """The public JWK of an RSA or EC private key; ``members`` replace fields (None removes)."""
        public_key = private_key.public_key()
        if isinstance(private_key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
            alg = "RS256"
        else:
            jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
            alg = _EC_ALGORITHMS[private_key.curve.name]
        jwk.update(kid=kid, use="sig", alg=alg)
        return _apply(jwk, members)

    def mint(
        self,
        sub: str = "1234567890",
        *,
        kid: Any = _CURRENT,
        key: Any = None,
        alg: str | None = None,
        header: dict[str, Any] | None = None,
        now: float | None = None,
        **claims: Any,
    ) -> str:
        """A signed ID token with valid claims, changed as asked.

        ``claims`` replace claims (None removes one). ``kid`` (None: no kid)
        goes in the header; ``key`` signs instead of the current key (an RSA
        or EC private key, or bytes for HS*); ``alg`` is the signing
        algorithm ("none" and HS* included); ``header`` then overrides header
        fields, so the header may name an algorithm the signature does not use.
        """
        issued = int(time.time() if now is None else now)
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "azp": self.audience,
            "sub": sub,
            "email": "user@example.com",
            "email_verified": True,
            "iat": issued,
            "exp": issued + TOKEN_LIFETIME,
        }
        if key is None:
            key = self._keys[self._current_kid]
        if alg is None:
            alg = _default_algorithm(key)
        jose = _apply({"alg": alg, "typ": "JWT"}, {"kid": self._current_kid if kid is _CURRENT else kid})
        return sign(_apply(jose, header or {}), _apply(payload, claims), alg, key)

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        headers = [("Content-Type", "application/json")]
        if path == "/.well-known/openid-configuration":
            start_response("200 OK", headers)
            return [json.dumps(self.discovery_document()).encode()]
        if path != "/jwks":
            start_response("404 Not Found", headers)
            return [b"{}"]
        self.fetches += 1
        if self.jwks_status != 200:
            start_response(f"{self.jwks_status} Test Failure", headers)
            return [b"{}"]
        if self.max_age is not None:
            headers.append(("Cache-Control", f"public, max-age={self.max_age}, must-revalidate"))
        start_response("200 OK", headers)
        return [self.jwks_body if self.jwks_body is not None else json.dumps(self.jwks()).encode()]


# Generating RSA-2048 keys would be most of an issuer's start-up time, so all
# issuers of a test session share the same few: the n-th key of each is the same.
@functools.lru_cache(maxsize=8)
def _signing_key(number: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def sign(header: dict[str, Any], claims: dict[str, Any] | bytes, alg: str, key: Any) -> str:
    """A compact JWS, signed by hand so that tests can make tokens PyJWT refuses to.

    ``claims`` may be raw bytes, for payloads that are not a JSON object.
    """
    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(payload)}".encode()
    if alg == "none":
        signature = b""
    elif alg in _HMAC_HASHES:
        signature = hmac.new(key, signing_input, _HMAC_HASHES[alg]).digest()
    else:
        algorithm = get_default_algorithms()[alg]
        signature = algorithm.sign(signing_input, algorithm.prepare_key(key))
    return f"{signing_input.decode()}.{_b64(signature)}"


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _default_algorithm(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _EC_ALGORITHMS[key.curve.name]
    return "HS256"


def _apply(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for name, value in changes.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def oidc_issuer(tmp_path: Path):
    issuer = OidcIssuer(tmp_path / "oidc-issuer")
    issuer.start()
    yield issuer
    issuer.stop()
