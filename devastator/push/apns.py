"""The APNs push provider: wakes iOS devices through Apple's HTTP/2 provider API.

``ApnsProviderActor`` takes ``PushRequest`` messages and sends each one as a
notification through an ``apns2`` client over one HTTP/2 connection, either
token-authenticated (a .p8 signing key, its key id and the team id) or
certificate-authenticated. ``ApnsConfig`` says how.

Every push ends in exactly one of the counters ``sent``, ``failed`` or
``tokens_removed``; ``retried`` counts the extra attempts on the way. A token
that Apple rejects (Unregistered, ExpiredToken, BadDeviceToken,
DeviceTokenNotForTopic) is told to the ``token_sink`` and counted only as
``tokens_removed``: the push did not fail for a reason an operator must fix,
the device is just gone. Transient failures (no connection, timeouts, 429,
500, 503) are retried with exponential backoff up to ``max_retries`` times,
then counted as ``failed``; other refusals (BadTopic, InvalidProviderToken,
payload problems...) are counted as ``failed`` at once.

Requests run on greenlets of the actor's own group, at most as many at a time
as Apple allows streams on the connection, and report back to the actor with a
message, so that only the actor touches its state and a slow or retried push
never holds up the others.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import gevent
import pykka
from apns2.client import APNsClient, NotificationPriority, NotificationType
from apns2.credentials import CertificateCredentials, Credentials, TokenCredentials
from apns2.payload import MAX_PAYLOAD_SIZE, Payload, PayloadAlert
from gevent.pool import Group
from hyper import HTTP20Connection
from hyper.tls import init_context

from ..actors.messages import PushProviderQuery, tell_if_alive
from .base import PushCounters, PushRequest, PushTokenRejected

log = logging.getLogger(__name__)

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
DEFAULT_PORT = 443

PUSH_TYPES = ("alert", "background")
PRIORITIES = (10, 5)
MAX_COLLAPSE_ID_BYTES = 64  # Apple's limit on apns-collapse-id
MAX_RETRY_DELAY = 300.0  # seconds: the backoff stops doubling here
CUSTOM_KEY = "devastator"  # the payload's key for what the app reads: pending count, preview

# Apple's key ids and team ids are 10 uppercase letters and digits.
_APPLE_ID = re.compile(r"[A-Z0-9]{10}")
# A device token as APNs takes it in the path: hex, of a length Apple may change.
_DEVICE_TOKEN = re.compile(r"(?:[0-9a-fA-F]{2}){8,200}")

# The token is no good any more: tell the token sink to remove it.
TOKEN_REJECTED_REASONS = frozenset({"Unregistered", "ExpiredToken", "BadDeviceToken", "DeviceTokenNotForTopic"})
# APNs itself is in trouble: the provider is down until a push gets through.
SERVER_TROUBLE_REASONS = frozenset({"InternalServerError", "ServiceUnavailable", "Shutdown"})
# Worth trying again later; everything not listed here or above is final.
RETRY_REASONS = SERVER_TROUBLE_REASONS | {
    "TooManyRequests", "IdleTimeout", "ExpiredProviderToken", "TooManyProviderTokenUpdates",
}
# After these the connection is finished: the next attempt opens a new one.
RECONNECT_REASONS = frozenset({"ServiceUnavailable", "Shutdown", "IdleTimeout"})


def _invalid(setting: str, problem: str) -> ValueError:
    return ValueError(f"APNs setting {setting!r}: {problem}")


@dataclass(frozen=True)
class ApnsConfig:
    """How to reach APNs and what to send; construction validates every field.

    Exactly one kind of credentials: ``key_file`` with ``key_id`` and
    ``team_id`` (token authentication, the .p8 key from the developer
    account), or ``cert_file`` (certificate authentication: one PEM file with
    the certificate and its private key, encrypted with ``cert_password`` if
    set). ``host`` and ``port`` override the Apple server that ``use_sandbox``
    picks; ``ca_file`` adds a CA to trust (tests, an inspecting proxy).
    """

    topic: str  # the app's bundle id
    key_file: Path | None = None
    key_id: str | None = None
    team_id: str | None = None
    cert_file: Path | None = None
    cert_password: str | None = None
    use_sandbox: bool = False
    host: str | None = None
    port: int = DEFAULT_PORT
    ca_file: Path | None = None
    push_type: str = "alert"  # "alert": a generic alert and badge; "background": a silent wake-up
    priority: int | None = None  # None: 10 for alert, 5 for background (Apple requires 5 there)
    expiration: int = 7 * 86400  # seconds Apple keeps trying to deliver; 0: once, never stored
    collapse_id: str | None = "devastator"  # a newer push replaces the one the user has not seen
    alert_loc_key: str = "DEVASTATOR_NEW_MESSAGES"  # the app's localized text, given the count
    sound: str | None = "default"
    timeout: float = 10.0  # seconds for one request, connecting included
    max_retries: int = 3
    retry_delay: float = 1.0  # seconds before the first retry; doubles for each next one
    max_in_flight: int = 100  # requests at once, also bounded by what APNs allows

    def __post_init__(self) -> None:
        for name in ("key_file", "cert_file", "ca_file"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):
                object.__setattr__(self, name, Path(value))
        if self.priority is None:
            object.__setattr__(self, "priority", 5 if self.push_type == "background" else 10)
        self._validate_credentials()
        self._validate_delivery()
        self._validate_connection()

    def _validate_credentials(self) -> None:
        if self.key_file is not None and self.cert_file is not None:
            raise _invalid("cert_file", "set either key_file (token authentication) "
                                        "or cert_file (certificate authentication), not both")
        if self.key_file is None and self.cert_file is None:
            raise _invalid("key_file", "set key_file, key_id and team_id (token authentication) "
                                       "or cert_file (certificate authentication)")
        if self.key_file is not None:
            for name in ("key_id", "team_id"):
                value = getattr(self, name)
                if value is None:
                    raise _invalid(name, "required with key_file (token authentication)")
                if not isinstance(value, str) or not _APPLE_ID.fullmatch(value):
                    raise _invalid(name, f"expected Apple's 10 letters and digits, got {value!r}")
            if self.cert_password is not None:
                raise _invalid("cert_password", "only for certificate authentication (cert_file)")
        else:
            for name in ("key_id", "team_id"):
                if getattr(self, name) is not None:
                    raise _invalid(name, "only for token authentication (key_file)")

    def _validate_delivery(self) -> None:
        if not isinstance(self.topic, str) or not self.topic or any(c.isspace() for c in self.topic):
            raise _invalid("topic", f"expected the app's bundle id, got {self.topic!r}")
        if self.push_type not in PUSH_TYPES:
            raise _invalid("push_type", f"expected one of {', '.join(PUSH_TYPES)}, got {self.push_type!r}")
        if self.priority not in PRIORITIES:
            raise _invalid("priority", f"expected 10 (now) or 5 (when the device sees fit), got {self.priority!r}")
        if self.push_type == "background" and self.priority != 5:
            raise _invalid("priority", "background pushes must have priority 5 (Apple's rule)")
        if not isinstance(self.expiration, int) or isinstance(self.expiration, bool) or self.expiration < 0:
            raise _invalid("expiration", f"expected whole seconds >= 0, got {self.expiration!r}")
        if self.collapse_id is not None:
            if not self.collapse_id or len(self.collapse_id.encode()) > MAX_COLLAPSE_ID_BYTES:
                raise _invalid("collapse_id", f"expected 1 to {MAX_COLLAPSE_ID_BYTES} bytes or None, "
                                              f"got {self.collapse_id!r}")
        if not self.alert_loc_key:
            raise _invalid("alert_loc_key", "must not be empty")

    def _validate_connection(self) -> None:
        if self.host is not None and (not self.host or any(c.isspace() or c in "/:" for c in self.host)):
            raise _invalid("host", f"expected a host name or address, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise _invalid("port", f"expected 1 to 65535, got {self.port!r}")
        if not self.timeout > 0:
            raise _invalid("timeout", f"expected seconds > 0, got {self.timeout!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise _invalid("max_retries", f"expected a count >= 0, got {self.max_retries!r}")
        if not self.retry_delay > 0:
            raise _invalid("retry_delay", f"expected seconds > 0, got {self.retry_delay!r}")
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise _invalid("max_in_flight", f"expected a count >= 1, got {self.max_in_flight!r}")

    @property
    def auth(self) -> Literal["token", "certificate"]:
        return "token" if self.key_file is not None else "certificate"

    @property
    def address(self) -> tuple[str, int]:
        """The APNs server to connect to: the override, or Apple's production or sandbox host."""
        if self.host is not None:
            return self.host, self.port
        return (SANDBOX_HOST if self.use_sandbox else PRODUCTION_HOST), self.port


