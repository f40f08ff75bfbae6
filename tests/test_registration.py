"""Registration through OpenID Connect sign-in (``auth.google``), end to end.

A local OpenID Connect issuer (its own RSA keys, its key set served over
local HTTPS) stands in for Google; the server fetches and checks its keys
exactly as it would Google's. The last test signs in against Google itself
when a real ID token is given in the environment.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from devastator.client import Client
from devastator.oidc import user_id_for
from devastator.pki import new_client_key_and_csr
from devastator.protocol.errors import FORBIDDEN, INVALID_PARAMS, RpcError
from oidc_issuer import oidc_issuer  # noqa: F401  (the fixture)
from wire import RawTls, assert_error

ROOT = Path(__file__).resolve().parent.parent
WAIT = 5.0


@pytest.fixture
def signed_in(servers, oidc_issuer):  # noqa: F811
    """A server that trusts the local issuer, as it would trust Google by default."""
    return servers(
        oidc_issuers=(oidc_issuer.issuer,),
        oidc_audiences=(oidc_issuer.audience,),
        oidc_jwks_url=oidc_issuer.jwks_url,
        oidc_ca_file=oidc_issuer.ca_file,
        oidc_refresh_interval=0,
    )


def sign_in(running, id_token: str, **kwargs) -> tuple[Client, dict]:
    client = running.tls_client()
    return client, client.auth_google(id_token, **kwargs)


def refused(running, id_token: str) -> RpcError:
    with pytest.raises(RpcError) as error:
        sign_in(running, id_token)
    assert error.value.code == FORBIDDEN, error.value
    return error.value


def test_a_valid_id_token_registers_the_user_and_device(signed_in, oidc_issuer):  # noqa: F811
    client, result = sign_in(signed_in, oidc_issuer.mint(sub="110169484474386276334"), device="pixel")

    assert set(result) == {"user", "device", "token"}
    assert result["user"] == "google-110169484474386276334" == user_id_for("google", "110169484474386276334")
    assert result["device"] == "pixel"
    # The connection is authenticated: it is sent what others send.
    sender = signed_in.connect("alice")
    sent = sender.send(result["user"], "welcome")
    assert client.receive(timeout=WAIT)["id"] == sent["id"]
    # The JWT it got authenticates the device on the WebSocket endpoint too.
    browser = signed_in.ws_client()
    assert browser.auth_jwt(result["token"]) == {"user": result["user"], "device": "pixel", "pending": 0}


def test_a_returning_user_keeps_the_same_id(signed_in, oidc_issuer):  # noqa: F811
    _, first = sign_in(signed_in, oidc_issuer.mint(sub="42"), device="phone")
    _, again = sign_in(signed_in, oidc_issuer.mint(sub="42"), device="laptop")
    _, unnamed = sign_in(signed_in, oidc_issuer.mint(sub="42"))
    _, other = sign_in(signed_in, oidc_issuer.mint(sub="43"))

    assert first["user"] == again["user"] == unnamed["user"] != other["user"]
    assert unnamed["device"] not in ("phone", "laptop")  # a fresh device id
    listing = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "devastator"), "device", "list", first["user"],
         "--data-dir", str(signed_in.settings.data_dir)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "phone" in listing and "laptop" in listing and unnamed["device"] in listing


def test_a_device_that_sent_a_csr_gets_a_certificate_for_auth_cert(signed_in, oidc_issuer, tmp_path):  # noqa: F811
    key_pem, csr_pem = new_client_key_and_csr()
    _, result = sign_in(signed_in, oidc_issuer.mint(sub="7"), device="iphone", csr=csr_pem)

    certificate = x509.load_pem_x509_certificate(result["cert"].encode())
    ca = x509.load_pem_x509_certificate(result["ca"].encode())
    certificate.verify_directly_issued_by(ca)
    assert result["ca"].encode() == signed_in.ca.read_bytes()
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "cert.pem").write_text(result["cert"])
    (tmp_path / "ca.pem").write_text(result["ca"])

    device = Client.connect_tls("localhost", signed_in.tls_address[1], ca=tmp_path / "ca.pem",
                                cert=tmp_path / "cert.pem", key=tmp_path / "key.pem")
    try:
        assert device.auth_cert() == {"user": result["user"], "device": "iphone", "pending": 0}
    finally:
        device.close()


def test_a_bad_csr_is_invalid_params_and_registers_nothing(signed_in, oidc_issuer):  # noqa: F811
    raw = RawTls(signed_in)
    answer = raw.call("auth.google", {"token": oidc_issuer.mint(sub="8"), "csr": "-----BEGIN nonsense"}, id=1)
    assert_error(answer, INVALID_PARAMS, 1)
    raw.assert_open()
    sender = signed_in.connect("alice")
    with pytest.raises(RpcError):
        sender.send(user_id_for("google", "8"), "nobody is registered")


@pytest.mark.parametrize(
    "bad",
    [
        "bad signature",
        "wrong audience",
        "wrong issuer",
        "expired",
        "unverified email",
        "unknown kid",
        "alg none",
    ],
)
def test_bad_id_tokens_are_refused_with_forbidden(signed_in, oidc_issuer, bad):  # noqa: F811
    now = int(time.time())
    tokens = {
        "bad signature": lambda: oidc_issuer.mint(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "wrong audience": lambda: oidc_issuer.mint(aud="someone-else.apps.googleusercontent.com",
                                                   azp="someone-else.apps.googleusercontent.com"),
        "wrong issuer": lambda: oidc_issuer.mint(iss="https://accounts.example.org"),
        "expired": lambda: oidc_issuer.mint(iat=now - 7200, exp=now - 3600),
        "unverified email": lambda: oidc_issuer.mint(email_verified=False),
        "unknown kid": lambda: oidc_issuer.mint(kid="no-such-key"),
        "alg none": lambda: oidc_issuer.mint(alg="none"),
    }
    refused(signed_in, tokens[bad]())
    signed_in.connect("alice").ping()  # and the server serves on


def test_a_rotated_provider_key_is_fetched_when_first_seen(signed_in, oidc_issuer):  # noqa: F811
    sign_in(signed_in, oidc_issuer.mint(sub="9"))
    oidc_issuer.rotate()
    _, result = sign_in(signed_in, oidc_issuer.mint(sub="9"))
    assert result["user"] == user_id_for("google", "9")


def test_tokens_minted_at_sign_in_use_the_key_of_the_last_rotation(signed_in, oidc_issuer):  # noqa: F811
    _, before = sign_in(signed_in, oidc_issuer.mint(sub="10"))
    rotated = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "devastator"), "jwt", "rotate",
         "--data-dir", str(signed_in.settings.data_dir)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    _, after = sign_in(signed_in, oidc_issuer.mint(sub="10"))

    new_kid = jwt.get_unverified_header(after["token"])["kid"]
    assert new_kid != jwt.get_unverified_header(before["token"])["kid"] and new_kid in rotated
    for token in (before["token"], after["token"]):
        assert signed_in.tls_client().auth_jwt(token)["user"] == user_id_for("google", "10")


def test_sign_in_is_refused_when_no_client_id_is_configured(running):
    raw = RawTls(running)
    answer = raw.call("auth.google", {"token": "eyJ.whatever.x"}, id=1)
    assert_error(answer, FORBIDDEN, 1)
    assert "not configured" in answer["error"]["message"]


@pytest.mark.skipif(
    not (os.environ.get("GOOGLE_ID_TOKEN") and os.environ.get("GOOGLE_CLIENT_ID")),
    reason="set GOOGLE_ID_TOKEN and GOOGLE_CLIENT_ID to sign in against Google itself",
)
def test_sign_in_against_google_itself(servers):
    running = servers(oidc_audiences=(os.environ["GOOGLE_CLIENT_ID"],))  # Google's issuers and key set
    _, result = sign_in(running, os.environ["GOOGLE_ID_TOKEN"], device="integration-test")
    assert result["user"].startswith("google-") and result["device"] == "integration-test"
