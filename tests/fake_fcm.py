"""A fake Google for push tests: an OAuth2 token endpoint and the FCM HTTP v1 send API.

``FakeFcm`` serves both over real TLS (its own CA, made in a temporary
directory) on 127.0.0.1 and an ephemeral port, and writes a service-account
file whose key it trusts. The token endpoint checks the JWT bearer assertion
as Google does (RS256 signature, kid, iss, aud, scope, lifetime); the send
endpoint checks the access token and the message's shape, and answers with
Google's error bodies when a test asks for an error. Tests wait for what the
fake saw with ``wait_for``, which wakes on every request, never sleeps.

Not a conftest.py: test modules import ``FakeFcm`` and the ``fake_fcm`` and
``fake_fcm_key`` fixtures.
"""
from __future__ import annotations

import collections
import json
import logging
import re
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import gevent.event
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from local_ca import LocalCa, pem_key

# Google's rules, written out here rather than imported from the code under test.
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 3600
MAX_TTL_SECONDS = 2419200
MAX_DATA_BYTES = 4096
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"

WAIT = 5.0  # seconds: a bound for a test that fails, never a pause

_SEND_PATH = re.compile(r"/v1/projects/([^/]+)/messages:send")
_TTL = re.compile(r"(\d+)(\.\d{1,9})?s")
_MESSAGE_FIELDS = {
    "name", "data", "notification", "android", "webpush", "apns", "fcm_options", "token", "topic", "condition"
}
_ANDROID_FIELDS = {
    "collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification", "fcm_options",
    "direct_boot_ok",
}

log = logging.getLogger("fake_fcm")


def write_service_account(
    path: Path,
    *,
    project_id: str,
    token_uri: str,
    client_email: str | None = None,
    private_key_id: str | None = None,
    key: rsa.RSAPrivateKey | None = None,
) -> rsa.RSAPrivateKey:
    """Write a service-account JSON file as Google's console makes it; return its key."""
    if key is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = pem_key(key).decode()
    document = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": private_key_id or secrets.token_hex(20),
        "private_key": pem,
        "client_email": client_email or f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com",
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    path.write_text(json.dumps(document, indent=2))
    return key


def error_body(
    code: int,
    status: str,
    message: str,
    *,
    fcm_error: str | None = None,
    fields: Iterable[str] = (),
) -> dict:
    """A Google API error body, with FcmError and BadRequest details when given."""
    details: list[dict] = []
    if fcm_error is not None:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": fcm_error})
    fields = list(fields)
    if fields:
        details.append(
            {
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{"field": name, "description": message} for name in fields],
            }
        )
    error: dict = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


