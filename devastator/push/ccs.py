"""The GCM Cloud Connection Server (CCS) push provider: one actor, XMPP over TLS.

``GcmCcsProviderActor`` takes ``PushRequest`` messages and sends each as a data
message over a CCS connection: direct TLS to ``host:port``, SASL PLAIN as
``SENDER_ID@gcm.googleapis.com`` with the API key, resource binding, then one
``<message><gcm xmlns="google:mobile:data">{JSON}</gcm></message>`` per push.
CCS answers every push with an ack or a nack carrying the same ``message_id``:

- ack: sent.
- nack ``BAD_REGISTRATION`` / ``DEVICE_UNREGISTERED``: the ``token_sink`` is
  told ``PushTokenRejected`` so that the token is removed from its device.
- nack ``INVALID_JSON`` / ``BAD_ACK`` or a stanza error: our mistake, never
  retried; failed, logged once per error code.
- any other nack (``SERVICE_UNAVAILABLE``, ``INTERNAL_SERVER_ERROR``,
  ``DEVICE_MESSAGE_RATE_EXCEEDED``, and codes we do not know, which the CCS
  reference says to treat as ``INTERNAL_SERVER_ERROR``): retried with
  exponential backoff, at most ``max_retries`` times, then failed.
- nack ``CONNECTION_DRAINING``: retried at once on another connection.

At most ``max_unacked`` pushes wait for their ack on a connection (CCS allows
100); the rest wait in a queue. When CCS sends the ``CONNECTION_DRAINING``
control message, a new connection opens at once and takes every new push; the
old one stays open until its pushes in flight are acked, then closes. When a
connection drops, the actor reconnects with backoff and resends what was not
acked on it, with the same ``message_id``s; what was acked is never resent. A
connection whose oldest push has waited ``ack_timeout`` for its ack is
presumed dead and treated the same way. Upstream messages from devices are
told to the ``upstream_sink`` as ``UpstreamMessage`` and then acked, and
delivery receipts are acked, as CCS requires of every message it sends.

Network trouble never escapes ``on_receive``: it is logged once per outage
("GCM CCS provider down: ...") and once when a session is up again.

How slixmpp (asyncio) runs on gevent
------------------------------------
``asyncio_gevent.EventLoop`` is asyncio's selector event loop with gevent's
selector: where asyncio would block in ``select()``, it waits on the gevent
hub, so every other greenlet keeps running. The actor creates one such loop in
``on_start`` and runs it in a greenlet of its own ``Group``: the same OS
thread and the same hub as the rest of the server, no thread of its own and
no second blocking loop. Everything slixmpp does (connect, TLS, SASL, XML
parsing, writes, its timers) happens in that greenlet. The loop runs
``run_forever`` in our greenlet rather than in the one ``EventLoop`` would
spawn for itself, so that the actor owns it and ``on_stop`` can end it. The
host name goes through asyncio's ``getaddrinfo``, which runs in the loop's
default executor: after ``patch_all`` its workers are greenlets and the
lookup is gevent's, as everywhere else in the server.

Crossing between the actor's greenlet and the loop:

- actor -> loop: ``loop.call_soon_threadsafe(callback)``. Only the
  ``*_threadsafe`` entry points wake a loop that waits in its selector (they
  write to its self-pipe); a plain ``call_soon`` from another greenlet, like
  the ``create_task`` inside ``asyncio_gevent.future_to_greenlet``, would sit
  in the ready queue until some unrelated socket event arrived. The one wait
  the actor does (closing its connections in ``on_stop``) goes through
  ``asyncio.run_coroutine_threadsafe``: its ``concurrent.futures.Future`` waits
  on a lock that ``patch_all`` made gevent's, so ``result()`` blocks only the
  actor's greenlet.
- loop -> actor: slixmpp's event handlers ``tell()`` the actor small private
  messages. pykka's inbox takes them without blocking, and the actor alone
  owns all push state, so nothing is shared between the two sides.

asyncio keeps "the running loop" per OS thread, and greenlets share the
thread: while this loop runs no other asyncio loop can run in the process
(``run_forever`` would raise), which ``on_start`` checks. One CCS provider per
process is the design; another asyncio user would have to share this loop.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from xml.sax.saxutils import escape

import asyncio_gevent
import gevent
import gevent.pool
import pykka
import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp.xmlstream.xmlstream import NotConnectedError

from ..actors.messages import PushProviderQuery, tell_if_alive, tell_later
from .base import PushCounters, PushRequest, PushTokenRejected, UpstreamMessage

log = logging.getLogger(__name__)

# The XMPP domain of every CCS account, whatever host serves it.
GCM_DOMAIN = "gcm.googleapis.com"
PRODUCTION_PORT = 5235
PREPRODUCTION_PORT = 5236
MAX_TIME_TO_LIVE = 2_419_200  # four weeks: the longest CCS keeps a message
CCS_MAX_UNACKED = 100  # CCS flow control: pending messages per connection
# A CCS payload is at most 4 KB; a larger preview is left out, not truncated
# into invalid JSON, so that the wake-up itself still goes through.
MAX_PREVIEW_BYTES = 3072

_NS_GCM = "google:mobile:data"
_NS_CLIENT = "jabber:client"
_NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
_TOKEN_GONE = frozenset({"BAD_REGISTRATION", "DEVICE_UNREGISTERED"})
_NEVER_RETRY = frozenset({"INVALID_JSON", "BAD_ACK"})
_DRAINING = "CONNECTION_DRAINING"
_SHUTDOWN_WAIT = 2.0  # seconds to close connections politely in on_stop


@dataclass(frozen=True, slots=True)
class CcsConfig:
    """How to reach CCS and what each push says. Tests pass small literals."""

    sender_id: str  # the numeric project number
    api_key: str = field(repr=False)  # the server key; never logged
    preprod: bool = False  # CCS's pre-production port, for testing with non-production users
    host: str = "fcm-xmpp.googleapis.com"
    port: int | None = None  # None: 5235, or 5236 with preprod
    ca_file: Path | None = None  # one more CA to trust (tests)
    time_to_live: int = MAX_TIME_TO_LIVE
    collapse_key: str | None = "devastator"  # one wake-up per device waits at CCS, not one per message
    delivery_receipt_requested: bool = False
    priority: str = "high"  # "normal" data messages wait for a device to leave Doze
    max_unacked: int = CCS_MAX_UNACKED
    max_queued: int = 10_000  # beyond this the oldest queued push is dropped (failed)
    retry_backoff_base: float = 1.0
    retry_backoff_max: float = 60.0
    max_retries: int = 5
    connect_timeout: float = 20.0  # from TCP connect to a bound session
    ack_timeout: float = 60.0  # a connection silent this long about its oldest push is dead

    def __post_init__(self) -> None:
        def check(ok: bool, setting: str, problem: str) -> None:
            if not ok:
                raise ValueError(f"GCM CCS {setting}: {problem}")

        check(isinstance(self.sender_id, str) and self.sender_id.isdigit(), "sender_id",
              f"must be the numeric sender id (project number), got {self.sender_id!r}")
        check(isinstance(self.api_key, str) and self.api_key.strip() != "", "api_key", "must not be empty")
        check(isinstance(self.host, str) and self.host.strip() != "" and " " not in self.host, "host",
              f"must be a host name, got {self.host!r}")
        check(self.port is None or (_is_int(self.port) and 0 < self.port < 65536), "port",
              f"must be between 1 and 65535, got {self.port!r}")
        check(self.ca_file is None or Path(self.ca_file).is_file(), "ca_file",
              f"{str(self.ca_file)!r} is not a file")
        check(_is_int(self.time_to_live) and 0 <= self.time_to_live <= MAX_TIME_TO_LIVE, "time_to_live",
              f"must be 0 to {MAX_TIME_TO_LIVE} seconds, got {self.time_to_live!r}")
        check(self.collapse_key is None or (isinstance(self.collapse_key, str) and self.collapse_key != ""),
              "collapse_key", "must be a non-empty string or None")
        check(self.priority in ("high", "normal"), "priority",
              f"must be 'high' or 'normal', got {self.priority!r}")
        check(_is_int(self.max_unacked) and 1 <= self.max_unacked <= CCS_MAX_UNACKED, "max_unacked",
              f"must be 1 to {CCS_MAX_UNACKED} (the CCS limit), got {self.max_unacked!r}")
        check(_is_int(self.max_queued) and self.max_queued >= 1, "max_queued",
              f"must be at least 1, got {self.max_queued!r}")
        check(_is_seconds(self.retry_backoff_base) and self.retry_backoff_base > 0, "retry_backoff_base",
              f"must be a positive number of seconds, got {self.retry_backoff_base!r}")
        check(_is_seconds(self.retry_backoff_max) and self.retry_backoff_max >= self.retry_backoff_base,
              "retry_backoff_max", f"must be at least retry_backoff_base, got {self.retry_backoff_max!r}")
        check(_is_int(self.max_retries) and self.max_retries >= 0, "max_retries",
              f"must be 0 or more, got {self.max_retries!r}")
        check(_is_seconds(self.connect_timeout) and self.connect_timeout > 0, "connect_timeout",
              f"must be a positive number of seconds, got {self.connect_timeout!r}")
        check(_is_seconds(self.ack_timeout) and self.ack_timeout > 0, "ack_timeout",
              f"must be a positive number of seconds, got {self.ack_timeout!r}")

    @property
    def address(self) -> tuple[str, int]:
        if self.port is not None:
            return self.host, self.port
        return self.host, PREPRODUCTION_PORT if self.preprod else PRODUCTION_PORT

    @property
    def jid(self) -> str:
        return f"{self.sender_id}@{GCM_DOMAIN}"

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        return min(self.retry_backoff_max, self.retry_backoff_base * 2 ** (attempt - 1))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- what the loop side tells the actor ----------------------------------------


@dataclass(frozen=True, slots=True)
class _LinkReady:
    number: int


@dataclass(frozen=True, slots=True)
class _LinkStanza:
    number: int
    json_text: str


@dataclass(frozen=True, slots=True)
class _LinkStanzaError:
    number: int
    stanza_id: str
    condition: str


@dataclass(frozen=True, slots=True)
class _LinkAuthRefused:
    number: int
    condition: str


@dataclass(frozen=True, slots=True)
class _LinkClosed:
    number: int
    reason: str


# -- what the actor's timers tell it -------------------------------------------


@dataclass(frozen=True, slots=True)
class _RetryDue:
    push: _Push


@dataclass(frozen=True, slots=True)
class _ReconnectDue:
    """Time to open a connection again."""


@dataclass(frozen=True, slots=True)
class _CheckAcks:
    """Time to look for connections that stopped acking."""


@dataclass(slots=True, eq=False)
class _Push:
    message_id: str  # kept across resends, so CCS and the device can tell a resend
    request: PushRequest
    attempts: int = 0  # retries after nacks so far
    sent_at: float = 0.0


@dataclass(slots=True, eq=False)
class _Connection:
    """The actor's view of one CCS connection."""

    number: int
    link: _XmppLink
    ready: bool = False
    draining: bool = False
    closing: bool = False
    unacked: dict[str, _Push] = field(default_factory=dict)  # in the order sent


class GcmCcsProviderActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        config: CcsConfig,
        token_sink: pykka.ActorRef,
        upstream_sink: pykka.ActorRef,
        counters: PushCounters,
    ):
        super().__init__()
        self._config = config
        self._token_sink = token_sink
        self._upstream_sink = upstream_sink
        self._counters = counters
        self._queue: collections.deque[_Push] = collections.deque()
        self._connections: dict[int, _Connection] = {}
        self._active: _Connection | None = None  # where new pushes go
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1)
        self._id_prefix = ""
        self._retrying = 0
        self._reconnects = 0  # attempts since the last session came up
        self._reconnect_pending = False
        self._down = False
        self._auth_refused = False
        self._logged_errors: set[str] = set()
        self._group: gevent.pool.Group | None = None
        self._loop: _HubEventLoop | None = None
        self._loop_runner: gevent.Greenlet | None = None
        self._ssl_context: ssl.SSLContext | None = None

    # -- lifecycle ---------------------------------------------------------------

    def on_start(self) -> None:
        if _running_loop() is not None:
            raise RuntimeError("GCM CCS: another asyncio event loop already runs in this process")
        # Unique per sender id across restarts too: CCS and devices key on it.
        self._id_prefix = f"dv{secrets.token_hex(4)}-"
        self._ssl_context = _client_ssl_context(self._config.ca_file)
        self._group = gevent.pool.Group()
        self._loop = _HubEventLoop()
        self._loop_runner = self._spawn(self._loop.run_forever)
        self._spawn(self._tick_acks)
        self._open_connection()

    def on_stop(self) -> None:
        self._shutdown()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._shutdown()

    def _spawn(self, function: Callable[[], Any]) -> gevent.Greenlet:
        greenlet = self._group.spawn(function)
        greenlet.link_exception(lambda crashed: log.error(
            "GCM CCS %s crashed: %r", getattr(function, "__name__", function), crashed.exception))
        return greenlet

    def _shutdown(self) -> None:
        loop, links = self._loop, [connection.link for connection in self._connections.values()]
        self._loop = None
        self._connections.clear()
        self._active = None
        if loop is not None and self._loop_runner is not None and not self._loop_runner.dead:
            try:
                asyncio.run_coroutine_threadsafe(_close_links(links), loop).result(timeout=_SHUTDOWN_WAIT + 1)
            except Exception as error:
                log.warning("GCM CCS connections did not close cleanly: %r", error)
            loop.call_soon_threadsafe(loop.stop)
            self._loop_runner.join(timeout=_SHUTDOWN_WAIT)
        if self._group is not None:
            # Timers, the ack watchdog, and the loop's greenlet if it did not stop.
            self._group.kill(timeout=_SHUTDOWN_WAIT)
        if loop is not None and not loop.is_running() and not loop.is_closed():
            loop.close()

    # -- messages ------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, PushRequest):
            self._on_push(message)
        elif isinstance(message, _LinkStanza):
            self._on_stanza(message)
        elif isinstance(message, _LinkReady):
            self._on_ready(message)
        elif isinstance(message, _LinkClosed):
            self._on_closed(message)
        elif isinstance(message, _LinkStanzaError):
            self._on_stanza_error(message)
        elif isinstance(message, _LinkAuthRefused):
            self._on_auth_refused(message)
        elif isinstance(message, _RetryDue):
            self._on_retry_due(message.push)
        elif isinstance(message, _ReconnectDue):
            self._reconnect_pending = False
            if self._active is None:
                self._open_connection()
        elif isinstance(message, _CheckAcks):
            self._check_acks()
        elif isinstance(message, PushProviderQuery):
            return self._state()
        return None

    def _state(self) -> dict[str, Any]:
        host, port = self._config.address
        return {
            "platform": "gcm",
            "host": host,
            "port": port,
            "connections": len(self._connections),
            "unacked": sum(len(connection.unacked) for connection in self._connections.values()),
            "queued": len(self._queue),
            "retrying": self._retrying,
            "down": self._down,
            **self._counters.as_dict(),
        }

    def _on_push(self, request: PushRequest) -> None:
        if self._auth_refused:
            # Until CCS takes the credentials again nothing can be sent.
            self._counters.failed += 1
            return
        self._queue.append(_Push(message_id=f"{self._id_prefix}{next(self._ids)}", request=request))
        if len(self._queue) > self._config.max_queued:
            self._queue.popleft()
            self._counters.failed += 1
        self._pump()

    def _pump(self) -> None:
        """Send queued pushes on the active connection, up to its unacked limit."""
        connection = self._active
        if connection is None or not connection.ready or not self._queue:
            return
        room = self._config.max_unacked - len(connection.unacked)
        if room <= 0:
            return
        now = time.monotonic()
        stanzas = []
        while room > 0 and self._queue:
            push = self._queue.popleft()
            push.sent_at = now
            connection.unacked[push.message_id] = push
            stanzas.append(_gcm_stanza(self._payload(push), stanza_id=push.message_id))
            room -= 1
        self._write(connection, "".join(stanzas))

    def _payload(self, push: _Push) -> dict[str, Any]:
        request = push.request
        data = {"pending": str(request.pending)}
        if request.preview is not None and len(request.preview) <= MAX_PREVIEW_BYTES:
            data["preview"] = request.preview.decode("utf-8", errors="replace")
        payload: dict[str, Any] = {
            "to": request.token,
            "message_id": push.message_id,
            "data": data,
            "time_to_live": self._config.time_to_live,
            "priority": self._config.priority,
            "delivery_receipt_requested": self._config.delivery_receipt_requested,
        }
        if self._config.collapse_key is not None:
            payload["collapse_key"] = self._config.collapse_key
        return payload

    def _write(self, connection: _Connection, data: str) -> None:
        self._loop.call_soon_threadsafe(connection.link.write, data)

    # -- what CCS says ---------------------------------------------------------------

    def _on_stanza(self, message: _LinkStanza) -> None:
        connection = self._connections.get(message.number)
        if connection is None:
            return  # closed meanwhile: CCS resends what we did not ack
        try:
            payload = json.loads(message.json_text)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            self._log_once("unreadable", "GCM CCS sent a message that is not a JSON object: %.200r",
                           message.json_text)
            return
        kind = payload.get("message_type")
        if kind == "ack":
            self._on_ack(connection, payload)
        elif kind == "nack":
            self._on_nack(connection, payload)
        elif kind == "control":
            if payload.get("control_type") == _DRAINING:
                self._drain(connection)
        elif kind == "receipt":
            self._ack_upstream(connection, payload)
        elif kind is None:
            self._on_upstream(connection, payload)

    def _on_ack(self, connection: _Connection, payload: dict) -> None:
        push = connection.unacked.pop(str(payload.get("message_id")), None)
        if push is not None:
            self._counters.sent += 1
            self._settled(connection)

    def _on_nack(self, connection: _Connection, payload: dict) -> None:
        push = connection.unacked.pop(str(payload.get("message_id")), None)
        error = str(payload.get("error") or "UNKNOWN")
        if push is None:
            if error == "BAD_ACK":  # about an ack we sent for an upstream message
                self._log_once(error, "GCM CCS refused an ack: %s", payload.get("error_description", ""))
            return
        if error in _TOKEN_GONE:
            request = push.request
            tell_if_alive(self._token_sink, PushTokenRejected(
                platform="gcm", user=request.user, device=request.device, token=request.token, reason=error,
            ))
            self._counters.tokens_removed += 1
        elif error in _NEVER_RETRY:
            self._counters.failed += 1
            self._log_once(error, "GCM CCS refused a push: %s (%s)", error, payload.get("error_description", ""))
        elif error == _DRAINING:
            # This connection takes no more; the push goes out on the next one at once.
            self._drain(connection)
            if self._count_retry(push):
                self._queue.appendleft(push)
        elif self._count_retry(push):
            self._retrying += 1
            self._later(self._config.backoff(push.attempts), _RetryDue(push))
        self._settled(connection)

    def _count_retry(self, push: _Push) -> bool:
        push.attempts += 1
        if push.attempts > self._config.max_retries:
            self._counters.failed += 1
            return False
        self._counters.retried += 1
        return True

    def _on_retry_due(self, push: _Push) -> None:
        self._retrying -= 1
        if self._auth_refused:
            self._counters.failed += 1
            return
        self._queue.appendleft(push)
        self._pump()

    def _on_stanza_error(self, message: _LinkStanzaError) -> None:
        connection = self._connections.get(message.number)
        if connection is None:
            return
        push = connection.unacked.pop(message.stanza_id, None)
        if push is not None:
            self._counters.failed += 1
            self._log_once(f"stanza:{message.condition}", "GCM CCS rejected a push stanza: %s", message.condition)
            self._settled(connection)

    def _settled(self, connection: _Connection) -> None:
        """A push left ``connection``: close it if it drains and is done, else send more."""
        if connection.draining and not connection.unacked:
            self._close(connection)
        else:
            self._pump()

    def _on_upstream(self, connection: _Connection, payload: dict) -> None:
        sender, message_id = payload.get("from"), payload.get("message_id")
        if not isinstance(sender, str) or not isinstance(message_id, str):
            return
        data = payload.get("data")
        upstream = UpstreamMessage(
            platform="gcm", token=sender, message_id=message_id, data=data if isinstance(data, dict) else {},
        )
        # Acked only once handed on: unacked, CCS sends it again later.
        if tell_if_alive(self._upstream_sink, upstream):
            self._ack_upstream(connection, payload)

    def _ack_upstream(self, connection: _Connection, payload: dict) -> None:
        sender, message_id = payload.get("from"), payload.get("message_id")
        if isinstance(sender, str) and isinstance(message_id, str):
            # CCS wants the ack on the connection the message came on.
            self._write(connection, _gcm_stanza({"to": sender, "message_id": message_id, "message_type": "ack"}))

    # -- connections -------------------------------------------------------------------

    def _open_connection(self) -> None:
        number = next(self._numbers)
        link = _XmppLink(
            number=number, config=self._config, ssl_context=self._ssl_context,
            report=lambda message: tell_if_alive(self.actor_ref, message),
        )
        connection = _Connection(number=number, link=link)
        self._connections[number] = connection
        self._active = connection
        self._loop.call_soon_threadsafe(link.open)

    def _on_ready(self, message: _LinkReady) -> None:
        connection = self._connections.get(message.number)
        if connection is None:
            return
        connection.ready = True
        self._reconnects = 0
        self._auth_refused = False
        if self._down:
            self._down = False
            log.warning("GCM CCS provider up again (%s:%d)", *self._config.address)
        self._pump()

    def _on_auth_refused(self, message: _LinkAuthRefused) -> None:
        self._auth_refused = True
        self._went_down(f"authentication refused ({message.condition}): check the sender id and API key")
        self._counters.failed += len(self._queue)
        self._queue.clear()

    def _on_closed(self, message: _LinkClosed) -> None:
        connection = self._connections.pop(message.number, None)
        if connection is None:
            return
        # Resent first, with the same message_ids: CCS acked none of them.
        self._queue.extendleft(reversed(connection.unacked.values()))
        connection.unacked.clear()
        if self._auth_refused:
            self._counters.failed += len(self._queue)
            self._queue.clear()
        if connection is self._active:
            self._active = None
            self._went_down(message.reason)
            self._schedule_reconnect()
        self._pump()

    def _drain(self, connection: _Connection) -> None:
        if connection.draining:
            return
        connection.draining = True
        if connection is self._active:
            self._active = None
            self._open_connection()
        if not connection.unacked:
            self._close(connection)

    def _close(self, connection: _Connection) -> None:
        if not connection.closing:
            connection.closing = True
            self._loop.call_soon_threadsafe(connection.link.close)

    def _schedule_reconnect(self) -> None:
        if self._reconnect_pending:
            return
        # The first attempt after a lost session goes at once; failures back off.
        delay = 0.0 if self._reconnects == 0 else self._config.backoff(self._reconnects)
        self._reconnects += 1
        self._reconnect_pending = True
        self._later(delay, _ReconnectDue())

    def _check_acks(self) -> None:
        deadline = time.monotonic() - self._config.ack_timeout
        for connection in list(self._connections.values()):
            oldest = next(iter(connection.unacked.values()), None)
            if oldest is not None and oldest.sent_at < deadline and not connection.closing:
                connection.closing = True
                self._loop.call_soon_threadsafe(
                    connection.link.abort, f"no ack for {self._config.ack_timeout:g} s")

    def _tick_acks(self) -> None:
        while True:
            gevent.sleep(self._config.ack_timeout / 4)
            tell_if_alive(self.actor_ref, _CheckAcks())

    def _later(self, delay: float, message: Any) -> None:
        tell_later(self._group, self.actor_ref, message, delay)

    def _went_down(self, reason: str) -> None:
        if not self._down:
            self._down = True
            log.warning("GCM CCS provider down: %s", reason)

    def _log_once(self, key: str, text: str, *args: Any) -> None:
        if key not in self._logged_errors:
            self._logged_errors.add(key)
            log.warning(text, *args)