class _Http2Connection(HTTP20Connection):
    """hyper's connection with TCP_NODELAY.

    hyper writes a request's HEADERS and DATA frames separately; without
    TCP_NODELAY the second waits for the peer's delayed ACK (40 ms on Linux)
    whenever only one request is in flight.
    """

    def connect(self) -> None:
        with self._lock:
            fresh = self._sock is None
            super().connect()
            if fresh:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ApnsClient(APNsClient):
    """apns2's client, connected to the configured address and able to close.

    APNsClient only knows Apple's two hosts; ``_init_connection`` is where it
    builds its hyper connection, so that is the one place to aim it elsewhere.
    """

    def __init__(self, credentials: Credentials, *, host: str, port: int, tls_context) -> None:
        self._address = (host, port)
        self._tls_context = tls_context
        super().__init__(credentials)

    def _init_connection(self, use_sandbox, use_alternative_port, proto, proxy_host, proxy_port) -> None:
        host, port = self._address
        # As Credentials.create_connection builds it, with our TLS context.
        self._connection = _Http2Connection(host, port, ssl_context=self._tls_context,
                                            force_proto=proto or "h2", secure=True)

    def is_open(self) -> bool:
        return self._connection._sock is not None

    def stream_limit(self) -> int:
        """How many requests APNs takes at once on this connection (its SETTINGS)."""
        # Read the way APNsClient.update_max_concurrent_streams reads it.
        with self._connection._conn as connection:
            return connection.remote_settings.max_concurrent_streams

    def close(self) -> None:
        # hyper logs a warning when it closes a connection it never opened.
        if self.is_open():
            self._connection.close()


