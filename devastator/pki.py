"""The server's own certificate authority and the TLS contexts built on it.

On first start ``ensure_pki`` creates, in the data directory, a CA that signs
both the server's certificate for the TLS endpoint and the client certificates
that devices receive at registration (``CertificateAuthority``). A device's
certificate names its user, device and registration in a SAN URI,
``devastator:user/<user>/device/<device>/registration/<id>``, which
``client_identity`` reads back from a peer certificate that the TLS handshake
has already verified.

The data directory holds the keys and the messages: it and every file in it
are private to the server's user (0700 and 0600), whoever made it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .identity import DeviceIdentity

log = logging.getLogger(__name__)

CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=5 * 365)
# Backdating covers clocks of devices that run a little behind the server's.
CLOCK_SKEW = datetime.timedelta(minutes=5)

IDENTITY_URI_PREFIX = "devastator:user/"
# The protocol's user id rule (PROTOCOL.md section 4).
_USER_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")
# X.509's upper bound for a common name, which holds the device id.
_MAX_DEVICE_LENGTH = 64
_MIN_RSA_BITS = 2048

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644  # certificates handed out, outside the data directory
PRIVATE_DIR_MODE = 0o700

# What servers offer: Mozilla's "intermediate" profile (wiki.mozilla.org/Security/Server_Side_TLS, 5.7).
# TLS 1.2 only with ECDHE and an AEAD (the DHE-RSA suites it also allows need DH parameters: left out),
# TLS 1.3's three suites, and the groups X25519, P-256 and P-384 (not P-521, X448 or FFDHE).
INTERMEDIATE_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
INTERMEDIATE_TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
INTERMEDIATE_GROUPS = "X25519:prime256v1:secp384r1"


class PkiError(RuntimeError):
    """The PKI files in the data directory are in a state we must not repair."""


@dataclass(frozen=True)
class PkiPaths:
    """Where the CA and the server's certificate and keys are stored."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, data_dir: Path) -> PkiPaths:
        data_dir = Path(data_dir)
        return cls(
            ca_cert=data_dir / "ca.pem",
            ca_key=data_dir / "ca.key",
            server_cert=data_dir / "server.pem",
            server_key=data_dir / "server.key",
        )


def server_names(host: str) -> tuple[str, ...]:
    """Names the server certificate (made on first start) is valid for, binding ``host``."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if host not in ("", "0.0.0.0", "::"):  # a wildcard bind is no name to connect to
        names.append(host)
    return tuple(dict.fromkeys(names))


def ensure_pki(
    data_dir: Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1")
) -> PkiPaths:
    """Create whatever of the CA and server certificate and keys is missing.

    Existing keys are never replaced. A certificate is (re)issued only when it
    is missing or when its key or its issuer has just been created, because it
    would be useless otherwise. A CA certificate whose key is lost cannot be
    repaired without invalidating every device certificate, so that raises
    ``PkiError`` and leaves the decision to an operator.
    """
    if not hostnames:
        raise ValueError("the server certificate needs at least one hostname")
    data_dir = Path(data_dir)
    ensure_private_dir(data_dir)
    paths = PkiPaths.in_dir(data_dir)

    if paths.ca_cert.exists() and not paths.ca_key.exists():
        raise PkiError(
            f"{paths.ca_cert} exists but its key {paths.ca_key} is missing: restore the key, "
            "or remove the certificate to create a new CA (devices must then re-register)"
        )
    ca_key, ca_key_created = _load_or_create_key(paths.ca_key)
    if ca_key_created or not paths.ca_cert.exists():
        ca_cert = _build_ca_certificate(ca_key)
        write_file_atomically(paths.ca_cert, _cert_pem(ca_cert), mode=PRIVATE_FILE_MODE)
        ca_created = True
    else:
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        ca_created = False

    server_key, server_key_created = _load_or_create_key(paths.server_key)
    if ca_created or server_key_created or not paths.server_cert.exists():
        server_cert = _build_server_certificate(server_key, ca_cert, ca_key, hostnames)
        write_file_atomically(paths.server_cert, _cert_pem(server_cert), mode=PRIVATE_FILE_MODE)
    return paths


class CertificateAuthority:
    """The server's CA, loaded once, signing devices' certificate signing requests."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.certificate = certificate
        self._key = key
        self.certificate_pem = _cert_pem(certificate)

    @classmethod
    def load(cls, paths: PkiPaths) -> CertificateAuthority:
        certificate = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{paths.ca_key} holds a {type(key).__name__}, expected an EC key")
        return cls(certificate, key)

    def issue_client_certificate(self, csr: x509.CertificateSigningRequest, identity: DeviceIdentity,
                                 *, days: int) -> bytes:
        """Sign a device's CSR (checked by ``load_csr``); return the PEM certificate.

        Only the CSR's public key is used: the subject and extensions are ours,
        so a device cannot ask for another identity or for CA powers. The
        private key never leaves the device.
        """
        user, device, _ = identity
        if not _USER_ID.fullmatch(user):
            raise ValueError(f"invalid user id {user!r}")
        if not device or len(device) > _MAX_DEVICE_LENGTH or not device.isprintable():
            raise ValueError(
                f"invalid device id {device!r}: expected 1 to {_MAX_DEVICE_LENGTH} printable characters"
            )
        if days <= 0:
            raise ValueError(f"certificate lifetime must be positive, got {days} days")
        public_key = csr.public_key()
        now = _now()
        # A certificate outliving its issuer would fail verification anyway.
        not_after = min(now + datetime.timedelta(days=days), self.certificate.not_valid_after_utc)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.USER_ID, user),
                x509.NameAttribute(NameOID.COMMON_NAME, device),
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity_uri(identity))]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_identifier(self.certificate), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return _cert_pem(certificate)


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A device's certificate signing request, checked; ValueError says what is wrong.

    Malformed PEM, a signature that does not match the key, an unsupported or
    weak key all fail here, before anything is registered.
    """
    csr = x509.load_pem_x509_csr(csr_pem)  # ValueError when malformed
    try:
        signature_valid = csr.is_signature_valid
    except UnsupportedAlgorithm as error:
        raise ValueError(f"unsupported CSR signature algorithm: {error}") from None
    if not signature_valid:
        raise ValueError("the CSR's signature does not match its public key")
    _check_client_key(csr.public_key())
    return csr


def new_client_key_and_csr() -> tuple[bytes, bytes]:
    """A fresh P-256 key and a CSR for it, as PEM: what a device makes (CLI, tests)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def identity_uri(identity: DeviceIdentity) -> str:
    """The SAN URI that names a device (and its registration) in its certificate."""
    # Percent-encoding keeps the URI ASCII (IA5String) and unambiguous even
    # when a device id holds '/' or non-ASCII characters.
    user, device, registration = (quote(part, safe="@") for part in identity)
    return f"{IDENTITY_URI_PREFIX}{user}/device/{device}/registration/{registration}"


