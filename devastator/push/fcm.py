"""The FCM push provider: wakes Android devices through Firebase Cloud Messaging's HTTP v1 API.

``FcmProviderActor`` takes ``PushRequest`` messages and posts each one, as a
data message that says only how many messages wait (and the newest one's JSON
when previews are on), to ``{endpoint}/v1/projects/{project}/messages:send``.
It authenticates with an OAuth2 access token that Google's token endpoint
grants for a JWT signed with the service account's key (the JWT bearer
grant), and fetches a new one before the old one expires.

A few worker greenlets each keep one HTTPS connection open and send one push
at a time. A push that FCM cannot take now (429, 5xx, no connection) waits in
a timer greenlet and then queues again, so that it never holds up the others.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import random
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gevent
import gevent.lock
import gevent.queue
import jwt
import orjson
import pykka
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from gevent.pool import Group

from ..actors.messages import PushProviderQuery, tell_if_alive
from ..throttled_log import ThrottledLog
from .base import PushCounters, PushRequest, PushTokenRejected

log = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google accepts assertions that live at most one hour.
ASSERTION_LIFETIME = 3600
# A token is replaced this long before it expires (or a tenth of its life, if
# shorter), so that no push goes out with a token that expires on the way.
TOKEN_REFRESH_MARGIN = 300.0
# FCM's longest time to live (4 weeks), also the server's longest message TTL.
FCM_MAX_TTL = 2419200
PRIORITIES = ("HIGH", "NORMAL")
# FCM refuses data payloads over 4096 bytes; a preview bigger than this is
# left out so that the wake-up itself still goes through.
PREVIEW_MAX_BYTES = 3072

_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
_SERVICE_ACCOUNT_FIELDS = ("project_id", "private_key_id", "private_key", "client_email", "token_uri")


# -- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceAccount:
    """What the provider needs from Google's service-account JSON file."""

    project_id: str
    client_email: str
    private_key_id: str
    token_uri: str
    private_key: rsa.RSAPrivateKey = field(repr=False)


