"""Tests for devastator.pki: files on disk, issued certificates and real TLS handshakes."""

import datetime
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devastator.identity import DeviceIdentity
from devastator.pki import (
    _OpenSslContext,
    CertificateAuthority,
    PkiError,
    PkiPaths,
    client_identity,
    client_ssl_context,
    ensure_pki,
    load_csr,
    new_client_key_and_csr,
    server_ssl_context,
)

TIMEOUT = 10.0


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def all_bytes(paths: PkiPaths) -> dict[str, bytes]:
    return {name: getattr(paths, name).read_bytes() for name in ("ca_cert", "ca_key", "server_cert", "server_key")}


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def make_csr(key, common_name: str = "whatever the device asks for") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def issue(paths: PkiPaths, csr_pem: bytes, *, user: str, device: str, days: int, registration: str = "r1") -> bytes:
    ca = CertificateAuthority.load(paths)
    return ca.issue_client_certificate(load_csr(csr_pem), DeviceIdentity(user, device, registration), days=days)


def write_key(key, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def tls_exchange(server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str) -> dict:
    """Run one TLS connection over 127.0.0.1; report what each side saw."""
    outcome: dict = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                connection.settimeout(TIMEOUT)
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    outcome["peer_cert"] = tls.getpeercert(binary_form=True)
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as error:
                outcome["server_error"] = error

        server_thread = threading.Thread(target=serve, daemon=True)
        server_thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
                with client_context.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    # Under TLS 1.3 the server checks the client's certificate
                    # after the client's handshake is done: reading waits for it.
                    outcome["reply"] = tls.recv(2)
        except (ssl.SSLError, OSError) as error:
            outcome["client_error"] = error
        server_thread.join(TIMEOUT)
        assert not server_thread.is_alive()
    return outcome


@pytest.fixture
def pki(tmp_path) -> PkiPaths:
    return ensure_pki(tmp_path / "data")


def test_creates_files_with_private_modes(tmp_path):
    data_dir = tmp_path / "data"

    paths = ensure_pki(data_dir)

    assert paths == PkiPaths.in_dir(data_dir)
    assert paths.ca_cert == data_dir / "ca.pem"
    assert paths.server_key == data_dir / "server.key"
    assert file_mode(data_dir) == 0o700
    assert file_mode(paths.ca_key) == 0o600
    assert file_mode(paths.server_key) == 0o600
    assert file_mode(paths.ca_cert) == 0o600  # in the data directory, everything is private
    assert file_mode(paths.server_cert) == 0o600
    assert sorted(p.name for p in data_dir.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]


def test_second_call_keeps_every_file(pki):
    before = all_bytes(pki)

    ensure_pki(pki.ca_cert.parent)

    assert all_bytes(pki) == before


def test_missing_server_certificate_is_reissued_alone(pki):
    before = all_bytes(pki)
    pki.server_cert.unlink()

    ensure_pki(pki.ca_cert.parent)

    after = all_bytes(pki)
    assert after["ca_cert"] == before["ca_cert"]
    assert after["ca_key"] == before["ca_key"]
    assert after["server_key"] == before["server_key"]
    load_cert(pki.server_cert).verify_directly_issued_by(load_cert(pki.ca_cert))


def test_recreated_ca_reissues_server_certificate(pki):
    before = all_bytes(pki)
    pki.ca_cert.unlink()

    ensure_pki(pki.ca_cert.parent)

    after = all_bytes(pki)
    assert after["ca_key"] == before["ca_key"]  # keys are never overwritten
    assert after["server_key"] == before["server_key"]
    assert after["ca_cert"] != before["ca_cert"]
    assert after["server_cert"] != before["server_cert"]
    load_cert(pki.server_cert).verify_directly_issued_by(load_cert(pki.ca_cert))


def test_lost_ca_key_is_not_repaired(pki):
    pki.ca_key.unlink()

    with pytest.raises(PkiError, match="ca.key"):
        ensure_pki(pki.ca_cert.parent)


def test_ca_certificate_fields(pki):
    ca = load_cert(pki.ca_cert)

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.startswith("Devastator CA ")
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3650)


def test_server_certificate_names_hosts(tmp_path):
    paths = ensure_pki(tmp_path, hostnames=("chat.example.org", "10.0.0.7", "::1"))
    server = load_cert(paths.server_cert)

    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["chat.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    server.verify_directly_issued_by(load_cert(paths.ca_cert))


def test_issued_client_certificate(pki):
    device_key = ec.generate_private_key(ec.SECP256R1())

    pem = issue(pki, make_csr(device_key), user="alice", device="phone", days=30)

    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(load_cert(pki.ca_cert))
    assert cert.public_key() == device_key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "phone"
    assert cert.subject.get_attributes_for_oid(NameOID.USER_ID)[0].value == "alice"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["devastator:user/alice/device/phone/registration/r1"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=30, minutes=6)
    assert client_identity(cert.public_bytes(serialization.Encoding.DER)) == ("alice", "phone", "r1")


def test_identity_survives_awkward_device_ids(pki):
    device_key = ec.generate_private_key(ec.SECP256R1())

    pem = issue(pki, make_csr(device_key), user="bob@example.org", device="tab/2 é", days=1)

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert client_identity(der) == ("bob@example.org", "tab/2 é", "r1")


def test_csr_with_bad_signature_is_rejected(pki):
    device_key = ec.generate_private_key(ec.SECP256R1())
    csr_der = x509.load_pem_x509_csr(make_csr(device_key, "device-a")).public_bytes(serialization.Encoding.DER)
    # Changing the signed subject leaves a well-formed CSR whose signature no longer matches.
    tampered = x509.load_der_x509_csr(csr_der.replace(b"device-a", b"device-b"))
    tampered_pem = tampered.public_bytes(serialization.Encoding.PEM)

    with pytest.raises(ValueError, match="signature"):
        issue(pki, tampered_pem, user="alice", device="phone", days=30)


def test_garbage_csr_is_rejected(pki):
    with pytest.raises(ValueError):
        issue(pki, b"not a csr", user="alice", device="phone", days=30)


def test_weak_rsa_key_is_rejected(pki):
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)

    with pytest.raises(ValueError, match="RSA"):
        issue(pki, make_csr(weak_key), user="alice", device="phone", days=30)


