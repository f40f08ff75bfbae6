"""Client authentication end to end: certificates, JWT hardening, revocation, rotation, isolation.

Real server, real TLS; the operator's commands run as real subprocesses
against the running server's data directory.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import logging
import ssl
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devastator.client import Client
from devastator.identity import DeviceIdentity
from devastator.pki import CertificateAuthority, PkiPaths, load_csr, new_client_key_and_csr
from devastator.protocol.errors import FORBIDDEN, RpcError
from wire import RawTls, assert_error

ROOT = Path(__file__).resolve().parent.parent
DEVASTATOR = [sys.executable, str(ROOT / "bin" / "devastator")]
WAIT = 5.0


def cli(running, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DEVASTATOR, *args, "--data-dir", str(running.settings.data_dir)],
        capture_output=True, text=True, timeout=30, check=True,
    )


def issue_certificate(running, identity: DeviceIdentity, directory: Path) -> tuple[Path, Path]:
    """What a device does at registration: its own key, a CSR, the server's signature."""
    key_pem, csr_pem = new_client_key_and_csr()
    ca = CertificateAuthority.load(PkiPaths.in_dir(running.settings.data_dir))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(key_pem)
    (directory / "cert.pem").write_bytes(ca.issue_client_certificate(load_csr(csr_pem), identity, days=1))
    return directory / "cert.pem", directory / "key.pem"


def cert_client(running, cert: Path, key: Path) -> Client:
    return running.tls_client(cert=cert, key=key)


