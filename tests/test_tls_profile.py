"""The TLS endpoint and wss:// offer what Mozilla's "intermediate" profile allows, and nothing more.

Real handshakes against a running server: Python clients restricted to one
suite, one version or one group, and ``openssl s_client`` for what Python's
ssl module cannot ask for (X25519 and X448, TLS 1.3 suites).
"""
import shutil
import socket
import ssl
import subprocess
import warnings

import pytest

from devastator import pki

ALLOWED_TLS12 = pki.INTERMEDIATE_TLS12_CIPHERS.split(":")
ECDSA_TLS12 = [suite for suite in ALLOWED_TLS12 if "-ECDSA-" in suite]  # the server's key is P-256
REFUSED_TLS12 = ["ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256",  # the CBC suites offered before
                 "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-CCM", "AES128-GCM-SHA256"]
OPENSSL = shutil.which("openssl")


@pytest.fixture(params=["tls", "wss"])
def endpoint(request, servers) -> tuple[str, int]:
    """The TLS endpoint, or the HTTP port serving wss:// (the other context the server builds)."""
    running = servers(ws_tls=True)
    return running.tls_address if request.param == "tls" else running.http_address


def handshake(address, *, ciphers: str | None = None, version: ssl.TLSVersion | None = None,
              curve: str | None = None) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the profile is under test here, not the certificate
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if curve is not None:
        context.set_ecdh_curve(curve)  # the only group the client offers
    raw = socket.create_connection(address, timeout=5)
    try:
        return context.wrap_socket(raw, server_hostname="localhost")  # it owns the socket from here
    except BaseException:
        raw.close()
        raise


def refused(address, **kwargs) -> bool:
    try:
        handshake(address, **kwargs).close()
    except (ssl.SSLError, ConnectionError):
        return True
    return False


def test_tls_1_2_offers_only_ecdhe_with_aead(endpoint):
    for suite in ECDSA_TLS12:
        tls = handshake(endpoint, ciphers=suite, version=ssl.TLSVersion.TLSv1_2)
        assert tls.cipher()[0] == suite and tls.version() == "TLSv1.2"
        tls.close()
    for suite in REFUSED_TLS12:
        assert refused(endpoint, ciphers=suite, version=ssl.TLSVersion.TLSv1_2), suite


def test_tls_1_3_is_preferred_and_older_versions_are_refused(endpoint):
    tls = handshake(endpoint)
    assert tls.version() == "TLSv1.3" and tls.cipher()[0] in pki.INTERMEDIATE_TLS13_CIPHERSUITES.split(":")
    tls.close()
    with warnings.catch_warnings():  # asking for the very versions the server must refuse is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            assert refused(endpoint, version=version, ciphers="ALL:@SECLEVEL=0"), version


def test_only_the_profile_s_groups_are_accepted(endpoint):
    # TLS 1.3 alone: in TLS 1.2 the groups a client offers also bind the certificate's curve (P-256).
    for curve in ("prime256v1", "secp384r1"):
        handshake(endpoint, version=ssl.TLSVersion.TLSv1_3, curve=curve).close()
    assert refused(endpoint, version=ssl.TLSVersion.TLSv1_3, curve="secp521r1")


def s_client(address, *options: str) -> subprocess.CompletedProcess:
    assert OPENSSL is not None, "the openssl command (Debian's openssl package) is needed"
    host, port = address
    return subprocess.run([OPENSSL, "s_client", "-connect", f"{host}:{port}", "-servername", "localhost",
                           *options], input="", capture_output=True, text=True, timeout=20)


def test_openssl_s_client_sees_the_profile(endpoint):
    # The key exchange each offer ends in ("Server Temp Key"): the client's first choice among the
    # profile's groups, P-256 when it put X448 or P-521 first, a refusal when it offered only those.
    temp_keys = {
        ("-tls1_3", "-groups", "X25519"): "X25519",
        ("-tls1_3", "-groups", "P-384"): "secp384r1",
        ("-tls1_3", "-groups", "X448:P-256"): "prime256v1",
        ("-tls1_3", "-groups", "P-521:P-256"): "prime256v1",
        ("-tls1_2", "-groups", "X25519:P-256"): "X25519",
        ("-tls1_2", "-groups", "P-384:P-256"): "secp384r1",
        ("-tls1_2", "-groups", "X448:P-256"): "prime256v1",
        ("-tls1_2", "-groups", "P-521:P-256"): "prime256v1",
    }
    for options, temp_key in temp_keys.items():
        result = s_client(endpoint, *options)
        assert result.returncode == 0 and f"Server Temp Key: {temp_key}" in result.stdout.replace("ECDH, ", ""), (
            options, result.stdout, result.stderr)
    for suite in pki.INTERMEDIATE_TLS13_CIPHERSUITES.split(":"):
        result = s_client(endpoint, "-tls1_3", "-ciphersuites", suite)
        assert result.returncode == 0 and f"Cipher is {suite}" in result.stdout, (suite, result.stderr)
    refused_options = [("-tls1_3", "-groups", "X448"), ("-tls1_3", "-groups", "P-521"),
                       ("-tls1_3", "-groups", "ffdhe2048"), ("-tls1_2", "-groups", "X448"),
                       ("-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_SHA256"),
                       ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384"),
                       ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256"),
                       ("-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256")]
    for options in refused_options:
        result = s_client(endpoint, *options)
        assert result.returncode != 0 and "Cipher is (NONE)" in result.stdout, (options, result.stdout)
