"""A fake APNs for tests: Apple's HTTP/2 provider API over real TLS, on an ephemeral port.

``FakeApns`` serves ``POST /3/device/<token>`` with the ``h2`` library on a
gevent StreamServer, behind its own CA and server certificate (made in a temp
directory), and checks each request the way Apple documents it: method, path,
``apns-*`` headers, a JSON body within 4096 bytes, and authentication, either
a provider token (``authorization: bearer <JWT>``, ES256, ``kid`` = key id,
``iss`` = team id, ``iat`` under an hour old, verified against the key whose
.p8 file it writes) or a client certificate (the TLS handshake requires one
signed by its CA). With a provider token it allows one stream until it has
seen a valid token, as Apple does.

Accepted pushes are recorded for assertions; tests can mark tokens
unregistered (410) or bad (400 BadDeviceToken) and make the next requests fail
with 500/503. What the client should never do (a malformed header, a body too
large) is answered as Apple would and also listed in ``violations``, which the
fixtures check is empty after each test.
"""
from __future__ import annotations

import json
import re
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import gevent.queue
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gevent.pool import Pool
from gevent.server import StreamServer

from local_ca import CLIENT_AUTH, LocalCa, pem_key

TOPIC = "com.example.devastator"
KEY_ID = "KEY1234567"
TEAM_ID = "TEAM123456"
CERT_PASSWORD = "fake-apns-secret"
WAIT = 5.0  # seconds: a bound for a test that fails, never a pause

MAX_PAYLOAD_BYTES = 4096
MAX_COLLAPSE_ID_BYTES = 64
TOKEN_MAX_AGE = 3600  # Apple refuses provider tokens older than an hour
PUSH_TYPES = {"alert", "background", "voip", "complication", "fileprovider", "mdm", "location", "liveactivity"}
STREAMS_BEFORE_AUTH = 1
STREAMS_AFTER_AUTH = 1000
FAILURE_REASONS = {500: "InternalServerError", 503: "ServiceUnavailable", 429: "TooManyRequests"}

_PATH = re.compile(r"/3/device/([0-9a-fA-F]+)")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class AcceptedPush:
    token: str
    headers: dict[str, str]  # the request's apns-* and other regular headers
    payload: dict
    apns_id: str


@dataclass(frozen=True)
class Answered:
    """Any request the fake answered, accepted or not."""

    path: str
    status: int
    reason: str | None


def write_p8_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 signing key in Apple's .p8 form (PKCS#8 PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(pem_key(key))
    return key


