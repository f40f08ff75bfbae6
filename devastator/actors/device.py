"""The device actor: one per connection, speaking JSON-RPC for it.

It decodes what the transport read, answers what it can at once (``ping``,
errors), hands ``msg.send`` to the store actor and ``auth.*`` to the router,
and writes ``msg.recv`` requests for what its user actor delivers. Its outbound
side is the connection's bounded queue: a device that does not keep up is
disconnected, and its messages stay pending in the store.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Container, Protocol, Sequence

import orjson
import pykka

from .. import protocol
from ..admission import ConnectionAdmission, TokenBucket
from ..store import COPY, RECEIPT, StoredMessage
from ..identity import DeviceIdentity
from ..telemetry import Telemetry
from ..protocol import (
    Batch,
    ErrorResponse,
    Invalid,
    Notification,
    Request,
    Response,
    decode,
    encode,
    encode_batch,
    encode_batches,
)
from ..protocol.errors import (
    Forbidden,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    NotAuthenticated,
    Overloaded,
    ParseError,
    RpcError,
)
from .messages import (
    Acked,
    Append,
    Authenticated,
    AuthFailed,
    ConnectionLost,
    Deliver,
    DeliverSignal,
    HistoryLoaded,
    LoadHistory,
    MarkRead,
    ReadMarked,
    Signal,
    DeviceOffline,
    DeviceOnline,
    Inspect,
    Kicked,
    PushTokenSet,
    Received,
    Register,
    Registered,
    Replaced,
    Revoked,
    SendResults,
    SetPushToken,
    UserActorFailed,
    tell_if_alive,
)

log = logging.getLogger(__name__)

# The protocol sends a backlog in JSON-RPC batches of at most this many requests.
DELIVERY_CHUNK = 100

# Why the server closes a connection (PROTOCOL.md 7), as conn.close and WebSocket codes.
CLOSE_NORMAL = 1000
CLOSE_INVALID_DATA = 1007  # a frame that is not JSON: a protocol violation, no conn.close
CLOSE_INTERNAL_ERROR = 1011
CLOSE_OVERLOADED = 1013
CLOSE_REPLACED = 4001
CLOSE_REVOKED = 4002

# -32003 for a bound of the connection's own: its sends are answered within a commit or two.
RETRY_AFTER_ANSWERS_MS = 100


class Outbound(Protocol):
    """The transport side a device actor writes to (see transports/)."""

    remote: str
    peer_identity: DeviceIdentity | None  # named by a client certificate the handshake verified
    unsent_bytes: int  # queued, not yet written

    def send(self, bodies: Sequence[bytes]) -> None:
        """Queue JSON values to write, without blocking."""

    def close(self, code: int | None = None, reason: str = "", *, notify: bool = True) -> None:
        """Write what is queued, then close; with a code, ``conn.close`` says why (unless not ``notify``)."""


class Authority(Protocol):
    def verify(self, token: str) -> DeviceIdentity:
        """The device a valid token names; raises Forbidden."""


class Registrar(Protocol):
    """Sign-in and credentials for ``auth.google`` (see registration.py)."""

    def sign_in(self, id_token: str) -> str: ...

    def check_csr(self, csr_pem: str | None): ...

    def credentials(self, identity: DeviceIdentity, csr) -> dict: ...

    def new_device_id(self) -> str: ...


class AuthLog(Protocol):
    def warning(self, cause: str, message: str, *args) -> bool: ...


@dataclass(frozen=True)
class DeviceLimits:
    max_batch: int = 100
    max_frame_bytes: int = 1 << 20
    max_pending_requests: int = 1000
    message_limits: protocol.Limits = field(default_factory=protocol.Limits)
    history: bool = True  # msg.history is served (history_period > 0)
    signal_rate: int = 20  # msg.signal per second (a token bucket); 0: no limit
    signal_burst: int = 40
    signal_drop_bytes: int = 262144  # unsent output beyond which signals to this connection are dropped


class _BatchReply:
    """Collects the responses of one incoming batch until the last one is known."""

    __slots__ = ("responses", "missing", "sealed", "followups")

    def __init__(self) -> None:
        self.responses: list = []
        self.missing = 0
        self.sealed = False
        self.followups: list[bytes] = []

    @property
    def complete(self) -> bool:
        return self.sealed and self.missing == 0


@dataclass(slots=True)
class _Waiting:
    request_id: object
    notification: bool
    batch: _BatchReply | None


def _recv_params(m: StoredMessage) -> dict:
    """``msg.recv`` params (PROTOCOL.md 5): a COPY carries the "to" as sent, any other its recipient."""
    return {
        "id": m.id,
        "from": m.sender,
        "to": orjson.Fragment(m.to_json) if m.kind == COPY else m.recipient,
        "message": orjson.Fragment(m.message_json),
        "ts": m.ts,
        "expires": m.expires,
    }


class DeviceActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        connection: Outbound,
        router: pykka.ActorRef,
        store: pykka.ActorRef,
        authority: Authority,
        registrar: Registrar,
        auth_log: AuthLog,
        limits: DeviceLimits,
        push_platforms: Container[str] = frozenset(),
        telemetry: Telemetry | None = None,
        admission: ConnectionAdmission | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self._connection = connection
        # Asked before a msg.send or one more connection of a user is taken on (admission.py).
        self._admission = admission if admission is not None else ConnectionAdmission.unlimited()
        self._pause_reads: Callable[[float], None] | None = None  # the transport's, from its last read
        self._router = router
        self._store = store
        self._authority = authority
        self._registrar = registrar
        self._auth_log = auth_log
        self._limits = limits
        self._push_platforms = push_platforms  # those whose provider runs (push.PushPlatforms)
        self._telemetry = telemetry or Telemetry()
        self._keys = itertools.count(1)
        self._echo_ids = itertools.count(1)
        self._waiting: dict[int, _Waiting] = {}
        self._pending_sends = 0
        self._authenticating = False
        self._held: deque[Received] = deque()
        self._out: list[bytes] = []
        self.user: str | None = None
        self.device: str | None = None
        self._user_ref: pykka.ActorRef | None = None
        self._announced: tuple[str, str] | None = None  # told the router DeviceOnline for this
        # auth.google waiting for the store: request key -> the CSR to sign once registered, if any
        self._registering: dict[int, object] = {}
        # What an auth.google answer adds to user and device, by request key.
        self._issued: dict[int, dict] = {}
        self._closed = False
        self._signals = (
            TokenBucket(limits.signal_rate, limits.signal_burst, clock()) if limits.signal_rate else None
        )
        self._clock = clock

    # -- pykka ------------------------------------------------------------------

    def on_stop(self) -> None:
        if self.user is not None:
            self._telemetry.devices_authenticated -= 1
        self._connection.close(CLOSE_NORMAL, "closed by the server")

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # Cleaned up as on a stop, so that the router's counts stay true; the answers
        # made already go out, then the client reconnects (1011) and gets the rest.
        self._telemetry.actor_failures[type(self).__name__] += 1
        self._announce_offline()
        if self.user is not None:
            self._telemetry.devices_authenticated -= 1
        self._close(CLOSE_INTERNAL_ERROR, "internal error: reconnect")

    def on_receive(self, message):
        if isinstance(message, Received):
            if message.taken is not None:
                message.taken()
            self._pause_reads = message.pause
            if self._authenticating:
                self._hold(message)
            else:
                self._on_received(message)
        elif isinstance(message, SendResults):
            self._admission.answered(len(message.results))
            for result in message.results:
                self._pending_sends -= 1
                if result.error is not None:
                    self._resolve(result.request_key, error=result.error)
                else:
                    self._resolve(result.request_key, result={"id": result.id, "ts": result.ts})
        elif isinstance(message, Deliver):
            self._deliver(message)
        elif isinstance(message, DeliverSignal):
            self._deliver_signal(message)
        elif isinstance(message, ReadMarked):
            self._resolve(message.request_key, result="ACK", error=message.error)
        elif isinstance(message, HistoryLoaded):
            self._on_history(message)
        elif isinstance(message, Authenticated):
            self._on_authenticated(message)
        elif isinstance(message, PushTokenSet):
            self._resolve(message.request_key, result="ACK", error=message.error)
        elif isinstance(message, Registered):
            self._on_registered(message)
        elif isinstance(message, AuthFailed):
            self._auth_failed(message.request_key, message.error)
        elif isinstance(message, Replaced):
            log.debug("%s: device %s/%s connected again elsewhere", self._connection.remote, self.user,
                      self.device)
            self._close(CLOSE_REPLACED, "replaced: the device authenticated on another connection")
        elif isinstance(message, Revoked):
            self._close(CLOSE_REVOKED, "credentials revoked: the device was removed")
        elif isinstance(message, Kicked):
            self._close(CLOSE_NORMAL, "closed by an operator")
        elif isinstance(message, UserActorFailed):
            self._close(CLOSE_INTERNAL_ERROR, "internal error: reconnect")
        elif isinstance(message, ConnectionLost):
            self._on_connection_lost()
        elif isinstance(message, Inspect):
            return {"user": self.user, "device": self.device, "remote": self._connection.remote,
                    "pending_sends": self._pending_sends}
        self._flush()
        return None

    # -- reading ------------------------------------------------------------------

    def _hold(self, received: Received) -> None:
        # A client may pipeline requests behind its auth.*: they wait for its answer.
        self._held.append(received)
        if len(self._held) > self._limits.max_pending_requests:
            self._fail_connection(Overloaded("too many requests while authenticating",
                                             retry_after_ms=RETRY_AFTER_ANSWERS_MS), CLOSE_OVERLOADED)

    def _release_held(self) -> None:
        while self._held and not self._authenticating and not self._closed:
            self._on_received(self._held.popleft())

    def _on_received(self, received: Received) -> None:
        acked: list[str] = []
        violation = received.violation
        for index, body in enumerate(received.bodies):
            if self._closed:
                return
            if self._authenticating:
                # What was read behind an auth.* waits for its outcome, ahead of later reads.
                self._held.appendleft(Received(received.bodies[index:], None, violation))
                violation = None  # it comes with the held rest
                break
            try:
                incoming = decode(body, max_batch=self._limits.max_batch)
            except ParseError as error:
                self._fail_connection(error, CLOSE_INVALID_DATA, notify=False)
                return
            except RpcError as error:
                self._out.append(encode(self._error_response(error)))
                continue
            if isinstance(incoming, Batch):
                batch = _BatchReply()
                for item in incoming.items:
                    self._handle(item, batch, acked)
                batch.sealed = True
                self._write_batch_if_complete(batch)
            else:
                self._handle(incoming, None, acked)
        if acked and self._user_ref is not None:
            # A failed user actor tells this connection to close: those deliveries come again.
            tell_if_alive(self._user_ref, Acked(self.device, self.actor_ref, tuple(acked)))
        if violation is not None and not self._closed:
            if violation.error is not None:
                self._out.append(encode(self._error_response(violation.error)))
            self._close(violation.code, violation.reason, notify=False)

    def _handle(self, item, batch: _BatchReply | None, acked: list[str]) -> None:
        if isinstance(item, (Request, Notification)):
            self._telemetry.request(item.method)
            request_id = item.id if isinstance(item, Request) else None
            notification = isinstance(item, Notification)
            try:
                self._call(item.method, item.params, request_id, notification, batch)
            except RpcError as error:
                if not notification:
                    self._reply(batch, self._error_response(error, id=request_id))
            except Exception:
                log.exception("%s: %s failed", self._connection.remote, item.method)
                if not notification:
                    self._reply(batch, self._error_response(InternalError(), id=request_id))
        elif isinstance(item, Response):
            # The client's answer to a server request: an ACK of a msg.recv.
            if item.result == "ACK" and isinstance(item.id, str) and self.user is not None:
                acked.append(item.id)
        elif isinstance(item, Invalid):
            self._reply(batch, self._error_response(item.error, id=item.id))
        # An ErrorResponse from the client (it could not take a msg.recv) leaves the
        # delivery in flight: it is sent again after the ACK timeout.

    # -- methods ----------------------------------------------------------------------

    def _call(self, method: str, params, request_id, notification: bool, batch) -> None:
        if method == "ping":
            self._reply_result(batch, request_id, notification, "pong")
            return
        if method.startswith("auth."):
            self._authenticate(method, params, request_id, notification, batch)
            return
        if self.user is None:
            # PROTOCOL.md: any method but ping and auth.* before auth, known or not.
            raise NotAuthenticated(f"{method} needs an authenticated connection (auth.jwt or auth.cert)")
        if method == "msg.send":
            self._send(params, request_id, notification, batch)
        elif method == "msg.read":
            read = protocol.parse_read(params, self._limits.message_limits)
            key = self._wait(request_id, notification, batch)
            self._store.tell(MarkRead(self.user, read.ids, key, self.actor_ref, self._router))
        elif method == "msg.signal":
            self._signal(params, request_id, notification, batch)
        elif method == "msg.history":
            if not self._limits.history:
                raise MethodNotFound("msg.history: this server keeps no history (history_period is 0)")
            history = protocol.parse_history(params)
            key = self._wait(request_id, notification, batch)
            self._store.tell(LoadHistory(self.user, history.with_user, history.before, history.limit, key,
                                         self.actor_ref))
        elif method == "msg.echo":
            echo = protocol.parse_echo(params, self._limits.message_limits)
            self._reply_result(batch, request_id, notification, "ACK")
            request = Request("msg.echo", {"message": orjson.Fragment(echo.message_json)},
                              f"echo-{next(self._echo_ids)}")
            (batch.followups if batch is not None else self._out).append(encode(request))
        elif method == "push.register":
            register = protocol.parse_push_register(params)
            if register.platform not in self._push_platforms:
                raise InvalidParams(f"push platform {register.platform!r} is not configured on this server")
            key = self._wait(request_id, notification, batch)
            self._store.tell(
                SetPushToken(self.user, self.device, register.platform, register.token, key, self.actor_ref)
            )
        else:
            raise MethodNotFound(f"no method {method!r}")

    def _authenticate(self, method, params, request_id, notification, batch) -> None:
        if method not in ("auth.jwt", "auth.cert", "auth.google"):
            raise MethodNotFound(f"no method {method!r}")
        if self.user is not None:
            raise InvalidRequest("this connection is already authenticated")
        try:
            if method == "auth.google":
                self._register(params, request_id, notification, batch)
                return
            if method == "auth.jwt":
                identity = self._authority.verify(protocol.parse_auth_jwt(params).token)
            elif self._connection.peer_identity is None:
                raise Forbidden("no verified client certificate on this connection")
            else:
                identity = self._connection.peer_identity
        except Forbidden as error:
            self._log_refusal(method, error)
            raise
        self._go_online(identity, self._wait(request_id, notification, batch))

    def _register(self, params, request_id, notification, batch) -> None:
        google = protocol.parse_auth_google(params)
        csr = self._registrar.check_csr(google.csr)  # a bad CSR registers nothing
        # May wait for the provider's key set: nothing else is due on this connection meanwhile.
        user = self._registrar.sign_in(google.token)
        device = google.device or self._registrar.new_device_id()
        key = self._wait(request_id, notification, batch)
        self._authenticating = True
        self._registering[key] = csr
        self._store.tell(Register(user, device, key, self.actor_ref))

    def _on_registered(self, registered: Registered) -> None:
        csr = self._registering.pop(registered.request_key, None)
        if registered.error is not None:
            self._auth_failed(registered.request_key, registered.error)
            return
        identity = DeviceIdentity(registered.user, registered.device, registered.registration)
        self._issued[registered.request_key] = self._registrar.credentials(identity, csr)
        self._go_online(identity, registered.request_key)

    def _go_online(self, identity: DeviceIdentity, key: int) -> None:
        refusal = self._admission.claim(identity.user, identity.device)
        if refusal is not None:  # the user has as many connections as allowed: -32003, then 1013
            self._auth_log.warning("auth: a user has as many connections as allowed", "auth refused for %s: %s",
                                   self._connection.remote, refusal.message)
            self._auth_failed(key, refusal)
            self._close(CLOSE_OVERLOADED, refusal.message)
            return
        self._authenticating = True
        self._announced = (identity.user, identity.device)
        self._router.tell(DeviceOnline(identity.user, identity.device, identity.registration, self.actor_ref, key))

    def _on_authenticated(self, authenticated: Authenticated) -> None:
        self._authenticating = False
        self.user, self.device = authenticated.user, authenticated.device
        self._user_ref = authenticated.user_ref
        self._telemetry.devices_authenticated += 1
        issued = self._issued.pop(authenticated.request_key, None)
        result = {"user": self.user, "device": self.device}
        if issued is None:
            result["pending"] = authenticated.pending
        else:
            result.update(issued)
        self._resolve(authenticated.request_key, result=result)
        self._release_held()

    def _auth_failed(self, key: int, error: RpcError) -> None:
        self._authenticating = False
        self._issued.pop(key, None)
        self._announce_offline()
        if isinstance(error, Forbidden):
            self._log_refusal("auth", error)
        self._resolve(key, error=error)
        self._release_held()

    def _log_refusal(self, method: str, error: RpcError) -> None:
        self._telemetry.auth_failures += 1
        self._auth_log.warning(
            f"{method}: {error.message}", "%s refused for %s: %s", method, self._connection.remote, error.message
        )

    def _send(self, params, request_id, notification, batch) -> None:
        refusal = self._admission.admit_send()  # before any work is spent on it
        if refusal is not None:
            if self._pause_reads is not None:  # what the client sends before then waits, unread
                self._pause_reads(refusal.retry_after_ms / 1000)
            raise refusal
        send = protocol.parse_send(params, self._limits.message_limits)
        if self._pending_sends >= self._limits.max_pending_requests:
            raise Overloaded(f"more than {self._limits.max_pending_requests} sends awaiting their answer",
                             retry_after_ms=RETRY_AFTER_ANSWERS_MS)
        self._pending_sends += 1
        key = self._wait(request_id, notification, batch)
        self._store.tell(
            Append(self.user, send.to, send.message_json, send.cid, send.ttl, key, self.actor_ref, self._router,
                   send.receipt, send.to_json, self.device)
        )
        self._admission.sent()

    def _signal(self, params, request_id, notification, batch) -> None:
        signal = protocol.parse_signal(params, self._limits.message_limits)
        bucket = self._signals
        if bucket is not None:
            now = self._clock()
            if bucket.refill(now, 1.0) < 1.0:
                self._telemetry.signals_dropped["rate"] += 1
                raise Overloaded(
                    f"more than {self._limits.signal_rate} signals a second",
                    retry_after_ms=max(1, round(1000 * bucket.seconds_to_half_full(1.0))),
                )
            bucket.tokens -= 1.0
        self._telemetry.signals_accepted += 1
        ts = int(time.time() * 1000)
        self._router.tell(Signal(self.user, signal.to, signal.signal_json, ts, self.actor_ref))
        self._reply_result(batch, request_id, notification, "ACK")

    def _on_history(self, loaded: HistoryLoaded) -> None:
        if loaded.error is not None:
            self._resolve(loaded.request_key, error=loaded.error)
            return
        self._telemetry.history_pages += 1
        self._resolve(
            loaded.request_key,
            result={"messages": [_recv_params(m) for m in loaded.messages], "more": loaded.more},
        )

    # -- answering -------------------------------------------------------------------

    def _wait(self, request_id, notification: bool, batch: _BatchReply | None) -> int:
        key = next(self._keys)
        self._waiting[key] = _Waiting(request_id, notification, batch)
        if batch is not None and not notification:
            batch.missing += 1
        return key

    def _resolve(self, key: int, *, result=None, error: RpcError | None = None) -> None:
        waiting = self._waiting.pop(key, None)
        if waiting is None or waiting.notification:
            return
        if error is not None:
            response = self._error_response(error, id=waiting.request_id)
        else:
            response = Response(waiting.request_id, result)
        batch = waiting.batch
        if batch is None:
            self._out.append(encode(response))
            return
        batch.responses.append(response)
        batch.missing -= 1
        self._write_batch_if_complete(batch)

    def _error_response(self, error: RpcError, **request_id) -> ErrorResponse:
        """The error answer (``id=`` the request's, else the error's own), counted."""
        self._telemetry.errors[error.code] += 1
        return ErrorResponse.from_error(error, **request_id)

    def _reply_result(self, batch, request_id, notification: bool, result) -> None:
        if not notification:
            self._reply(batch, Response(request_id, result))

    def _reply(self, batch: _BatchReply | None, response) -> None:
        if batch is None:
            self._out.append(encode(response))
        else:
            batch.responses.append(response)

    def _write_batch_if_complete(self, batch: _BatchReply) -> None:
        if not batch.complete:
            return
        if batch.responses:  # a batch of notifications only gets no answer at all
            self._out.append(encode_batch(batch.responses))
        self._out.extend(batch.followups)

    # -- delivering ---------------------------------------------------------------------

    def _deliver(self, deliver: Deliver) -> None:
        requests = [
            Request("msg.receipt", orjson.Fragment(m.message_json), m.id) if m.kind == RECEIPT
            else Request("msg.recv", _recv_params(m), m.id)
            for m in deliver.messages
        ]
        if deliver.as_batch:
            self._out.extend(
                encode_batches(requests, max_items=DELIVERY_CHUNK, max_bytes=self._limits.max_frame_bytes)
            )
        else:
            self._out.extend(encode(request) for request in requests)

    def _deliver_signal(self, signal: DeliverSignal) -> None:
        if self._closed or self._connection.unsent_bytes > self._limits.signal_drop_bytes:
            # Ephemeral: a connection behind on its output gets its messages first, and no signals.
            self._telemetry.signals_dropped["slow_consumer"] += 1
            return
        self._telemetry.signals_delivered += 1
        self._out.append(encode(Notification("msg.signal", {
            "from": signal.sender,
            "to": signal.recipient,
            "signal": orjson.Fragment(signal.signal_json),
            "ts": signal.ts,
        })))

    def _flush(self) -> None:
        if self._out and not self._closed:
            out, self._out = self._out, []
            self._connection.send(out)

    # -- ending -------------------------------------------------------------------------

    def _fail_connection(self, error: RpcError, code: int, *, notify: bool = True) -> None:
        """One error reply, then the connection closes with ``code``."""
        self._out.append(encode(self._error_response(error)))
        self._close(code, error.message, notify=notify)

    def _close(self, code: int, reason: str, *, notify: bool = True) -> None:
        self._flush()
        self._closed = True
        self._connection.close(code, reason, notify=notify)

    def _on_connection_lost(self) -> None:
        self._closed = True
        self._announce_offline()
        self.stop()

    def _announce_offline(self) -> None:
        # Balances the DeviceOnline, also for an auth that failed or never finished.
        if self._announced is not None:
            user, device = self._announced
            self._announced = None
            self._admission.release()
            tell_if_alive(self._router, DeviceOffline(user, device, self.actor_ref))