def client_identity(cert_der_or_dict: bytes | Mapping[str, object] | None) -> DeviceIdentity | None:
    """The device named by a peer certificate, or None.

    Takes what ``SSLSocket.getpeercert(binary_form=True)`` returns (DER bytes,
    or None without a client certificate); the dict form of ``getpeercert()``
    works too. The certificate is trusted as given: only call this on a
    certificate that the TLS handshake verified against our CA.
    """
    if not cert_der_or_dict:
        return None
    if isinstance(cert_der_or_dict, Mapping):
        names = cert_der_or_dict.get("subjectAltName") or ()
        uris = [value for kind, value in names if kind == "URI"]  # type: ignore[union-attr]
    else:
        try:
            certificate = x509.load_der_x509_certificate(bytes(cert_der_or_dict))
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return None
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    for uri in uris:
        identity = _parse_identity_uri(uri)
        if identity is not None:
            return identity
    return None


def server_ssl_context(
    paths: PkiPaths,
    *,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    client_certificates: bool = True,
) -> ssl.SSLContext:
    """A server context with the server certificate, offering what Mozilla's "intermediate" profile allows.

    With ``client_certificates`` (the TLS endpoint) it asks for, but does not
    require, a client certificate, and one that does not chain to our CA fails
    the handshake. Without (wss:// for browsers) it asks for none: a browser
    asked for a certificate it does not have may refuse to connect.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = min_version
    context.set_ciphers(INTERMEDIATE_TLS12_CIPHERS)
    _OpenSslContext(context).restrict(INTERMEDIATE_TLS13_CIPHERSUITES, INTERMEDIATE_GROUPS)
    # The profile lets the client choose among its suites, all of them strong; and a client
    # asking to renegotiate makes the server do a handshake's work again for nothing.
    context.options = (context.options & ~ssl.OP_CIPHER_SERVER_PREFERENCE) | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(certfile=paths.server_cert, keyfile=paths.server_key)
    # A chat client writes a TLS record per frame; reading ahead, OpenSSL takes what the socket
    # holds in one read, where it would read each record's header and then its body (two system
    # calls a record). Nothing is left unseen in its buffer: the readers read until "want read".
    _OpenSslContext(context).read_ahead()
    if client_certificates:
        context.load_verify_locations(cafile=paths.ca_cert)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_ssl_context(
    ca_cert: Path | None,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client's context that trusts ``ca_cert`` (the system's CAs when None).

    ``cert``/``key`` present a client certificate. ``verify=False`` skips
    every check of the server: for tests and local debugging only.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_cert is not None:
        context.load_verify_locations(cafile=ca_cert)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        context.load_cert_chain(certfile=cert, keyfile=key)
    return context


class _OpenSslContext:
    """What Python's ssl module does not expose of a context (3.11: TLS 1.3 suites, the group list, read-ahead).

    ctypes calls OpenSSL's own SSL_CTX functions, found through the ``_ssl``
    module (so in the very libssl it uses), on the SSL_CTX that CPython keeps
    right after the context object's header. That pointer is checked first:
    OpenSSL must report the options Python reports for it.
    """

    _SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl
    _SSL_CTRL_GET_READ_AHEAD = 40  # SSL_CTX_get_read_ahead and SSL_CTX_set_read_ahead, too
    _SSL_CTRL_SET_READ_AHEAD = 41

    def __init__(self, context: ssl.SSLContext):
        import _ssl

        self._context = context
        self._libssl = ctypes.CDLL(_ssl.__file__)  # its symbols and those of the libssl it links
        self._pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value

    def restrict(self, tls13_ciphersuites: str, groups: str) -> None:
        ctrl = self._ctrl("restrict TLS groups and suites")
        try:
            set_ciphersuites = self._libssl.SSL_CTX_set_ciphersuites
        except AttributeError as error:
            raise ssl.SSLError(f"cannot restrict TLS groups and suites with this Python's OpenSSL: {error}") from None
        set_ciphersuites.restype, set_ciphersuites.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]
        if set_ciphersuites(self._pointer, tls13_ciphersuites.encode()) != 1:
            raise ssl.SSLError(f"OpenSSL refused the TLS 1.3 suites {tls13_ciphersuites}")
        if ctrl(self._pointer, self._SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(groups.encode())) != 1:
            raise ssl.SSLError(f"OpenSSL refused the TLS groups {groups}")

    def read_ahead(self) -> None:
        """Let OpenSSL read as much as the socket holds, not one record's header, then its body."""
        ctrl = self._ctrl("read ahead")
        ctrl(self._pointer, self._SSL_CTRL_SET_READ_AHEAD, 1, None)

    def reads_ahead(self) -> bool:
        return bool(self._ctrl("ask whether it reads ahead")(self._pointer, self._SSL_CTRL_GET_READ_AHEAD, 0, None))

    def _ctrl(self, what: str):
        """SSL_CTX_ctrl, once the context's pointer is checked."""
        try:
            get_options = self._libssl.SSL_CTX_get_options
            ctrl = self._libssl.SSL_CTX_ctrl
        except AttributeError as error:
            raise ssl.SSLError(f"cannot {what} with this Python's OpenSSL: {error}") from None
        get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
        ctrl.restype = ctypes.c_long
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        if not self._pointer or get_options(self._pointer) != self._context.options:
            raise ssl.SSLError("cannot find the OpenSSL context of an ssl.SSLContext in this Python")
        return ctrl


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` readable by its owner only, or make it so: it and every file in it.

    The directory may have been made by hand, or by an older version, with
    looser modes (0755 and 0644 under a usual umask): they are tightened,
    with one log line, rather than refused.
    """
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    entries = [path, *(Path(entry.path) for entry in os.scandir(path) if not entry.is_symlink())]
    modes = {entry: stat.S_IMODE(entry.lstat().st_mode) for entry in entries}
    loosened = {entry: mode for entry, mode in modes.items() if mode & 0o077}
    for entry, mode in loosened.items():
        try:
            os.chmod(entry, mode & 0o700)
        except PermissionError as error:
            raise PermissionError(
                error.errno,
                f"cannot make {entry} private to the server's user (mode {mode & 0o700:o}, not {mode:o}):"
                f" {error.strerror} (it belongs to uid {entry.lstat().st_uid}, the server runs as uid"
                f" {os.geteuid()})",
            ) from None
    if loosened:
        log.warning("made %s private to its user (0700, files 0600); it was: %s", path,
                    ", ".join(f"{entry.name} {mode:o}" for entry, mode in loosened.items()))


def write_file_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or new file, never a part.

    The data reaches the disk before the rename, and the rename before we
    return, so a crash cannot leave a truncated key behind.
    """
    path = Path(path)
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(descriptor, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _load_or_create_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The key stored at ``path``, and whether it was just created."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{path} holds a {type(key).__name__}, expected an EC key")
        return key, False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    write_file_atomically(path, pem, mode=PRIVATE_FILE_MODE)
    return key, True


def _build_ca_certificate(ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    # A random suffix tells CAs of different installations apart in a
    # device's trust store and in verification errors.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Devastator CA {secrets.token_hex(4)}")])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        # path_length=0: the CA signs end-entity certificates, never sub-CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _build_server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hostnames: Sequence[str],
) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        # Clients match hostnames against the SAN only; the CN is for people.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Devastator server")]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(name) for name in hostnames]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _general_name(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    subject_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_id)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_client_key(public_key: object) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA key of {public_key.key_size} bits is too weak, need {_MIN_RSA_BITS}")
    elif not isinstance(public_key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise ValueError(f"unsupported key type {type(public_key).__name__} in CSR")


def _parse_identity_uri(uri: str) -> DeviceIdentity | None:
    if not uri.startswith(IDENTITY_URI_PREFIX):
        return None
    parts = uri[len(IDENTITY_URI_PREFIX):].split("/")
    if len(parts) != 5 or parts[1] != "device" or parts[3] != "registration":
        return None
    identity = DeviceIdentity(unquote(parts[0]), unquote(parts[2]), unquote(parts[4]))
    if not all(identity):
        return None
    return identity


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)