def _credentials(config: ApnsConfig) -> Credentials:
    """apns2's credentials: the provider-token signer, or apns2's load of the certificate.

    A certificate authenticates in the TLS handshake (see ``_tls_context``);
    either way a bad file fails the actor's start.
    """
    if config.auth == "token":
        return TokenCredentials(str(config.key_file), config.key_id, config.team_id)
    return CertificateCredentials(str(config.cert_file), config.cert_password)


def _tls_context(config: ApnsConfig):
    """The TLS context apns2 would use (hyper's ``init_context``), trusting ``ca_file`` too.

    apns2 keeps its context private to the credentials and offers no way to add
    a CA, so the connection gets one built the same way here.
    """
    if config.auth == "certificate":
        context = init_context(cert=str(config.cert_file), cert_password=config.cert_password)
    else:
        context = init_context()
    if config.ca_file is not None:
        context.load_verify_locations(cafile=str(config.ca_file))
    return context


def build_payload(config: ApnsConfig, request: PushRequest) -> Payload:
    """What the device receives: a wake-up with the pending count, no message text.

    Only the ``preview`` (set when the operator lets message content through
    Apple) carries a message; it is left out if it would take the payload over
    Apple's 4096 bytes, since the app fetches the messages anyway.
    """
    custom: dict[str, Any] = {"pending": request.pending}
    alert = config.push_type == "alert"
    payload = _payload(config, request, custom, alert)
    if request.preview is None:
        return payload
    try:
        preview: Any = json.loads(request.preview)
    except ValueError:
        preview = request.preview.decode("utf-8", "replace")
    # mutable-content lets the app's notification service extension show the preview.
    with_preview = _payload(config, request, {**custom, "preview": preview}, alert, mutable=alert)
    if _payload_size(with_preview) > MAX_PAYLOAD_SIZE:
        log.debug("APNs preview for %s/%s left out: over %d bytes", request.user, request.device, MAX_PAYLOAD_SIZE)
        return payload
    return with_preview


def _payload(config: ApnsConfig, request: PushRequest, custom: dict, alert: bool, mutable: bool = False) -> Payload:
    if not alert:
        # Apple: a background push's aps holds content-available and nothing user-visible.
        return Payload(content_available=True, custom={CUSTOM_KEY: custom})
    return Payload(
        alert=PayloadAlert(body_localized_key=config.alert_loc_key, body_localized_args=[str(request.pending)]),
        badge=request.pending,
        sound=config.sound,
        mutable_content=mutable,
        custom={CUSTOM_KEY: custom},
    )


def _payload_size(payload: Payload) -> int:
    # Serialized as APNsClient.send_notification_async serializes it.
    return len(json.dumps(payload.dict(), ensure_ascii=False, separators=(",", ":")).encode())


# -- what a request came to ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    kind: Literal["sent", "rejected", "retry", "failed"]
    reason: str = ""
    answered: bool = True  # APNs answered on this connection
    reset: bool = False  # the connection is finished: open a new one
    outage: bool = False  # APNs is unreachable or failing, not just refusing this push


