"""The API actor: does the work of the server API's requests (PROTOCOL.md 8) and answers them.

The greenlet of an HTTP connection (transports/api.py) validates a request
and tells this actor an ``ApiCall`` carrying an AsyncResult it waits on; the
actor tells the store actor what a socket's request would (a send is the very
``Append`` a ``msg.send`` makes, after an ``AddUser`` for its "from"; a token
needs the ``Register`` of ``auth.google``), and sets the AsyncResult when the
store's answer comes. One actor serves every connection: it never waits for
the store, only for short in-memory asks of the router and a user actor (who
is online), which ask nobody back.

Failure: ``on_failure`` answers every request still waiting 500 (-32603:
"a send may have been stored: retry it with its cid") and gives their sends'
places in the admission control back; the HTTP side starts a fresh actor for
the next request. A stop (server shutdown) answers them 503.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import pykka

from ..admission import SHED_EVERY_SEND, AdmissionControl
from ..identity import DeviceIdentity
from ..protocol.api import (
    NO_CONTENT,
    ApiAnswer,
    ApiSend,
    DeviceRemoval,
    TokenRequest,
    UserLookup,
    error_answer,
    ok,
)
from ..protocol.errors import InternalError, Overloaded, RpcError, UnknownRecipient
from .messages import (
    AddUser,
    ApiCall,
    ApiWaitingQuery,
    Append,
    DeviceRemovalDone,
    DeviceRemoved,
    LiveUserQuery,
    LoadUser,
    Register,
    Registered,
    RemoveDevice,
    SendResults,
    UserDevicesQuery,
    UserLoaded,
    tell_if_alive,
)

log = logging.getLogger(__name__)

ASK_TIMEOUT = 2.0  # seconds for the router or a user actor to say who is online
FAILED_SEND = ("the server failed while storing the message, which may have been stored;"
               " send it again with the same cid to have it stored once")


@dataclass(slots=True)
class _Waiting:
    answer: Any  # the AsyncResult the HTTP greenlet waits on
    request: Any
    admission: Any = None  # a send's ConnectionAdmission, told when it is answered
    device: str | None = None  # a token's device
    ttl: int = 0  # a token's lifetime


class ApiActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        store: pykka.ActorRef,
        router: pykka.ActorRef,
        authority,  # auth.JwtAuthority: mint(identity, ttl, now=...)
        new_device_id: Callable[[], str],
        admission: AdmissionControl | None = None,
        device_nodes: Callable[[str], dict[str, str]] | None = None,
    ):
        super().__init__()
        self._store = store
        self._router = router
        self._authority = authority
        self._new_device_id = new_device_id  # registration.Registrar.new_device_id
        self._admission = admission
        # In a cluster: device -> node for a user's devices connected anywhere (cluster.Presence.devices_of).
        self._device_nodes = device_nodes
        self._keys = itertools.count(1)
        self._waiting: dict[int, _Waiting] = {}

    def on_stop(self) -> None:
        self._fail_waiting(error_answer(InternalError("the server is stopping; retry later"), 503))

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._fail_waiting(None)

    def _fail_waiting(self, answer: ApiAnswer | None) -> None:
        waiting, self._waiting = self._waiting, {}
        for entry in waiting.values():
            if entry.admission is not None:
                entry.admission.release()  # its answer will never come
            failed = answer
            if failed is None:
                sent = isinstance(entry.request, ApiSend)
                failed = error_answer(InternalError(FAILED_SEND if sent else "internal error; retry later"))
            entry.answer.set(failed)

    def on_receive(self, message):
        if isinstance(message, ApiCall):
            self._on_call(message)
        elif isinstance(message, SendResults):
            for result in message.results:
                entry = self._waiting.pop(result.request_key, None)
                if entry is None:
                    continue
                if entry.admission is not None:
                    entry.admission.answered(1)
                if result.error is not None:
                    entry.answer.set(error_answer(result.error))
                else:
                    entry.answer.set(ok({"id": result.id, "ts": result.ts}))
        elif isinstance(message, Registered):
            self._on_registered(message)
        elif isinstance(message, UserLoaded):
            self._on_user_loaded(message)
        elif isinstance(message, DeviceRemovalDone):
            self._on_device_removed(message)
        elif isinstance(message, ApiWaitingQuery):
            return {"waiting": len(self._waiting)}
        return None

    # -- requests ---------------------------------------------------------------------

    def _on_call(self, call: ApiCall) -> None:
        request = call.request
        try:
            if isinstance(request, ApiSend):
                self._send(call)
                return
            self._check_store_load()
        except RpcError as error:
            call.answer.set(error_answer(error))
            return
        key = next(self._keys)
        if isinstance(request, TokenRequest):
            device = request.device or self._new_device_id()
            self._waiting[key] = _Waiting(call.answer, request, device=device, ttl=request.ttl)
            self._store.tell(Register(request.user, device, key, self.actor_ref))
        elif isinstance(request, UserLookup):
            self._waiting[key] = _Waiting(call.answer, request)
            self._store.tell(LoadUser(request.user, key, self.actor_ref))
        elif isinstance(request, DeviceRemoval):
            self._waiting[key] = _Waiting(call.answer, request)
            self._store.tell(RemoveDevice(request.user, request.device, key, self.actor_ref))
        else:
            raise TypeError(f"the API actor does not handle {type(request).__name__}")

    def _send(self, call: ApiCall) -> None:
        api_send: ApiSend = call.request
        admission = call.admission
        if admission is not None:
            refusal = admission.admit_send()  # as a device actor asks before a msg.send
            if refusal is not None:
                raise refusal
        send = api_send.send
        key = next(self._keys)
        self._waiting[key] = _Waiting(call.answer, api_send, admission=admission)
        # Both in this order in the store's inbox: the sender exists when its message is stored.
        self._store.tell(AddUser(api_send.sender))
        self._store.tell(Append(
            api_send.sender, send.to, send.message_json, send.cid, send.ttl, key, self.actor_ref, self._router,
            receipt=send.receipt, to_json=send.to_json, origin_device=None,
        ))
        if admission is not None:
            admission.sent()

    def _check_store_load(self) -> None:
        """Requests that write to the store are refused as every send is while its queue or memory is past limit."""
        control = self._admission
        if control is not None and control.overloaded in SHED_EVERY_SEND:
            raise Overloaded(f"overloaded ({control.overloaded}), retry later",
                             retry_after_ms=math.ceil(control.limits.retry_after * 1000))

    # -- answers ----------------------------------------------------------------------

    def _on_registered(self, registered: Registered) -> None:
        entry = self._waiting.pop(registered.request_key, None)
        if entry is None:
            return
        if registered.error is not None:
            entry.answer.set(error_answer(registered.error))
            return
        identity = DeviceIdentity(registered.user, registered.device, registered.registration)
        now = int(time.time())
        token = self._authority.mint(identity, entry.ttl, now=now)  # as `bin/devastator token` does
        entry.answer.set(ok({"token": token, "user": registered.user, "device": registered.device,
                             "expires": (now + entry.ttl) * 1000}))

    def _on_user_loaded(self, loaded: UserLoaded) -> None:
        entry = self._waiting.pop(loaded.request_key, None)
        if entry is None:
            return
        user = entry.request.user
        if loaded.error is not None:
            entry.answer.set(error_answer(loaded.error))
            return
        if not loaded.exists:
            entry.answer.set(error_answer(_unknown_user(user)))
            return
        online = self._online(user)
        pending = dict(loaded.pending)
        entry.answer.set(ok({
            "user": user,
            "devices": [{"device": device, "online": device in online, "pending": pending.get(device, 0)}
                        for device in loaded.devices],
        }))

    def _on_device_removed(self, done: DeviceRemovalDone) -> None:
        entry = self._waiting.pop(done.request_key, None)
        if entry is None:
            return
        user, device = entry.request.user, entry.request.device
        if done.error is not None:
            entry.answer.set(error_answer(done.error))
        elif done.unknown_user:
            entry.answer.set(error_answer(_unknown_user(user)))
        elif not done.removed:
            entry.answer.set(error_answer(UnknownRecipient(
                f"user {user!r} has no device {device!r}", data={"unknown_device": device})))
        else:
            # Its connections here close now; on other nodes (and after a failed ask) the
            # router's poll of the store's removals closes them within a second.
            live = self._user_actor(user)
            if live is not None:
                tell_if_alive(live, DeviceRemoved(device))
            entry.answer.set(NO_CONTENT)

    def _online(self, user: str) -> set[str]:
        """The user's devices connected now: here (its user actor), or on any node of a cluster."""
        online: set[str] = set()
        live = self._user_actor(user)
        if live is not None:
            # It stopped meanwhile (or is stuck): nothing of the user is connected here.
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                online.update(live.ask(UserDevicesQuery(), timeout=ASK_TIMEOUT)["devices"])
        if self._device_nodes is not None:
            try:
                online.update(self._device_nodes(user))
            except Exception as error:  # noqa: BLE001  (Redis down: what this node knows is the answer)
                log.debug("cluster presence of %s unreadable: %r", user, error)
        return online

    def _user_actor(self, user: str) -> pykka.ActorRef | None:
        try:
            return self._router.ask(LiveUserQuery(user), timeout=ASK_TIMEOUT)
        except (pykka.ActorDeadError, pykka.Timeout):
            return None


def _unknown_user(user: str) -> UnknownRecipient:
    return UnknownRecipient(f"no user {user!r}", data={"unknown": [user]})
