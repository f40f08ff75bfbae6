"""Registration through an OpenID Connect sign-in (``auth.google``), and the credentials it earns.

The ID token says who the person is (provider and subject, turned into a
stable user id); the store then creates the user if new and registers the
device; the device gets a JWT and, when it sent a CSR, a client certificate
signed by the server's CA. The device's private key never leaves it.
"""
from __future__ import annotations

import secrets
from typing import Protocol

from cryptography import x509

from .auth import JwtAuthority
from .identity import DeviceIdentity
from .oidc import OidcIdentity, user_id_for
from .pki import CertificateAuthority, load_csr
from .protocol.errors import Forbidden, InvalidParams


class IdTokenVerifier(Protocol):
    def verify(self, token: str) -> OidcIdentity:
        """Who signed in; raises Forbidden (bad token) or Overloaded (provider unreachable)."""


class Registrar:
    def __init__(
        self,
        *,
        authority: JwtAuthority,
        ca: CertificateAuthority,
        verifier: IdTokenVerifier | None,
        user_prefix: str,
        token_ttl: int,
        cert_days: int,
    ):
        self._authority = authority
        self._ca = ca
        self._verifier = verifier
        self._user_prefix = user_prefix
        self._token_ttl = token_ttl
        self._cert_days = cert_days

    def sign_in(self, id_token: str) -> str:
        """The user id of whoever the ID token proves to be. May wait for the provider's key set."""
        if self._verifier is None:
            raise Forbidden("Google sign-in is not configured on this server")
        return user_id_for(self._user_prefix, self._verifier.verify(id_token).subject)

    def check_csr(self, csr_pem: str | None) -> x509.CertificateSigningRequest | None:
        if csr_pem is None:
            return None
        try:
            return load_csr(csr_pem.encode())
        except ValueError as error:
            raise InvalidParams(f'"csr" is not a usable certificate signing request: {error}') from None

    def credentials(self, identity: DeviceIdentity, csr: x509.CertificateSigningRequest | None) -> dict:
        """What ``auth.google`` answers besides user and device: a JWT, and a certificate for a CSR."""
        issued = {"token": self._authority.mint(identity, self._token_ttl)}
        if csr is not None:
            issued["cert"] = self._ca.issue_client_certificate(csr, identity, days=self._cert_days).decode()
            issued["ca"] = self._ca.certificate_pem.decode()
        return issued

    def new_device_id(self) -> str:
        """A device id for a device that registers without naming itself."""
        return f"device-{secrets.token_hex(6)}"