class FakeApns:
    """An APNs server for one test; ``start()``, ``stop()`` and start again on the same port."""

    def __init__(self, directory: Path, *, auth: Literal["token", "certificate"] = "token",
                 topic: str = TOPIC, key_id: str = KEY_ID, team_id: str = TEAM_ID) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.auth = auth
        self.topic = topic
        self.key_id = key_id
        self.team_id = team_id
        self.host = "localhost"
        self.port = 0  # known after the first start()

        ca = LocalCa("Fake APNs test CA")
        self.ca_file = ca.write(directory / "ca.pem")
        server_files = ca.write_server(directory, "localhost")

        self.key_file: Path | None = None
        self.cert_file: Path | None = None
        self.cert_password: str | None = None
        if auth == "token":
            self.key_file = directory / f"AuthKey_{key_id}.p8"
            self._verify_key = write_p8_key(self.key_file).public_key()
        else:
            # Apple's push certificates name the topic in the UID attribute.
            client_key, client_cert = ca.issue(
                x509.Name([x509.NameAttribute(NameOID.USER_ID, topic),
                           x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {topic}")]),
                usage=CLIENT_AUTH, names=(),
            )
            self.cert_file = directory / "client.pem"
            self.cert_password = CERT_PASSWORD
            self.cert_file.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM)
                                       + pem_key(client_key, CERT_PASSWORD))

        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._tls.load_cert_chain(*server_files)
        self._tls.set_alpn_protocols(["h2"])
        if auth == "certificate":
            self._tls.verify_mode = ssl.CERT_REQUIRED
            self._tls.load_verify_locations(cafile=self.ca_file)

        self.accepted: list[AcceptedPush] = []
        self.answered: list[Answered] = []
        self.violations: list[str] = []
        self.connections = 0  # TLS connections that reached HTTP/2
        self._arrivals: gevent.queue.Queue = gevent.queue.Queue()
        self._unregistered: dict[str, int] = {}
        self._bad: set[str] = set()
        self._failures: deque[int] = deque()
        self._server: StreamServer | None = None

    # -- control --------------------------------------------------------------------

    def start(self) -> None:
        self._server = StreamServer(("127.0.0.1", self.port), self._handle, spawn=Pool(100))
        self._server.start()
        self.port = self._server.address[1]

    def stop(self) -> None:
        """Close the listener and every connection, as a crashed server would."""
        if self._server is not None:
            self._server.stop(timeout=0)
            self._server = None

    def unregister(self, token: str) -> None:
        """From now on, pushes to ``token`` get 410 Unregistered."""
        self._unregistered[token.lower()] = int(time.time() * 1000)

    def mark_bad(self, token: str) -> None:
        """From now on, pushes to ``token`` get 400 BadDeviceToken."""
        self._bad.add(token.lower())

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """Answer the next ``count`` valid requests with ``status`` (500, 503 or 429)."""
        self._failures.extend([status] * count)

    def next_push(self, timeout: float = WAIT) -> AcceptedPush:
        """The next push accepted (in arrival order), waiting up to ``timeout``."""
        try:
            return self._arrivals.get(timeout=timeout)
        except gevent.queue.Empty:
            raise AssertionError(f"the fake APNs accepted no push within {timeout} s "
                                 f"(answered: {self.answered})") from None

    # -- serving ----------------------------------------------------------------------

    def _handle(self, sock, address) -> None:
        try:
            tls = self._tls.wrap_socket(sock, server_side=True)
        except OSError:  # no client certificate, a client that does not trust us
            sock.close()
            return
        try:
            if tls.selected_alpn_protocol() != "h2":
                self.violations.append(f"ALPN chose {tls.selected_alpn_protocol()!r}, not h2")
                return
            self.connections += 1
            self._serve(tls)
        except OSError:  # the client went away
            return
        finally:
            tls.close()

    def _serve(self, tls) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        authenticated = self.auth == "certificate"  # the handshake already checked the certificate
        if not authenticated:
            conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: STREAMS_BEFORE_AUTH})
        tls.sendall(conn.data_to_send())
        requests: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        while True:
            data = tls.recv(65536)
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as error:
                self.violations.append(f"HTTP/2 protocol error: {error!r}")
                tls.sendall(conn.data_to_send())  # h2 queued the GOAWAY
                return
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = (list(event.headers), bytearray())
                elif isinstance(event, h2.events.DataReceived):
                    requests[event.stream_id][1].extend(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    headers, body = requests.pop(event.stream_id)
                    status, reason, apns_id, valid_token = self._answer(headers, bytes(body))
                    if valid_token and not authenticated:
                        authenticated = True
                        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: STREAMS_AFTER_AUTH})
                    self._respond(conn, event.stream_id, status, reason, apns_id, headers)
                elif isinstance(event, h2.events.StreamReset):
                    requests.pop(event.stream_id, None)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    tls.sendall(conn.data_to_send())
                    return
            tls.sendall(conn.data_to_send())

    def _respond(self, conn, stream_id: int, status: int, reason: str | None, apns_id: str, headers) -> None:
        path = dict(headers).get(":path", "")
        self.answered.append(Answered(path, status, reason))
        response = [(":status", str(status)), ("apns-id", apns_id)]
        if reason is None:
            conn.send_headers(stream_id, response, end_stream=True)
            return
        body = {"reason": reason}
        if status == 410:
            match = _PATH.fullmatch(path)
            body["timestamp"] = self._unregistered.get(match.group(1).lower() if match else "", 0)
        data = json.dumps(body).encode()
        conn.send_headers(stream_id, response + [("content-type", "application/json"),
                                                 ("content-length", str(len(data)))])
        conn.send_data(stream_id, data, end_stream=True)

    def _answer(self, header_list: list[tuple[str, str]], body: bytes) -> tuple[int, str | None, str, bool]:
        """(status, reason or None, apns-id, whether a valid provider token came) for one request."""
        names = [name for name, _ in header_list]
        headers = dict(header_list)
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        if len(names) != len(set(names)):
            return self._violation(400, "DuplicateHeaders", apns_id, f"repeated headers: {names}")
        if headers.get(":method") != "POST":
            return self._violation(405, "MethodNotAllowed", apns_id, f"method {headers.get(':method')!r}")
        path = headers.get(":path", "")
        match = _PATH.fullmatch(path)
        if path == "/3/device/" or path == "/3/device":
            return self._violation(400, "MissingDeviceToken", apns_id, "no device token in the path")
        if match is None:
            return self._violation(404, "BadPath", apns_id, f"path {path!r}")
        token = match.group(1).lower()

        valid_token = False
        if self.auth == "token":
            problem = self._check_provider_token(headers.get("authorization"))
            if problem is not None:
                return 403, problem, apns_id, False
            valid_token = True

        if "apns-id" in headers and not _UUID.fullmatch(headers["apns-id"]):
            return self._violation(400, "BadMessageId", apns_id, f"apns-id {headers['apns-id']!r}")
        topic = headers.get("apns-topic")
        if topic is None:
            return self._violation(400, "MissingTopic", apns_id, "no apns-topic")
        if topic != self.topic:
            return 400, "TopicDisallowed", apns_id, valid_token
        push_type = headers.get("apns-push-type")
        if push_type not in PUSH_TYPES:
            return self._violation(400, "InvalidPushType", apns_id, f"apns-push-type {push_type!r}")
        priority = headers.get("apns-priority", "10")  # Apple's default when the header is left out
        if priority not in ("10", "5", "1"):
            return self._violation(400, "BadPriority", apns_id, f"apns-priority {priority!r}")
        expiration = headers.get("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return self._violation(400, "BadExpirationDate", apns_id, f"apns-expiration {expiration!r}")
        collapse_id = headers.get("apns-collapse-id")
        if collapse_id is not None and len(collapse_id.encode()) > MAX_COLLAPSE_ID_BYTES:
            return self._violation(400, "BadCollapseId", apns_id, f"apns-collapse-id {collapse_id!r}")
        if not body:
            return self._violation(400, "PayloadEmpty", apns_id, "empty body")
        if len(body) > MAX_PAYLOAD_BYTES:
            return self._violation(413, "PayloadTooLarge", apns_id, f"{len(body)} bytes")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return self._violation(400, "PayloadEmpty", apns_id, f"not a JSON object with aps: {body[:200]!r}")

        if self._failures:
            status = self._failures.popleft()
            return status, FAILURE_REASONS[status], apns_id, valid_token
        if token in self._unregistered:
            return 410, "Unregistered", apns_id, valid_token
        if token in self._bad:
            return 400, "BadDeviceToken", apns_id, valid_token

        regular = {name: value for name, value in header_list if not name.startswith(":")}
        regular.pop("authorization", None)
        push = AcceptedPush(token=token, headers=regular, payload=payload, apns_id=apns_id)
        self.accepted.append(push)
        self._arrivals.put(push)
        return 200, None, apns_id, valid_token

    def _violation(self, status: int, reason: str, apns_id: str, what: str) -> tuple[int, str, str, bool]:
        self.violations.append(f"{reason}: {what}")
        return status, reason, apns_id, False

    def _check_provider_token(self, authorization: str | None) -> str | None:
        """None if the provider token is good, else Apple's reason for refusing it."""
        if not authorization:
            return "MissingProviderToken"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "MissingProviderToken"
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self._verify_key, algorithms=["ES256"],
                                options={"require": ["iss", "iat"]})
        except jwt.InvalidTokenError:
            return "InvalidProviderToken"
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return "InvalidProviderToken"
        if claims["iat"] < time.time() - TOKEN_MAX_AGE:
            return "ExpiredProviderToken"
        return None


def _running(directory: Path, auth: Literal["token", "certificate"]) -> Iterator[FakeApns]:
    fake = FakeApns(directory, auth=auth)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.violations == [], f"the client broke APNs rules: {fake.violations}"


@pytest.fixture
def fake_apns(tmp_path: Path) -> Iterator[FakeApns]:
    """A running fake APNs taking provider tokens signed with ``fake_apns.key_file``."""
    yield from _running(tmp_path / "fake-apns-token", "token")


@pytest.fixture
def fake_apns_cert(tmp_path: Path) -> Iterator[FakeApns]:
    """A running fake APNs requiring ``fake_apns_cert.cert_file`` (with ``cert_password``)."""
    yield from _running(tmp_path / "fake-apns-cert", "certificate")
