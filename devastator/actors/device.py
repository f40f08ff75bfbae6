"""The device actor: one per connection, acting on its JSON-RPC session.

The connection's ``protocol.session.ServerSession`` decodes what the
transport read and decides what the protocol decides (auth gating, requests
held behind an ``auth.*``, batch answers, the pending bound, error codes);
this actor acts on the session's events: it answers ``ping``, hands
``msg.send`` to the store actor and ``auth.*`` to the router, feeds their
outcomes back, and has the session write ``msg.recv`` requests for what its
user actor delivers. Its outbound side is the connection's bounded queue: a
device that does not keep up is disconnected, and its messages stay pending
in the store.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Container, Protocol, Sequence

import orjson
import pykka

from .. import protocol
from ..admission import ConnectionAdmission, TokenBucket
from ..store import COPY, RECEIPT, StoredMessage
from ..identity import DeviceIdentity
from ..telemetry import Telemetry
from ..protocol import Request
from .runtime import GreenletActor
from ..protocol.errors import Forbidden, InternalError, InvalidParams, MethodNotFound, Overloaded, RpcError
from ..protocol.session import (
    AUTH,
    CLOSE_INVALID_DATA,
    CLOSE_OVERLOADED,
    DELIVERY_CHUNK,
    PING,
    RETRY_AFTER_ANSWERS_MS,
    Acks,
    Call,
    Close,
    ServerSession,
    SessionConfig,
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
    ConnectionQuery,
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
from ..protocol.close_codes import CLOSE_INTERNAL_ERROR, CLOSE_NORMAL, CLOSE_REPLACED, CLOSE_REVOKED

log = logging.getLogger(__name__)

__all__ = ["DeviceActor", "DeviceLimits", "DELIVERY_CHUNK", "CLOSE_INVALID_DATA", "CLOSE_OVERLOADED",
           "RETRY_AFTER_ANSWERS_MS"]


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


class DeviceActor(GreenletActor):
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
        # The JSON-RPC state of the connection: what is held, waited for, refused, written.
        self._session = ServerSession(
            SessionConfig(max_batch=limits.max_batch, max_frame_bytes=limits.max_frame_bytes,
                          max_pending_requests=limits.max_pending_requests),
            on_request=self._telemetry.request,
            on_error=self._count_error,
        )
        self.user: str | None = None
        self.device: str | None = None
        self._user_ref: pykka.ActorRef | None = None
        self._announced: tuple[str, str] | None = None  # told the router DeviceOnline for this
        # auth.google waiting for the store: request key -> the CSR to sign once registered, if any
        self._registering: dict[int, object] = {}
        # What an auth.google answer adds to user and device, by request key.
        self._issued: dict[int, dict] = {}
        self._signals = (
            TokenBucket(limits.signal_rate, limits.signal_burst, clock()) if limits.signal_rate else None
        )
        self._clock = clock

    def _count_error(self, code: int) -> None:
        self._telemetry.errors[code] += 1

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
            self._session.receive(message.bodies, message.violation)
            self._take_events()
        elif isinstance(message, SendResults):
            self._admission.answered(len(message.results))
            resolve = self._session.resolve
            for result in message.results:
                if result.error is not None:
                    resolve(result.request_key, error=result.error)
                else:
                    resolve(result.request_key, result={"id": result.id, "ts": result.ts})
        elif isinstance(message, Deliver):
            self._deliver(message)
        elif isinstance(message, DeliverSignal):
            self._deliver_signal(message)
        elif isinstance(message, ReadMarked):
            self._session.resolve(message.request_key, result="ACK", error=message.error)
        elif isinstance(message, HistoryLoaded):
            self._on_history(message)
        elif isinstance(message, Authenticated):
            self._on_authenticated(message)
        elif isinstance(message, PushTokenSet):
            self._session.resolve(message.request_key, result="ACK", error=message.error)
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
        elif isinstance(message, ConnectionQuery):
            return {"user": self.user, "device": self.device, "remote": self._connection.remote,
                    "pending_sends": self._session.pending_bounded}
        self._flush()
        return None

    # -- reading ------------------------------------------------------------------

    def _take_events(self) -> None:
        """Act on what the session decoded; it holds what waits for an auth.* outcome."""
        session = self._session
        while (event := session.next_event()) is not None:
            kind = type(event)
            if kind is Call:
                self._on_call(event)
            elif kind is Acks:
                if self._user_ref is not None:
                    # A failed user actor tells this connection to close: those deliveries come again.
                    tell_if_alive(self._user_ref, Acked(self.device, self.actor_ref, event))
            elif kind is Close:
                self._close(event.code, event.reason, notify=event.notify)
            # An ErrorResponse from the client (it could not take a msg.recv) leaves the
            # delivery in flight: it is sent again after the ACK timeout.

    # -- methods ----------------------------------------------------------------------

    def _on_call(self, call: Call) -> None:
        try:
            if call.kind is PING:
                self._session.answer(call, "pong")
            elif call.kind is AUTH:
                self._authenticate(call)
            else:
                handler = _METHODS.get(call.method)
                if handler is None:
                    raise MethodNotFound(f"no method {call.method!r}")
                handler(self, call)
        except RpcError as error:
            self._session.refuse(call, error)
        except Exception:
            log.exception("%s: %s failed", self._connection.remote, call.method)
            self._session.refuse(call, InternalError())

    def _read(self, call: Call) -> None:
        read = protocol.parse_read(call.params, self._limits.message_limits)
        key = self._session.defer(call)
        self._store.tell(MarkRead(self.user, read.ids, key, self.actor_ref, self._router))

    def _history(self, call: Call) -> None:
        if not self._limits.history:
            raise MethodNotFound("msg.history: this server keeps no history (history_period is 0)")
        history = protocol.parse_history(call.params)
        key = self._session.defer(call)
        self._store.tell(LoadHistory(self.user, history.with_user, history.before, history.limit, key,
                                     self.actor_ref))

    def _echo(self, call: Call) -> None:
        echo = protocol.parse_echo(call.params, self._limits.message_limits)
        self._session.answer(call, "ACK")
        self._session.echo(call, echo.message_json)

    def _push_register(self, call: Call) -> None:
        register = protocol.parse_push_register(call.params)
        if register.platform not in self._push_platforms:
            raise InvalidParams(f"push platform {register.platform!r} is not configured on this server")
        key = self._session.defer(call)
        self._store.tell(
            SetPushToken(self.user, self.device, register.platform, register.token, key, self.actor_ref)
        )

    def _authenticate(self, call: Call) -> None:
        # The session passes on the auth.* methods it knows, on a connection not authenticated yet.
        method = call.method
        try:
            if method == "auth.google":
                self._register(call)
                return
            if method == "auth.jwt":
                identity = self._authority.verify(protocol.parse_auth_jwt(call.params).token)
            elif self._connection.peer_identity is None:
                raise Forbidden("no verified client certificate on this connection")
            else:
                identity = self._connection.peer_identity
        except Forbidden as error:
            self._log_refusal(method, error)
            raise
        self._go_online(identity, self._session.defer(call))

    def _register(self, call: Call) -> None:
        google = protocol.parse_auth_google(call.params)
        csr = self._registrar.check_csr(google.csr)  # a bad CSR registers nothing
        # May wait for the provider's key set: nothing else is due on this connection meanwhile.
        user = self._registrar.sign_in(google.token)
        device = google.device or self._registrar.new_device_id()
        key = self._session.defer(call)
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
        self._announced = (identity.user, identity.device)
        self._router.tell(DeviceOnline(identity.user, identity.device, identity.registration, self.actor_ref, key))

    def _on_authenticated(self, authenticated: Authenticated) -> None:
        self.user, self.device = authenticated.user, authenticated.device
        self._user_ref = authenticated.user_ref
        self._telemetry.devices_authenticated += 1
        issued = self._issued.pop(authenticated.request_key, None)
        result = {"user": self.user, "device": self.device}
        if issued is None:
            result["pending"] = authenticated.pending
        else:
            result.update(issued)
        self._session.auth_succeeded(authenticated.request_key, result)
        self._take_events()  # what was read behind the auth.*, in order

    def _auth_failed(self, key: int, error: RpcError) -> None:
        self._issued.pop(key, None)
        self._announce_offline()
        if isinstance(error, Forbidden):
            self._log_refusal("auth", error)
        self._session.auth_failed(key, error)
        self._take_events()  # what was read behind the auth.*: now refused, in order

    def _log_refusal(self, method: str, error: RpcError) -> None:
        self._telemetry.auth_failures += 1
        self._auth_log.warning(
            f"{method}: {error.message}", "%s refused for %s: %s", method, self._connection.remote, error.message
        )

    def _send(self, call: Call) -> None:
        refusal = self._admission.admit_send()  # before any work is spent on it
        if refusal is not None:
            if self._pause_reads is not None:  # what the client sends before then waits, unread
                self._pause_reads(refusal.retry_after_ms / 1000)
            raise refusal
        send = protocol.parse_send(call.params, self._limits.message_limits)
        key = self._session.defer(call, bounded=True)  # -32003 past max_pending_requests
        self._store.tell(
            Append(self.user, send.to, send.message_json, send.cid, send.ttl, key, self.actor_ref, self._router,
                   send.receipt, send.to_json, self.device)
        )
        self._admission.sent()

    def _signal(self, call: Call) -> None:
        signal = protocol.parse_signal(call.params, self._limits.message_limits)
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
        self._session.answer(call, "ACK")

    def _on_history(self, loaded: HistoryLoaded) -> None:
        if loaded.error is not None:
            self._session.resolve(loaded.request_key, error=loaded.error)
            return
        self._telemetry.history_pages += 1
        self._session.resolve(
            loaded.request_key,
            result={"messages": [_recv_params(m) for m in loaded.messages], "more": loaded.more},
        )

    # -- delivering ---------------------------------------------------------------------

    def _deliver(self, deliver: Deliver) -> None:
        if not deliver.as_batch:  # live messages, one by one: the usual case
            send_request = self._session.send_request
            for m in deliver.messages:
                if m.kind == RECEIPT:
                    send_request("msg.receipt", orjson.Fragment(m.message_json), m.id)
                else:
                    send_request("msg.recv", _recv_params(m), m.id)
            return
        requests = [
            Request("msg.receipt", orjson.Fragment(m.message_json), m.id) if m.kind == RECEIPT
            else Request("msg.recv", _recv_params(m), m.id)
            for m in deliver.messages
        ]
        self._session.send_requests(requests, as_batch=True)

    def _deliver_signal(self, signal: DeliverSignal) -> None:
        if self._session.closed or self._connection.unsent_bytes > self._limits.signal_drop_bytes:
            # Ephemeral: a connection behind on its output gets its messages first, and no signals.
            self._telemetry.signals_dropped["slow_consumer"] += 1
            return
        self._telemetry.signals_delivered += 1
        self._session.notify("msg.signal", {
            "from": signal.sender,
            "to": signal.recipient,
            "signal": orjson.Fragment(signal.signal_json),
            "ts": signal.ts,
        })

    def _flush(self) -> None:
        if self._session.outgoing:  # nothing once the session is closed
            self._connection.send(self._session.data_to_send())

    # -- ending -------------------------------------------------------------------------

    def _close(self, code: int, reason: str, *, notify: bool = True) -> None:
        self._flush()
        self._session.close()
        self._connection.close(code, reason, notify=notify)

    def _on_connection_lost(self) -> None:
        self._session.close()
        self._announce_offline()
        self.stop()

    def _announce_offline(self) -> None:
        # Balances the DeviceOnline, also for an auth that failed or never finished.
        if self._announced is not None:
            user, device = self._announced
            self._announced = None
            self._admission.release()
            tell_if_alive(self._router, DeviceOffline(user, device, self.actor_ref))



# The methods of an authenticated connection beyond ping and auth.* (PROTOCOL.md 4).
_METHODS: dict[str, Callable[[DeviceActor, Call], None]] = {
    "msg.send": DeviceActor._send,
    "msg.read": DeviceActor._read,
    "msg.signal": DeviceActor._signal,
    "msg.history": DeviceActor._history,
    "msg.echo": DeviceActor._echo,
    "push.register": DeviceActor._push_register,
}