def _gcm_stanza(payload: dict[str, Any], stanza_id: str = "") -> str:
    # ASCII-only JSON has no character XML 1.0 forbids; escape() covers & < >.
    text = escape(json.dumps(payload, separators=(",", ":"), ensure_ascii=True))
    attribute = escape(stanza_id, {'"': "&quot;"})
    return f'<message id="{attribute}"><gcm xmlns="{_NS_GCM}">{text}</gcm></message>'


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop running in this OS thread, seen from any of its greenlets."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _client_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


class _HubEventLoop(asyncio_gevent.EventLoop):
    """asyncio_gevent's loop, run in the caller's greenlet rather than one it spawns itself."""

    def run_forever(self) -> None:
        asyncio.SelectorEventLoop.run_forever(self)


async def _close_links(links: list[_XmppLink]) -> None:
    """End every connection, then every task slixmpp left behind (runs on the loop)."""
    closing = [future for future in (link.close(_SHUTDOWN_WAIT) for link in links) if future is not None]
    if closing:
        await asyncio.wait(closing, timeout=_SHUTDOWN_WAIT)
    for link in links:
        link.abort("provider stopped")
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_default_executor()


class _XmppLink:
    """One CCS connection on the loop's side: a slixmpp client and its events.

    Built by the actor, but every method runs in the loop's greenlet (the actor
    calls them through ``call_soon_threadsafe``). It reports to the actor with
    ``report``; a closed link reports ``_LinkClosed`` exactly once.
    """

    def __init__(self, *, number: int, config: CcsConfig, ssl_context: ssl.SSLContext,
                 report: Callable[[Any], Any]):
        self.number = number
        self._config = config
        self._ssl_context = ssl_context
        self._report = report
        self._client: slixmpp.ClientXMPP | None = None
        self._started = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None

    def open(self) -> None:
        try:
            self._open()
        except Exception as error:  # the actor must hear of it, or it would wait forever
            log.exception("GCM CCS: cannot start a connection")
            self._finish(f"cannot start a connection: {error!r}")

    def _open(self) -> None:
        loop = asyncio.get_running_loop()
        client = slixmpp.ClientXMPP(
            self._config.jid, self._config.api_key, sasl_mech="PLAIN", loop=loop, ssl_context=self._ssl_context,
        )
        # CCS speaks direct TLS only: no STARTTLS, no plaintext fallback.
        client.enable_starttls = False
        client.enable_plaintext = False
        client.enable_direct_tls = True
        # The certificate is checked against the host we connect to; the
        # stream itself still names the gcm.googleapis.com domain.
        client.default_domain = self._config.host
        client.credentials["username"] = self._config.jid
        # A refused login ends this connection; slixmpp's own handler would try
        # other mechanisms and log an error on every reconnect.
        client.remove_handler("SASL Failure")
        client.register_handler(Callback(
            "CCS SASL failure", MatchXPath(f"{{{_NS_SASL}}}failure"), self._on_auth_failure, instream=True,
        ))
        client.add_event_handler("session_start", self._on_session_start)
        client.add_event_handler("connection_failed", self._on_connection_failed)
        client.add_event_handler("disconnected", self._on_disconnected)
        client.add_event_handler("message_error", self._on_message_error)
        client.register_handler(Callback(
            "CCS message", MatchXPath(f"{{{_NS_CLIENT}}}message/{{{_NS_GCM}}}gcm"), self._on_gcm_message,
        ))
        self._client = client
        self._timer = loop.call_later(self._config.connect_timeout, self._connect_timed_out)
        client.connect(*self._config.address)

    def write(self, data: str) -> None:
        if self._client is None or self._closed:
            return
        # Lost with the connection, if it just went: the disconnected event
        # follows, and the actor resends what is unacked.
        with contextlib.suppress(NotConnectedError):
            self._client.send_raw(data)

    def close(self, wait: float = 1.0) -> asyncio.Future | None:
        """End the stream politely; the server's own end, or ``wait`` seconds, closes the socket."""
        if self._closed or self._client is None:
            return None
        if self._client.transport is None:
            self._finish("closed before connecting")
            return None
        return self._client.disconnect(wait=wait, reason="closed by the provider")

    def abort(self, reason: str) -> None:
        if self._client is not None and self._client.transport is not None:
            self._client.abort()
        self._finish(reason)

    def _on_session_start(self, _event: Any) -> None:
        self._started = True
        self._cancel_timer()
        self._report(_LinkReady(self.number))

    def _on_auth_failure(self, failure: Any) -> None:
        self._report(_LinkAuthRefused(self.number, failure["condition"] or "refused"))
        self._client.disconnect(wait=1.0, reason="authentication refused")

    def _on_connection_failed(self, error: Any) -> None:
        # slixmpp would retry on its own schedule; the actor owns the backoff.
        self._client.cancel_connection_attempt()
        self._finish(f"cannot connect to {self._config.host}:{self._config.address[1]}: {error}")

    def _on_disconnected(self, reason: Any) -> None:
        self._finish(str(reason) if reason else "connection closed")

    def _on_message_error(self, message: Any) -> None:
        self._report(_LinkStanzaError(self.number, message["id"], message["error"]["condition"] or "error"))

    def _on_gcm_message(self, message: Any) -> None:
        if message["type"] == "error":
            return  # an error stanza echoing our payload: _on_message_error has it
        gcm = message.xml.find(f"{{{_NS_GCM}}}gcm")
        self._report(_LinkStanza(self.number, gcm.text or ""))

    def _connect_timed_out(self) -> None:
        self._timer = None
        if not self._started:
            self.abort(f"no session within {self._config.connect_timeout:g} s")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        client = self._client
        if client is not None:
            client.cancel_connection_attempt()
            # slixmpp's send-queue task outlives the connection unless cancelled.
            sender = getattr(client, "_run_out_filters", None)
            if sender is not None:
                sender.cancel()
        self._report(_LinkClosed(self.number, reason))