# What FCM answers when it cannot take a message now.
_OUTAGE_BODIES = {
    429: error_body(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", fcm_error="QUOTA_EXCEEDED"),
    500: error_body(500, "INTERNAL", "Internal error encountered.", fcm_error="INTERNAL"),
    503: error_body(503, "UNAVAILABLE", "The service is currently unavailable.", fcm_error="UNAVAILABLE"),
}


class _Server(WSGIServer):
    def handle(self, sock, address):
        # pywsgi writes a response in pieces: without this each waits ~40 ms
        # for the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super().handle(sock, address)


@dataclass(frozen=True)
class SeenRequest:
    """One request the fake answered."""

    at: float  # time.monotonic()
    path: str
    status: int


class FakeFcm:
    """Google's token endpoint and FCM's send API, on one HTTPS server."""

    def __init__(
        self,
        directory: Path,
        *,
        project_id: str = "devastator-test",
        expires_in: int = 3600,
        key: rsa.RSAPrivateKey | None = None,
    ):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.project_id = project_id
        self.expires_in = expires_in  # what the token endpoint grants, in seconds
        self.client_email = f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com"
        self.private_key_id = secrets.token_hex(20)
        self.service_account_file = directory / "service-account.json"
        self.ca_file = directory / "ca.pem"
        self.port = 0
        self._ssl_context: ssl.SSLContext | None = None
        self._key = key  # the service account's; a new one when None
        self._account_written = False
        self._server: _Server | None = None

        # What tests read: messages accepted, token grants, every answer.
        self.accepted: list[dict] = []
        self.token_requests = 0
        self.seen: list[SeenRequest] = []
        # What tests set: how the fake answers.
        self.unregistered: set[str] = set()
        self.invalid: set[str] = set()
        self.other_sender: set[str] = set()
        self.accept_tokens = True
        self._issued: dict[str, float] = {}  # access token -> expiry, time.monotonic()
        self._next: collections.deque[tuple[int, dict, dict[str, str]]] = collections.deque()
        self._changed = gevent.event.Event()

    # -- running -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.endpoint}/token"

    def start(self) -> None:
        """Listen (again on the same port after ``stop``); the first start makes the files."""
        if self._ssl_context is None:
            ca = LocalCa(f"Fake Google CA {secrets.token_hex(4)}")
            ca.write(self.ca_file)
            self._ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl_context.load_cert_chain(*ca.write_server(self.directory, "fcm.googleapis.test"))
        self._server = _Server(
            ("127.0.0.1", self.port),
            self._app,
            spawn=Pool(64),
            ssl_context=self._ssl_context,
            log=None,
            error_log=log,
        )
        self._server.start()
        if not self.port:
            self.port = self._server.server_port
        if not self._account_written:
            self._key = write_service_account(
                self.service_account_file,
                project_id=self.project_id,
                token_uri=self.token_uri,
                client_email=self.client_email,
                private_key_id=self.private_key_id,
                key=self._key,
            )
            self._account_written = True

    def stop(self) -> None:
        """Close the listener and every open connection: clients see the server gone."""
        if self._server is not None:
            self._server.stop(timeout=0)
            self._server = None

    # -- what tests set ----------------------------------------------------------------

    def fail_next(self, count: int = 1, status: int = 503, retry_after: str | None = None) -> None:
        """Answer the next ``count`` sends (with a valid access token) with an outage error."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        for _ in range(count):
            self._next.append((status, _OUTAGE_BODIES[status], headers))

    def respond_next(self, status: int, body: dict) -> None:
        """Answer the next send (with a valid access token) with this error."""
        self._next.append((status, body, {}))

    def expire_access_tokens(self) -> None:
        """Every access token granted so far expires now."""
        for token in self._issued:
            self._issued[token] = 0.0

    # -- what tests wait for -------------------------------------------------------------

    def wait_for(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        """Return once ``condition()`` holds, checking after each request the fake answers."""
        deadline = time.monotonic() + timeout
        while not condition():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._changed.wait(remaining):
                if condition():
                    return
                pytest.fail(f"the fake FCM did not see what the test waited for within {timeout} s")

    def statuses(self, path_part: str = "messages:send") -> list[int]:
        return [seen.status for seen in self.seen if path_part in seen.path]

    # -- serving --------------------------------------------------------------------------

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        body = environ["wsgi.input"].read()
        if environ["REQUEST_METHOD"] != "POST":
            status, answer, headers = 405, error_body(405, "METHOD_NOT_ALLOWED", "POST only"), {}
        elif path == "/token":
            status, answer, headers = self._grant(body)
        elif (match := _SEND_PATH.fullmatch(path)) is not None:
            status, answer, headers = self._send(match.group(1), environ.get("HTTP_AUTHORIZATION", ""), body)
        else:
            status, answer, headers = 404, error_body(404, "NOT_FOUND", f"no such method: {path}"), {}
        payload = orjson.dumps(answer)
        start_response(
            f"{status} {_reason(status)}",
            [
                ("Content-Type", "application/json; charset=UTF-8"),
                ("Content-Length", str(len(payload))),
                *headers.items(),
            ],
        )
        self.seen.append(SeenRequest(time.monotonic(), path, status))
        self._changed.set()
        return [payload]

    def _grant(self, body: bytes) -> tuple[int, dict, dict]:
        """Google's token endpoint: the JWT bearer grant of a service account."""
        self.token_requests += 1
        form = urllib.parse.parse_qs(body.decode("ascii", errors="replace"))
        grant_type = form.get("grant_type", [""])[0]
        assertions = form.get("assertion", [])
        if grant_type != JWT_BEARER_GRANT:
            return 400, _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}"), {}
        if len(assertions) != 1:
            return 400, _oauth_error("invalid_request", "Missing required parameter: assertion"), {}
        try:
            header = jwt.get_unverified_header(assertions[0])
            if header.get("alg") != "RS256" or header.get("kid") != self.private_key_id:
                raise jwt.InvalidTokenError(f"unexpected header {header!r}")
            claims = jwt.decode(
                assertions[0],
                self._key.public_key(),
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=self.client_email,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
            if claims["exp"] - claims["iat"] > MAX_ASSERTION_LIFETIME:
                raise jwt.InvalidTokenError("assertion lives longer than an hour")
            if FCM_SCOPE not in str(claims["scope"]).split():
                return 400, _oauth_error("invalid_scope", "Invalid OAuth scope."), {}
        except jwt.InvalidTokenError as error:
            return 400, _oauth_error("invalid_grant", f"Invalid JWT: {error}"), {}
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self._issued[token] = time.monotonic() + self.expires_in
        return 200, {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}, {}

    def _send(self, project: str, authorization: str, body: bytes) -> tuple[int, dict, dict]:
        """FCM's projects.messages.send."""
        token = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else ""
        expiry = self._issued.get(token)
        if not self.accept_tokens or expiry is None or expiry <= time.monotonic():
            return 401, error_body(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token,"
                " login cookie or other valid authentication credential.",
            ), {}
        if project != self.project_id:
            return 403, error_body(
                403, "PERMISSION_DENIED", f"Permission 'cloudmessaging.messages.create' denied on project {project}"
            ), {}
        if self._next:
            return self._next.popleft()
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            return 400, error_body(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {error}"), {}
        problem = _shape_problem(request)
        if problem is not None:
            field, text = problem
            return 400, error_body(400, "INVALID_ARGUMENT", text, fields=[field]), {}
        message = request["message"]
        target = message["token"]
        if target in self.unregistered:
            return 404, error_body(
                404, "NOT_FOUND", "Requested entity was not found.", fcm_error="UNREGISTERED"
            ), {}
        if target in self.invalid:
            return 400, error_body(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                fcm_error="INVALID_ARGUMENT",
            ), {}
        if target in self.other_sender:
            return 403, error_body(
                403, "PERMISSION_DENIED", "SenderId mismatch", fcm_error="SENDER_ID_MISMATCH"
            ), {}
        self.accepted.append(message)
        return 200, {"name": f"projects/{project}/messages/0:{secrets.randbelow(10**16)}"}, {}


def _shape_problem(request: object) -> tuple[str, str] | None:
    """What FCM would reject in a send request for a token, as (field, description)."""
    if not isinstance(request, dict) or set(request) - {"message", "validate_only"}:
        return "", "Invalid JSON payload received. Unknown name at the top level."
    message = request.get("message")
    if not isinstance(message, dict):
        return "message", "Invalid JSON payload received. 'message' must be an object."
    for name in message:
        if name not in _MESSAGE_FIELDS:
            return "message", f'Invalid JSON payload received. Unknown name "{name}" at \'message\'.'
    targets = sum(name in message for name in ("token", "topic", "condition"))
    if targets != 1 or not isinstance(message.get("token"), str) or not message["token"]:
        return "message.token", "Exactly one of token, topic or condition is required; this fake wants a token."
    data = message.get("data", {})
    if not isinstance(data, dict):
        return "message.data", "Invalid value at 'message.data'"
    size = 0
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            field = f"message.data[{index}].value"
            return field, f"Invalid value at '{field}' (TYPE_STRING), {value!r}"
        if key in ("from", "gcm", "message_type") or key.startswith("google"):
            return f"message.data[{index}].key", f"Invalid data key: {key}"
        size += len(key.encode()) + len(value.encode())
    if size > MAX_DATA_BYTES:
        return "message.data", "Message is too big"
    android = message.get("android", {})
    if not isinstance(android, dict):
        return "message.android", "Invalid value at 'message.android'"
    for name in android:
        if name not in _ANDROID_FIELDS:
            return "message.android", f'Invalid JSON payload received. Unknown name "{name}" at \'message.android\'.'
    if "priority" in android and android["priority"] not in ("NORMAL", "HIGH"):
        return "message.android.priority", f"Invalid value at 'message.android.priority', {android['priority']!r}"
    if "ttl" in android:
        ttl = android["ttl"]
        match = _TTL.fullmatch(ttl) if isinstance(ttl, str) else None
        if match is None or int(match.group(1)) > MAX_TTL_SECONDS:
            return "message.android.ttl", f"Invalid value at 'message.android.ttl', {ttl!r}"
    if "collapse_key" in android and not isinstance(android["collapse_key"], str):
        return "message.android.collapse_key", "Invalid value at 'message.android.collapse_key'"
    return None


def _oauth_error(error: str, description: str) -> dict:
    """Google's token endpoint answers errors as RFC 6749 says."""
    return {"error": error, "error_description": description}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


@pytest.fixture(scope="session")
def fake_fcm_key() -> rsa.RSAPrivateKey:
    """One service-account key for the session: making RSA keys is slow."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def fake_fcm(tmp_path: Path, fake_fcm_key: rsa.RSAPrivateKey):
    """A started FakeFcm; stopped after the test."""
    fake = FakeFcm(tmp_path / "fake-fcm", key=fake_fcm_key)
    fake.start()
    yield fake
    fake.stop()