def load_service_account(path: str | Path) -> ServiceAccount:
    """Read and check a service-account JSON file; ValueError names the file and the problem."""
    path = Path(path)
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"FCM service account file {str(path)!r} does not exist") from None
    except OSError as error:
        raise ValueError(f"cannot read FCM service account file {str(path)!r}: {error.strerror}") from None
    except ValueError as error:
        raise ValueError(f"FCM service account file {str(path)!r} is not JSON: {error}") from None

    def problem(text: str) -> ValueError:
        return ValueError(f"FCM service account file {str(path)!r}: {text}")

    if not isinstance(document, dict):
        raise problem("expected a JSON object")
    if document.get("type") != "service_account":
        raise problem(f"expected \"type\": \"service_account\", got {document.get('type')!r}")
    for name in _SERVICE_ACCOUNT_FIELDS:
        value = document.get(name)
        if not isinstance(value, str) or not value.strip():
            raise problem(f"{name!r} is missing or empty")
    if "/" in document["project_id"]:
        raise problem(f"'project_id' is not a project id: {document['project_id']!r}")
    if not _is_https_url(document["token_uri"]):
        raise problem(f"'token_uri' must be an https:// URL, got {document['token_uri']!r}")
    try:
        key = serialization.load_pem_private_key(document["private_key"].encode(), password=None)
    except (ValueError, TypeError) as error:
        raise problem(f"'private_key' is not a PEM private key without a password: {error}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise problem("'private_key' must be an RSA key (Google signs assertions with RS256)")
    return ServiceAccount(
        project_id=document["project_id"],
        client_email=document["client_email"],
        private_key_id=document["private_key_id"],
        token_uri=document["token_uri"],
        private_key=key,
    )


@dataclass(frozen=True)
class FcmConfig:
    """How the FCM provider reaches Google. Durations are in seconds.

    Construction validates every field (without touching the files), so a
    config that exists is a valid one; ``load_service_account`` checks the file.
    """

    service_account_file: Path
    project_id: str | None = None  # default: the service account's project
    endpoint: str = "https://fcm.googleapis.com"
    token_uri: str | None = None  # default: the service account's token_uri
    ca_file: Path | None = None  # a CA to trust besides the system's (tests)
    ttl: int = FCM_MAX_TTL  # how long FCM keeps a push for a device that is off
    collapse_key: str = "devastator"  # a device offline gets only the newest wake-up
    priority: str = "HIGH"  # HIGH wakes a device from Doze at once
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 60.0  # also the longest Retry-After honoured
    max_retries: int = 5
    connections: int = 4  # keep-alive connections, each sending one push at a time
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.service_account_file, str):
            object.__setattr__(self, "service_account_file", Path(self.service_account_file))
        if isinstance(self.ca_file, str):
            object.__setattr__(self, "ca_file", Path(self.ca_file))
        if isinstance(self.priority, str):
            object.__setattr__(self, "priority", self.priority.upper())
        if isinstance(self.endpoint, str):
            object.__setattr__(self, "endpoint", self.endpoint.rstrip("/"))

        if not isinstance(self.service_account_file, Path) or not str(self.service_account_file):
            self._invalid("service_account_file", "a path")
        if self.project_id is not None and (
            not isinstance(self.project_id, str) or not self.project_id.strip() or "/" in self.project_id
        ):
            self._invalid("project_id", "a project id or None")
        if not isinstance(self.endpoint, str) or not _is_https_url(self.endpoint, path_allowed=False):
            self._invalid("endpoint", "an https:// URL without a path")
        if self.token_uri is not None and not (isinstance(self.token_uri, str) and _is_https_url(self.token_uri)):
            self._invalid("token_uri", "an https:// URL or None")
        if self.ca_file is not None and not isinstance(self.ca_file, Path):
            self._invalid("ca_file", "a path or None")
        if not _is_int(self.ttl) or not 0 <= self.ttl <= FCM_MAX_TTL:
            self._invalid("ttl", f"an integer from 0 to {FCM_MAX_TTL}")
        if not isinstance(self.collapse_key, str) or not self.collapse_key:
            self._invalid("collapse_key", "a non-empty string")
        if self.priority not in PRIORITIES:
            self._invalid("priority", " or ".join(PRIORITIES))
        if not _is_positive_number(self.retry_backoff_base):
            self._invalid("retry_backoff_base", "a number above 0")
        if not _is_positive_number(self.retry_backoff_max) or self.retry_backoff_max < self.retry_backoff_base:
            self._invalid("retry_backoff_max", "a number at least retry_backoff_base")
        if not _is_int(self.max_retries) or self.max_retries < 0:
            self._invalid("max_retries", "an integer of 0 or more")
        if not _is_int(self.connections) or self.connections < 1:
            self._invalid("connections", "an integer of 1 or more")
        if not _is_positive_number(self.timeout):
            self._invalid("timeout", "a number above 0")

    def _invalid(self, name: str, expected: str) -> None:
        raise ValueError(f"FCM setting {name!r}: expected {expected}, got {getattr(self, name)!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _is_https_url(text: str, *, path_allowed: bool = True) -> bool:
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return False
    if url.scheme != "https" or not url.hostname or url.query or url.fragment:
        return False
    return path_allowed or url.path in ("", "/")


# -- the message FCM gets -------------------------------------------------------------


def fcm_message(request: PushRequest, config: FcmConfig) -> dict[str, Any]:
    """The ``message`` of a send request: a data message, no notification text."""
    # FCM wants every data value as a string.
    data = {"pending": str(request.pending)}
    if request.preview is not None and len(request.preview) <= PREVIEW_MAX_BYTES:
        data["preview"] = request.preview.decode("utf-8", errors="replace")
    return {
        "token": request.token,
        "data": data,
        "android": {
            "priority": config.priority,
            "ttl": f"{config.ttl}s",
            "collapse_key": config.collapse_key,
        },
    }


@dataclass(frozen=True)
class _Reply:
    status: int
    retry_after: str | None
    body: bytes


@dataclass(frozen=True)
class _ErrorReply:
    """The parts of a Google API error body that decide what to do."""

    status: str  # google.rpc status name, "UNAVAILABLE"
    code: str | None  # FcmError errorCode, "UNREGISTERED"
    message: str
    fields: tuple[str, ...]  # BadRequest field violations, "message.token"

    @classmethod
    def parse(cls, body: bytes) -> _ErrorReply:
        try:
            error = orjson.loads(body).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            error = None
        if not isinstance(error, dict):
            return cls(status="", code=None, message=body[:200].decode("utf-8", errors="replace"), fields=())
        code = None
        fields: list[str] = []
        details = error.get("details")
        for detail in details if isinstance(details, list) else ():
            if not isinstance(detail, dict):
                continue
            if detail.get("@type") == _FCM_ERROR_TYPE and isinstance(detail.get("errorCode"), str):
                code = detail["errorCode"]
            elif detail.get("@type") == _BAD_REQUEST_TYPE and isinstance(detail.get("fieldViolations"), list):
                fields.extend(
                    str(violation.get("field"))
                    for violation in detail["fieldViolations"]
                    if isinstance(violation, dict)
                )
        return cls(
            status=str(error.get("status") or ""),
            code=code,
            message=str(error.get("message") or ""),
            fields=tuple(fields),
        )

    def names_the_token(self) -> bool:
        """An INVALID_ARGUMENT about the registration token, not about our payload.

        A payload error also comes as INVALID_ARGUMENT; taking it for a bad
        token would remove every device's token, so the error must point at
        the token.
        """
        if self.code != "INVALID_ARGUMENT":
            return False
        if self.fields:
            return "message.token" in self.fields
        return "registration token" in self.message.lower()

    def describe(self, http_status: int) -> str:
        name = self.code or self.status or http.client.responses.get(http_status, "")
        text = f"{http_status} {name}".rstrip()
        return f"{text}: {self.message}" if self.message else text


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), if any."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# -- the actor -------------------------------------------------------------------------------