@pytest.mark.parametrize(
    "user, device",
    [("", "phone"), ("a/b", "phone"), ("x" * 65, "phone"), ("alice", ""), ("alice", "d" * 65), ("alice", "tab\n")],
)
def test_bad_identities_are_rejected(pki, user, device):
    device_key = ec.generate_private_key(ec.SECP256R1())

    with pytest.raises(ValueError):
        issue(pki, make_csr(device_key), user=user, device=device, days=30)


def test_client_identity_without_identity():
    assert client_identity(None) is None
    assert client_identity(b"") is None
    assert client_identity(b"not DER") is None
    assert client_identity({}) is None


def test_client_identity_from_getpeercert_dict():
    peer = {"subjectAltName": (("DNS", "x"), ("URI", "devastator:user/alice/device/phone/registration/r1"))}

    assert client_identity(peer) == ("alice", "phone", "r1")


@pytest.mark.parametrize(
    "uri",
    [
        "devastator:user/alice/device/phone",  # no registration: from before revocation existed
        "devastator:user/alice/device/phone/registration/",
        "devastator:user/alice/phone/registration/r1",
        "https://example.org/alice",
    ],
)
def test_identity_uris_that_name_no_device(uri):
    assert client_identity({"subjectAltName": (("URI", uri),)}) is None


def test_a_made_key_and_csr_get_a_certificate_for_that_key(pki):
    key_pem, csr_pem = new_client_key_and_csr()
    certificate = x509.load_pem_x509_certificate(issue(pki, csr_pem, user="alice", device="phone", days=1))
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert certificate.public_key() == key.public_key()


def test_certificate_without_identity_uri(pki):
    server_der = load_cert(pki.server_cert).public_bytes(serialization.Encoding.DER)

    assert client_identity(server_der) is None


@pytest.mark.parametrize("client_certificates", [True, False], ids=["tls endpoint", "wss"])
def test_server_contexts_read_ahead_and_plain_ones_do_not(pki, client_certificates):
    # A record per frame: OpenSSL reads what the socket holds at once (tests/test_tls_reads.py for the reads).
    assert _OpenSslContext(server_ssl_context(pki, client_certificates=client_certificates)).reads_ahead()
    assert not _OpenSslContext(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)).reads_ahead()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_handshake_without_client_certificate(pki, server_hostname):
    outcome = tls_exchange(server_ssl_context(pki), client_ssl_context(pki.ca_cert), server_hostname)

    assert outcome.get("reply") == b"ok", outcome
    assert outcome["peer_cert"] is None
    assert client_identity(outcome["peer_cert"]) is None


def test_handshake_with_issued_client_certificate(pki, tmp_path):
    device_key = ec.generate_private_key(ec.SECP256R1())
    key_path = write_key(device_key, tmp_path / "device.key")
    cert_path = tmp_path / "device.pem"
    cert_path.write_bytes(issue(pki, make_csr(device_key), user="alice", device="phone", days=30))
    client_context = client_ssl_context(pki.ca_cert, cert=cert_path, key=key_path)

    outcome = tls_exchange(server_ssl_context(pki), client_context, "localhost")

    assert outcome.get("reply") == b"ok", outcome
    assert client_identity(outcome["peer_cert"]) == ("alice", "phone", "r1")


@pytest.mark.parametrize("tls_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_certificate_from_another_ca_fails_on_server(pki, tmp_path, tls_version):
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    now = datetime.datetime.now(datetime.timezone.utc)
    stranger_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(stranger_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("devastator:user/alice/device/phone")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(stranger_key, hashes.SHA256())
    )
    cert_path = tmp_path / "stranger.pem"
    cert_path.write_bytes(stranger_cert.public_bytes(serialization.Encoding.PEM))
    key_path = write_key(stranger_key, tmp_path / "stranger.key")
    client_context = client_ssl_context(pki.ca_cert, cert=cert_path, key=key_path)
    client_context.maximum_version = tls_version

    outcome = tls_exchange(server_ssl_context(pki), client_context, "localhost")

    assert isinstance(outcome.get("server_error"), ssl.SSLCertVerificationError), outcome
    assert "peer_cert" not in outcome
    assert "reply" not in outcome


def test_client_rejects_server_from_unknown_ca(pki, tmp_path):
    other = ensure_pki(tmp_path / "other")

    outcome = tls_exchange(server_ssl_context(pki), client_ssl_context(other.ca_cert), "localhost")

    assert isinstance(outcome.get("client_error"), ssl.SSLCertVerificationError), outcome


def test_unverified_client_context_accepts_any_server(pki, tmp_path):
    other = ensure_pki(tmp_path / "other")

    outcome = tls_exchange(server_ssl_context(pki), client_ssl_context(other.ca_cert, verify=False), "anything")

    assert outcome.get("reply") == b"ok", outcome