_SENT = _Outcome("sent")


def _classify(result) -> _Outcome:
    """Turn APNsClient.get_notification_result's answer into an outcome."""
    if result == "Success":
        return _SENT
    # A 410 comes as (reason, timestamp), anything else as the reason alone.
    reason = result[0] if isinstance(result, tuple) else str(result)
    if reason in TOKEN_REJECTED_REASONS:
        return _Outcome("rejected", reason)
    if reason in RETRY_REASONS:
        return _Outcome("retry", reason, reset=reason in RECONNECT_REASONS,
                        outage=reason in SERVER_TROUBLE_REASONS)
    return _Outcome("failed", reason)


def _describe(error: BaseException, address: tuple[str, int]) -> str:
    text = str(error)
    name = type(error).__name__
    return f"{address[0]}:{address[1]}: {name}: {text}" if text else f"{address[0]}:{address[1]}: {name}"


def _spawn(group: Group, function, *args) -> None:
    greenlet = group.spawn(function, *args)
    greenlet.link_exception(lambda crashed: log.error("APNs provider greenlet crashed: %r", crashed.exception))


# -- messages the actor tells itself ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    request: PushRequest
    payload: Payload
    expiration: int  # the absolute apns-expiration, fixed at the first attempt
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class _Done:
    job: _Job
    client: _ApnsClient
    outcome: _Outcome


@dataclass(frozen=True, slots=True)
class _Retry:
    job: _Job