class _TokenUnavailable(Exception):
    """No access token now; ``retry`` says whether waiting may help (an outage, not a refusal)."""

    def __init__(self, reason: str, *, retry: bool):
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


@dataclass(frozen=True, slots=True)
class _Job:
    request: PushRequest
    retries: int = 0


class _Connection:
    """One keep-alive HTTPS connection, reopened by the next request after any failure."""

    def __init__(self, url: str, context: ssl.SSLContext, timeout: float):
        parts = urllib.parse.urlsplit(url)
        self._http = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> _Reply:
        reused = self._http.sock is not None
        try:
            return self._exchange(path, body, headers)
        except (OSError, http.client.HTTPException) as error:
            # A timeout is FCM being slow, and a second one would double the wait.
            if not reused or isinstance(error, TimeoutError):
                raise
        # The server may have closed the idle connection as we reused it
        # (reset, TLS EOF, no answer): that says nothing about FCM being down,
        # so try once more on a fresh one. A second wake-up, in the rare case
        # the first went through, is harmless.
        return self._exchange(path, body, headers)

    def _exchange(self, path: str, body: bytes, headers: dict[str, str]) -> _Reply:
        try:
            if self._http.sock is None:
                self._http.connect()
                # http.client writes the headers and the body separately: without
                # this, Nagle's algorithm and delayed ACKs hold each body ~40 ms.
                self._http.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._http.request("POST", path, body=body, headers=headers)
            response = self._http.getresponse()
            data = response.read()
        except BaseException:
            self._http.close()
            raise
        return _Reply(response.status, response.getheader("Retry-After"), data)

    def close(self) -> None:
        self._http.close()