def self_signed(directory: Path, *, issuer_key=None, issuer_name=None) -> tuple[Path, Path]:
    """A client certificate naming alice's phone, signed by anyone but the server's CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "phone")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("devastator:user/alice/device/phone/registration/x")]
            ),
            critical=False,
        )
        .sign(issuer_key or key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    return directory / "cert.pem", directory / "key.pem"


def assert_refused_at_handshake(running, cert: Path, key: Path) -> None:
    """TLS 1.3 ends the client's handshake before the server checks it: the refusal
    arrives as an alert on the first read, or as a closed connection."""
    try:
        raw = RawTls(running, cert=cert, key=key)
    except (ssl.SSLError, ConnectionError):
        return
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        raw.call("ping")
    raw.close()


def forbidden(call) -> RpcError:
    with pytest.raises(RpcError) as refused:
        call()
    assert refused.value.code == FORBIDDEN, refused.value
    return refused.value


def wait_closed(client: Client) -> None:
    assert client.closed.wait(WAIT), "the connection was not closed"


# -- client certificates ---------------------------------------------------------------


def test_a_device_certificate_authenticates_with_auth_cert(running, tmp_path):
    identity = running.register("alice", "phone")
    cert, key = issue_certificate(running, identity, tmp_path / "phone")
    alice = cert_client(running, cert, key)
    assert alice.auth_cert() == {"user": "alice", "device": "phone", "pending": 0}
    bob = running.connect("bob")
    sent = bob.send("alice", "to the certificate holder")
    assert alice.receive(timeout=WAIT)["id"] == sent["id"]


def test_auth_cert_without_a_certificate_is_forbidden(running):
    raw = RawTls(running)
    assert_error(raw.call("auth.cert", id=1), FORBIDDEN, 1)
    raw.assert_open()


def test_a_self_signed_certificate_fails_the_handshake(running, tmp_path):
    running.register("alice", "phone")
    assert_refused_at_handshake(running, *self_signed(tmp_path / "self"))
    running.connect("bob").ping()  # the server serves on


def test_a_certificate_from_another_ca_fails_the_handshake(running, tmp_path):
    running.register("alice", "phone")
    other_ca = ec.generate_private_key(ec.SECP256R1())
    # Even with our CA's very name as issuer: only our CA's signature counts.
    ours = x509.load_pem_x509_certificate(running.ca.read_bytes())
    assert_refused_at_handshake(
        running, *self_signed(tmp_path / "other", issuer_key=other_ca, issuer_name=ours.subject)
    )


def test_a_refused_certificate_is_logged_once_per_cause(running, tmp_path, caplog):
    cert, key = self_signed(tmp_path / "self")
    with caplog.at_level(logging.WARNING, logger="devastator.auth"):
        for _ in range(3):
            assert_refused_at_handshake(running, cert, key)
        running.connect("bob").ping()
    lines = [r.getMessage() for r in caplog.records if r.name == "devastator.auth"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("client certificate refused for 127.0.0.1:"), lines


# -- JWT hardening ---------------------------------------------------------------------


def unsigned_token(claims: dict, header: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


def valid_claims(running, user="alice", device="phone") -> dict:
    identity = running.register(user, device)
    now = int(time.time())
    return {"iss": "devastator", "sub": identity.user, "dev": identity.device, "reg": identity.registration,
            "iat": now, "exp": now + 600}


def current_kid(running) -> str:
    return jwt.get_unverified_header(running.token("someone"))["kid"]


def test_a_token_with_alg_none_is_refused(running):
    claims = valid_claims(running)
    token = unsigned_token(claims, {"alg": "none", "typ": "JWT", "kid": current_kid(running)})
    forbidden(lambda: running.tls_client().auth_jwt(token))


def test_hs256_keyed_with_a_public_key_is_refused(running):
    """The algorithm-confusion attack: the CA's public key, which anyone can read, as the HMAC secret."""
    public_pem = x509.load_pem_x509_certificate(running.ca.read_bytes()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": current_kid(running)}
    unsigned = unsigned_token(valid_claims(running), header)[:-1]  # "header.claims"
    signature = base64.urlsafe_b64encode(hmac.new(public_pem, unsigned.encode(), hashlib.sha256).digest())
    token = f"{unsigned}.{signature.rstrip(b'=').decode()}"
    forbidden(lambda: running.tls_client().auth_jwt(token))


@pytest.mark.parametrize(
    "change",
    [
        {"exp": int(time.time()) - 3600},  # expired beyond the leeway
        {"iss": "someone-else"},
        {"reg": "a-registration-of-nothing"},
        {"sub": "bob"},  # alice's registration under bob's name
    ],
)
def test_tokens_with_wrong_claims_are_refused(running, change):
    claims = {**valid_claims(running), **change}
    running.register("bob", "phone")
    secret = running.authority._key_file.keys().current_secret
    token = jwt.encode(claims, secret, algorithm="HS256", headers={"kid": current_kid(running)})
    forbidden(lambda: running.tls_client().auth_jwt(token))


def test_jwt_rotate_keeps_old_tokens_and_signs_new_ones_with_the_new_key(running):
    old_token = running.token("alice", "phone")
    old_kid = jwt.get_unverified_header(old_token)["kid"]

    out = cli(running, "jwt", "rotate").stdout
    new_token = cli(running, "token", "alice", "--device", "laptop").stdout.strip().splitlines()[-1]

    new_kid = jwt.get_unverified_header(new_token)["kid"]
    assert new_kid != old_kid and new_kid in out
    assert running.tls_client().auth_jwt(old_token)["user"] == "alice"
    assert running.tls_client().auth_jwt(new_token)["device"] == "laptop"
    # The running server's own minting moved to the new key as well.
    assert jwt.get_unverified_header(running.authority.mint(running.register("carol"), 60))["kid"] == new_kid


# -- revocation ------------------------------------------------------------------------


def test_removing_a_device_closes_its_connections_and_refuses_its_credentials(running, tmp_path):
    identity = running.register("alice", "phone")
    token = running.token("alice", "phone")
    cert, key = issue_certificate(running, identity, tmp_path / "phone")
    by_token = running.connect("alice", "phone", ws=True)
    by_cert = cert_client(running, cert, key)
    by_cert.auth_cert()  # replaces the WebSocket connection of the same device
    wait_closed(by_token)
    laptop = running.connect("alice", "laptop")

    assert "removed alice/phone" in cli(running, "device", "remove", "alice", "phone").stdout

    wait_closed(by_cert)
    forbidden(lambda: running.tls_client().auth_jwt(token))
    forbidden(lambda: cert_client(running, cert, key).auth_cert())
    assert laptop.ping() == "pong"  # another device of the same user is untouched
    listing = cli(running, "device", "list", "alice").stdout
    assert "laptop" in listing and "phone" not in listing


def test_a_removed_device_registered_again_gets_new_credentials_and_the_old_stay_dead(running):
    old_token = running.token("alice", "phone")
    cli(running, "device", "remove", "alice", "phone")
    new_token = running.token("alice", "phone")
    assert running.tls_client().auth_jwt(new_token)["device"] == "phone"
    forbidden(lambda: running.tls_client().auth_jwt(old_token))


def test_removing_the_last_device_keeps_messages_for_the_next(running):
    bob = running.connect("bob")
    running.register("alice", "phone")
    sent = bob.send("alice", "wait for me")
    cli(running, "device", "remove", "alice", "phone")
    tablet = running.connect("alice", "tablet")
    assert tablet.receive(timeout=WAIT)["id"] == sent["id"]


def test_removing_an_unknown_device_says_so(running):
    failed = subprocess.run(
        [*DEVASTATOR, "device", "remove", "alice", "ghost", "--data-dir", str(running.settings.data_dir)],
        capture_output=True, text=True, timeout=30,
    )
    assert failed.returncode == 1 and "no device 'ghost'" in failed.stderr


# -- isolation between users -----------------------------------------------------------


def test_a_user_can_never_ack_read_or_receive_another_user_s_messages(running):
    mallory = running.connect("mallory")
    alice = running.connect("alice", auto_ack=False)
    sent = mallory.send("alice", "for alice only")
    delivered = alice.receive(timeout=WAIT)
    assert delivered["id"] == sent["id"]

    # Mallory knows the id (she sent it) and ACKs it, every way a client can.
    raw = RawTls(running)
    raw.auth(running.token("mallory", "second"))
    raw.send_value({"jsonrpc": "2.0", "id": sent["id"], "result": "ACK"})
    raw.send_value([{"jsonrpc": "2.0", "id": sent["id"], "result": "ACK"}])
    mallory.ack([sent["id"]])
    # Nor can she authenticate again on her connection as alice, nor send as alice.
    alice_token = running.token("alice", "phone")
    assert_error(raw.call("auth.jwt", {"token": alice_token}, id="again"), -32600, "again")
    spoof = raw.call("msg.send", {"to": "alice", "message": "hi", "from": "alice"})
    assert "result" in spoof or spoof["error"]["code"] == -32602

    # Alice's message is still hers and still pending: it comes back on reconnect.
    alice.close()
    again = running.connect("alice", auto_ack=False)
    assert again.receive(timeout=WAIT)["id"] == sent["id"]
    if "result" in spoof:  # a "from" param changes nothing: the sender is who authenticated
        assert again.receive(timeout=WAIT)["from"] == "mallory"
    # Mallory received nothing of alice's (a copy of what her other device sent is her own).
    with pytest.raises(TimeoutError):
        while True:
            got = mallory.receive(timeout=0.5)
            assert got["to"] == "mallory" or got["from"] == "mallory", got


def test_a_stolen_token_is_worth_one_device_of_one_user(running):
    """A token names one user and one device: editing it breaks its signature."""
    token = running.token("alice", "phone")
    header, claims, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    decoded["sub"] = "bob"
    forged_claims = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    forbidden(lambda: running.tls_client().auth_jwt(f"{header}.{forged_claims}.{signature}"))


def test_auth_failures_are_logged_once_per_cause_with_the_remote_address(running, caplog):
    with caplog.at_level(logging.WARNING, logger="devastator.auth"):
        for _ in range(5):
            forbidden(lambda: running.tls_client().auth_jwt("not.a.token"))
        forbidden(lambda: running.tls_client().auth_cert())
    lines = [r.getMessage() for r in caplog.records if r.name == "devastator.auth"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("auth.jwt refused for 127.0.0.1:"), lines
    assert lines[1].startswith("auth.cert refused for 127.0.0.1:"), lines


def test_cert_issue_writes_what_a_mobile_client_needs(running, tmp_path):
    out = tmp_path / "alice-phone"
    cli(running, "cert", "issue", "alice", "--device", "phone", "--out", str(out), "--days", "2")

    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (out / "ca.pem").read_bytes() == running.ca.read_bytes()
    certificate = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc <= datetime.timedelta(days=2, minutes=6)
    client = Client.connect_tls("localhost", running.tls_address[1], ca=out / "ca.pem",
                                cert=out / "cert.pem", key=out / "key.pem")
    try:
        assert client.auth_cert() == {"user": "alice", "device": "phone", "pending": 0}
    finally:
        client.close()
