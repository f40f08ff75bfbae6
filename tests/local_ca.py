"""A throwaway certificate authority for the test fakes that serve real TLS.

Each fake (FCM, CCS, APNs, the OIDC issuer) makes its own ``LocalCa``, writes
the CA certificate where the client under test is told to trust it, and issues
itself a server certificate (APNs also issues client certificates). Keys are
EC P-256 and every certificate is valid from an hour ago for a day, so clock
skew between the test and the fake never matters and nothing outlives a run.
"""
from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
LOCAL_NAMES = ("localhost", "127.0.0.1")


class LocalCa:
    """A self-signed CA that signs end-entity certificates only (path length 0)."""

    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = (
            _builder(_subject(common_name), _subject(common_name), self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certificates=True), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        """Write the CA certificate (what clients trust) to ``path``; return it."""
        path.write_bytes(self.certificate_pem)
        return path

    def issue(
        self,
        subject: x509.Name | str,
        *,
        usage: x509.ObjectIdentifier = SERVER_AUTH,
        names: Iterable[str] = LOCAL_NAMES,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A new key and its certificate for ``usage``, valid for ``names`` (host names, IP addresses).

        A string ``subject`` is a common name. ``names=()`` leaves out the
        subject alternative name, as client certificates do.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        builder = (
            _builder(_subject(subject), self.certificate.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(authority, critical=False)
        )
        general_names = [_general_name(name) for name in names]
        if general_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())

    def write_server(
        self,
        directory: Path,
        subject: x509.Name | str,
        *,
        names: Iterable[str] = LOCAL_NAMES,
        stem: str = "server",
    ) -> tuple[Path, Path]:
        """Issue a server certificate; write it and its key to ``<stem>.pem`` and ``<stem>.key``.

        Returns (certificate file, key file), the arguments of ``SSLContext.load_cert_chain``.
        """
        key, certificate = self.issue(subject, names=names)
        cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(pem_key(key))
        return cert_file, key_file


def pem_key(key: PrivateKeyTypes, password: str | None = None) -> bytes:
    """A private key as PKCS#8 PEM, encrypted with ``password`` if one is given."""
    encryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    """Name, key, serial and validity: what every certificate here shares."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _subject(subject: x509.Name | str) -> x509.Name:
    if isinstance(subject, x509.Name):
        return subject
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    # Every key here signs (ECDSA handshakes); only the CA's signs certificates and CRLs.
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=signs_certificates, crl_sign=signs_certificates,
        encipher_only=False, decipher_only=False,
    )