class ApnsProviderActor(pykka.ThreadingActor):
    """Sends ``PushRequest``s through APNs; answers ``PushProviderQuery`` with its state."""

    platform = "apns"

    def __init__(self, *, config: ApnsConfig, token_sink: pykka.ActorRef, counters: PushCounters) -> None:
        super().__init__()
        self._config = config
        self._token_sink = token_sink
        self._counters = counters
        self._address = config.address
        self._priority = NotificationPriority.Immediate if config.priority == 10 else NotificationPriority.Delayed
        self._push_type = NotificationType.Alert if config.push_type == "alert" else NotificationType.Background
        self._credentials: Credentials | None = None
        self._tls_context = None
        self._client: _ApnsClient | None = None
        self._proven = False  # APNs has answered on the current connection
        self._down = False
        self._queue: deque[_Job] = deque()
        self._in_flight = 0
        self._senders = Group()
        self._timers = Group()  # retries waiting out their backoff
        self._reported: set[str] = set()  # refusals logged since the last push got through

    # -- life cycle ----------------------------------------------------------------

    def on_start(self) -> None:
        self._credentials = _credentials(self._config)
        self._tls_context = _tls_context(self._config)
        log.info("APNs provider for %s via %s:%d (%s authentication)",
                 self._config.topic, *self._address, self._config.auth)

    def on_stop(self) -> None:
        self._shut_down()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._shut_down()

    def _shut_down(self) -> None:
        unsent = len(self._queue) + len(self._timers) + self._in_flight
        self._timers.kill()
        self._senders.kill()
        self._close_client()
        self._queue.clear()
        if unsent:
            # Their messages stay in the store: the devices get them when they next connect.
            log.info("APNs provider stopped with %d pushes unsent", unsent)

    # -- messages --------------------------------------------------------------------

    def on_receive(self, message):
        if isinstance(message, PushRequest):
            self._accept(message)
        elif isinstance(message, _Done):
            self._finish(message)
        elif isinstance(message, _Retry):
            self._queue.appendleft(message.job)  # it waited its turn already
        elif isinstance(message, PushProviderQuery):
            return self._state()
        else:
            log.warning("APNs provider ignores %r", message)
            return None
        self._dispatch()
        return None

    def _accept(self, request: PushRequest) -> None:
        if not _DEVICE_TOKEN.fullmatch(request.token):
            # It could not even go into the request path; Apple would say the same.
            self._reject(request, "BadDeviceToken")
            return
        expiration = int(time.time()) + self._config.expiration if self._config.expiration else 0
        self._queue.append(_Job(request, build_payload(self._config, request), expiration))

    def _state(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "host": self._address[0],
            "port": self._address[1],
            "connected": self._client is not None and self._client.is_open(),
            "down": self._down,
            "queued": len(self._queue),
            "in_flight": self._in_flight,
            "retrying": len(self._timers),
            **self._counters.as_dict(),
        }

    # -- sending -----------------------------------------------------------------------

    def _capacity(self) -> int:
        if self._down or self._client is None or not self._proven:
            # One request finds out whether APNs is back, and with token
            # authentication APNs allows one stream until it has seen a valid token.
            return 1
        return max(1, min(self._config.max_in_flight, self._client.stream_limit()))

    def _dispatch(self) -> None:
        while self._queue and self._in_flight < self._capacity():
            job = self._queue.popleft()
            if self._client is None:
                host, port = self._address
                self._client = _ApnsClient(self._credentials, host=host, port=port, tls_context=self._tls_context)
                self._proven = False
            self._in_flight += 1
            _spawn(self._senders, self._send, self._client, job)

    def _send(self, client: _ApnsClient, job: _Job) -> None:
        """One request, on a greenlet of ``_senders``: only reads, and tells the actor."""
        tell_if_alive(self.actor_ref, _Done(job, client, self._request(client, job)))

    def _request(self, client: _ApnsClient, job: _Job) -> _Outcome:
        config = self._config
        timeout = gevent.Timeout(config.timeout)
        timeout.start()
        try:
            stream_id = client.send_notification_async(
                job.request.token, job.payload, topic=config.topic, priority=self._priority,
                expiration=job.expiration, collapse_id=config.collapse_id, push_type=self._push_type,
            )
            result = client.get_notification_result(stream_id)
        except gevent.Timeout as expired:
            if expired is not timeout:
                raise
            return _Outcome("retry", f"{self._address[0]}:{self._address[1]}: no answer within {config.timeout:g} s",
                            answered=False, reset=True)
        except Exception as error:
            # Socket and TLS errors, hyper and h2 errors on a connection that
            # broke under the request, an answer that is not APNs JSON: all of
            # them leave the connection unusable and are worth another try.
            log.debug("APNs request failed", exc_info=True)
            return _Outcome("retry", _describe(error, self._address), answered=False, reset=True)
        finally:
            timeout.close()
        return _classify(result)

    # -- outcomes ----------------------------------------------------------------------

    def _finish(self, done: _Done) -> None:
        self._in_flight -= 1
        job, outcome = done.job, done.outcome
        current = done.client is self._client
        if current:
            # A fresh connection that fails means APNs is out of reach; one that
            # had worked may just have been closed while idle: the retry tells.
            if outcome.outage:
                self._mark_down(f"{self._address[0]}:{self._address[1]} answered {outcome.reason}")
            elif outcome.reset and not outcome.answered and not self._proven:
                self._mark_down(outcome.reason)
            elif outcome.answered:
                self._proven = True
                self._mark_up()
            if outcome.reset:
                self._close_client()
        request = job.request
        if outcome.kind == "sent":
            self._counters.sent += 1
            self._reported.clear()
        elif outcome.kind == "rejected":
            self._reject(request, outcome.reason)
        elif outcome.kind == "retry" and job.attempt < self._config.max_retries:
            self._counters.retried += 1
            delay = min(self._config.retry_delay * 2 ** job.attempt, MAX_RETRY_DELAY)
            _spawn(self._timers, self._retry_later, replace(job, attempt=job.attempt + 1), delay)
        else:
            self._counters.failed += 1
            if outcome.kind == "retry":
                if not self._down:  # an outage is logged once, not per push
                    self._report(outcome.reason, request, f" (after {job.attempt} retries)")
            else:
                self._report(outcome.reason, request)

    def _retry_later(self, job: _Job, delay: float) -> None:
        gevent.sleep(delay)
        tell_if_alive(self.actor_ref, _Retry(job))

    def _reject(self, request: PushRequest, reason: str) -> None:
        self._counters.tokens_removed += 1
        tell_if_alive(self._token_sink, PushTokenRejected(
            platform="apns", user=request.user, device=request.device, token=request.token, reason=reason,
        ))

    def _report(self, reason: str, request: PushRequest, detail: str = "") -> None:
        if reason in self._reported:
            return
        self._reported.add(reason)
        log.warning("APNs push to %s/%s failed: %s%s (only counted from now on, until a push gets through)",
                    request.user, request.device, reason, detail)

    def _mark_down(self, why: str) -> None:
        if not self._down:
            self._down = True
            log.warning("APNs provider down: %s", why)

    def _mark_up(self) -> None:
        if self._down:
            self._down = False
            # At the level of the "down" line, so that whoever sees one sees the other.
            log.warning("APNs provider back")

    def _close_client(self) -> None:
        client, self._client = self._client, None
        self._proven = False
        if client is not None:
            try:
                client.close()
            except Exception as error:  # closing a broken connection can fail too; it is dropped anyway
                log.debug("closing the APNs connection: %r", error)