class FcmProviderActor(pykka.ThreadingActor):
    """Sends ``PushRequest`` wake-ups through FCM; answers ``PushProviderQuery`` with its state.

    Tells ``token_sink`` a ``PushTokenRejected`` for each token FCM calls
    unregistered or invalid, and counts every outcome in ``counters``.
    ``clock`` (monotonic seconds) times the access token's life.
    """

    def __init__(
        self,
        *,
        config: FcmConfig,
        token_sink: pykka.ActorRef,
        counters: PushCounters,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self._refusals = ThrottledLog(log)
        self._config = config
        self._token_sink = token_sink
        self._counters = counters
        self._clock = clock
        self._account: ServiceAccount | None = None
        self._project = config.project_id
        self._token_uri = config.token_uri
        self._send_path = ""
        self._ssl_context: ssl.SSLContext | None = None
        self._queue: gevent.queue.Queue = gevent.queue.Queue()
        self._greenlets = Group()
        self._retrying = 0
        self._access_token: str | None = None
        self._token_expires = 0.0  # clock() time
        self._token_refresh_at = 0.0  # clock() time
        self._token_lock = gevent.lock.Semaphore()
        self._refused: tuple[float, str] | None = None  # (until, why): the token endpoint said no
        self._outage: str | None = None

    # -- life cycle ------------------------------------------------------------------

    def on_start(self) -> None:
        self._account = load_service_account(self._config.service_account_file)
        self._project = self._config.project_id or self._account.project_id
        self._token_uri = self._config.token_uri or self._account.token_uri
        self._send_path = f"/v1/projects/{urllib.parse.quote(self._project, safe='')}/messages:send"
        context = ssl.create_default_context()
        if self._config.ca_file is not None:
            context.load_verify_locations(cafile=str(self._config.ca_file))
        self._ssl_context = context
        for _ in range(self._config.connections):
            self._spawn(self._work)

    def on_stop(self) -> None:
        self._shut_down()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._shut_down()

    def _shut_down(self) -> None:
        dropped = self._queue.qsize() + self._retrying
        self._greenlets.kill(block=True, timeout=5.0)
        if dropped:
            log.info("FCM provider stopped with %d pushes unsent", dropped)

    def _spawn(self, function: Callable, *args) -> gevent.Greenlet:
        greenlet = self._greenlets.spawn(function, *args)
        greenlet.link_exception(lambda g: log.error("FCM %s crashed: %r", function.__name__, g.exception))
        return greenlet

    # -- messages ----------------------------------------------------------------------

    def on_receive(self, message):
        if isinstance(message, PushRequest):
            self._queue.put(_Job(message))
        elif isinstance(message, PushProviderQuery):
            return self._state()
        return None

    def _state(self) -> dict[str, Any]:
        expires_in = None
        if self._access_token is not None:
            expires_in = round(max(0.0, self._token_expires - self._clock()), 1)
        return {
            "platform": "fcm",
            "project": self._project,
            "token_expires_in": expires_in,
            "retrying": self._retrying,
            "queued": self._queue.qsize(),
            "down": self._outage,
            **self._counters.as_dict(),
        }

    # -- sending (worker greenlets) ------------------------------------------------------

    def _work(self) -> None:
        connection = _Connection(self._config.endpoint, self._ssl_context, self._config.timeout)
        try:
            while True:
                job = self._queue.get()
                try:
                    self._send(job, connection)
                except Exception:
                    # A bug must cost one push, not a worker.
                    log.exception("FCM push to %s/%s failed", job.request.user, job.request.device)
                    self._counters.failed += 1
        finally:
            connection.close()

    def _send(self, job: _Job, connection: _Connection) -> None:
        body = orjson.dumps({"message": fcm_message(job.request, self._config)})
        refreshed = False
        while True:
            try:
                token = self._token()
            except _TokenUnavailable as unavailable:
                self._token_failed(job, unavailable)
                return
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json; charset=UTF-8",
            }
            try:
                reply = connection.post(self._send_path, body, headers)
            except (OSError, http.client.HTTPException) as error:
                self._retry(job, f"cannot reach {self._config.endpoint}: {_describe(error)}", None)
                return
            if reply.status == 401 and not refreshed:
                error = _ErrorReply.parse(reply.body)
                # THIRD_PARTY_AUTH_ERROR is about APNs or web push credentials
                # kept by Firebase, which a new access token does not change.
                if error.code != "THIRD_PARTY_AUTH_ERROR":
                    self._forget_token(token)
                    refreshed = True
                    continue
            self._settle(job, reply)
            return

    def _settle(self, job: _Job, reply: _Reply) -> None:
        request = job.request
        if reply.status == 200:
            self._up()
            self._counters.sent += 1
            return
        error = _ErrorReply.parse(reply.body)
        if reply.status == 429 or reply.status >= 500:
            self._retry(job, f"FCM answered {error.describe(reply.status)}", parse_retry_after(reply.retry_after))
            return
        self._up()
        if (reply.status == 404 and error.code == "UNREGISTERED") or (
            reply.status == 400 and error.names_the_token()
        ):
            self._counters.tokens_removed += 1
            tell_if_alive(
                self._token_sink,
                PushTokenRejected(
                    platform="fcm",
                    user=request.user,
                    device=request.device,
                    token=request.token,
                    reason=error.code or error.status,
                ),
            )
            return
        self._counters.failed += 1
        described = error.describe(reply.status)
        # Once per cause a minute: a misconfigured project fails every push alike.
        self._refusals.warning(described, "FCM refused a push to %s/%s: %s", request.user, request.device, described)

    def _token_failed(self, job: _Job, unavailable: _TokenUnavailable) -> None:
        if unavailable.retry:
            self._retry(job, unavailable.reason, None)
        else:
            # Refused credentials stay refused: waiting would only delay the failure.
            self._down(unavailable.reason)
            self._counters.failed += 1

    def _retry(self, job: _Job, why: str, retry_after: float | None) -> None:
        self._down(why)
        if job.retries >= self._config.max_retries:
            self._counters.failed += 1
            return
        base, longest = self._config.retry_backoff_base, self._config.retry_backoff_max
        # Jitter spreads the retries of a burst that failed together.
        delay = min(longest, base * 2**job.retries) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, longest))
        self._counters.retried += 1
        self._retrying += 1
        timer = gevent.spawn_later(delay, self._requeue, replace(job, retries=job.retries + 1))
        self._greenlets.add(timer)

    def _requeue(self, job: _Job) -> None:
        self._retrying -= 1
        self._queue.put(job)

    def _down(self, why: str) -> None:
        if self._outage is None:
            log.warning("FCM provider down: %s", why)
        self._outage = why

    def _up(self) -> None:
        if self._outage is not None:
            log.warning("FCM provider up again (was down: %s)", self._outage)
            self._outage = None

    # -- the OAuth2 access token -------------------------------------------------------------

    def _token(self) -> str:
        if self._access_token is not None and self._clock() < self._token_refresh_at:
            return self._access_token
        # One fetch at a time: the other workers wait for it and use its token.
        with self._token_lock:
            if self._access_token is None or self._clock() >= self._token_refresh_at:
                self._fetch_token()
            return self._access_token

    def _forget_token(self, token: str) -> None:
        # Another worker may already have replaced the token FCM turned down.
        if self._access_token == token:
            self._access_token = None

    def _fetch_token(self) -> None:
        now = self._clock()
        if self._refused is not None and now < self._refused[0]:
            raise _TokenUnavailable(self._refused[1], retry=False)
        account = self._account
        issued = int(time.time())
        assertion = jwt.encode(
            {
                "iss": account.client_email,
                "scope": FCM_SCOPE,
                "aud": self._token_uri,
                "iat": issued,
                "exp": issued + ASSERTION_LIFETIME,
            },
            account.private_key,
            algorithm="RS256",
            headers={"kid": account.private_key_id},
        )
        form = urllib.parse.urlencode({"grant_type": JWT_BEARER_GRANT, "assertion": assertion}).encode()
        url = urllib.parse.urlsplit(self._token_uri)
        connection = _Connection(self._token_uri, self._ssl_context, self._config.timeout)
        try:
            reply = connection.post(
                url.path or "/", form, {"Content-Type": "application/x-www-form-urlencoded"}
            )
        except (OSError, http.client.HTTPException) as error:
            raise _TokenUnavailable(
                f"cannot reach the token endpoint {self._token_uri}: {_describe(error)}", retry=True
            ) from None
        finally:
            connection.close()

        if reply.status == 429 or reply.status >= 500:
            raise _TokenUnavailable(f"token endpoint answered {reply.status}", retry=True)
        try:
            answer = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            answer = None
        if reply.status != 200:
            why = f"token endpoint refused the service account {account.client_email}: {reply.status}"
            if isinstance(answer, dict):
                why += f" {answer.get('error', '')}: {answer.get('error_description', '')}"
            # Ask again only after a while: a bad key is not fixed by asking at push rate.
            self._refused = (now + self._config.retry_backoff_max, why)
            raise _TokenUnavailable(why, retry=False)
        token = answer.get("access_token") if isinstance(answer, dict) else None
        expires_in = answer.get("expires_in") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token or not _is_positive_number(expires_in):
            raise _TokenUnavailable("token endpoint answered without an access token", retry=True)
        self._refused = None
        self._access_token = token
        self._token_expires = now + expires_in
        self._token_refresh_at = self._token_expires - min(TOKEN_REFRESH_MARGIN, expires_in / 10)


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
