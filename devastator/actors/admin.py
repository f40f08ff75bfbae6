"""The admin actor: one per console connection on the admin socket, answering operators' calls.

It reads the same JSON-RPC as a device actor, through the same session
(``protocol.session.ServerSession``, configured open: no auth, no batches),
but its methods look at and steer the server: list the live actors, inspect
a user or a device, the figures, close a user's connections, send a message
as "system", expire a user's messages, and watch a user's deliveries live. Nothing asks it, so it
may ask the actors below it (router, user, device, store) and wait.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pykka

from .. import protocol
from ..protocol.errors import InternalError, InvalidParams, MethodNotFound, RpcError
from ..protocol.session import Call, Close, ServerSession, SessionConfig
from .messages import (
    Append,
    ConnectionLost,
    ExpireUser,
    ForgetInFlight,
    ConnectionQuery,
    DeviceRefsQuery,
    LiveUserQuery,
    PendingQuery,
    StoredUserQuery,
    UserDevicesQuery,
    Kick,
    Received,
    SendResults,
    Unwatch,
    UserExpired,
    Watch,
    WatchEvent,
    tell_if_alive,
)

log = logging.getLogger(__name__)

SYSTEM_SENDER = "system"
ASK_TIMEOUT = 5.0
PENDING_SHOWN = 20
DEFAULT_ACTORS_LIMIT = 1000


class AdminActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        connection,
        router: pykka.ActorRef,
        store: pykka.ActorRef,
        snapshot: Callable[[], dict],
        node: str,
        message_limits: protocol.Limits,
        max_batch: int = 100,
        device_nodes: Callable[[str], dict[str, str]] | None = None,
    ):
        super().__init__()
        self._connection = connection
        self._router = router
        self._store = store
        self._snapshot = snapshot  # the server's figures (operations.Operations.snapshot)
        self._node = node
        self._limits = message_limits
        self._max_batch = max_batch
        # In a cluster: device -> node for a user's connected devices (cluster.Presence.devices_of).
        self._device_nodes = device_nodes
        self._session = ServerSession(SessionConfig(
            max_batch=max_batch, auth_methods=None, batches=False,
            no_batches_message="the admin endpoint takes no batches", close_on_parse_error=None,
        ))
        self._expiring: dict[int, str] = {}  # request key -> user
        self._watching: set[str] = set()

    def on_stop(self) -> None:
        for user in self._watching:
            tell_if_alive(self._router, Unwatch(user, self.actor_ref))  # the router stops after us at shutdown
        self._connection.close()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self.on_stop()  # the console is disconnected, the server goes on

    def on_receive(self, message):
        if isinstance(message, Received):
            if message.taken is not None:
                message.taken()
            self._session.receive(message.bodies, message.violation)
            self._take_events()
        elif isinstance(message, SendResults):
            for result in message.results:
                if result.error is not None:
                    self._session.resolve(result.request_key, error=result.error)
                else:
                    self._session.resolve(result.request_key, result={"id": result.id, "ts": result.ts})
        elif isinstance(message, UserExpired):
            user = self._expiring.pop(message.request_key, None)
            live = self._user_actor(user) if user else None
            if live is not None:
                tell_if_alive(live, ForgetInFlight())  # it may have gone idle meanwhile
            self._session.resolve(message.request_key, result={"expired": message.count})
        elif isinstance(message, WatchEvent):
            self._on_watch_event(message)
        elif isinstance(message, ConnectionLost):
            self._session.close()
            self.stop()
        self._flush()
        return None

    # -- JSON-RPC -------------------------------------------------------------------------

    def _take_events(self) -> None:
        session = self._session
        while (event := session.next_event()) is not None:
            if type(event) is Call:
                self._on_call(event)
                self._flush()  # each answer as soon as it is known: a later call may wait on asks
            elif type(event) is Close:  # not JSON, or a framing violation: answered, then closed
                self._flush()
                self._connection.close()
            # A response from the console answers nothing we asked: ignored.

    def _on_call(self, call: Call) -> None:
        if call.id is None:
            call.notification = True  # the admin endpoint has never answered a null id
        try:
            result = self._call(call.method, call.params or {}, call)
        except RpcError as error:
            self._session.refuse(call, error)
        except Exception:
            log.exception("admin %s failed", call.method)
            self._session.refuse(call, InternalError())
        else:
            if result is not _LATER:
                self._session.answer(call, result)

    def _flush(self) -> None:
        out = self._session.data_to_send()
        if out:
            self._connection.send(out)

    # -- methods ------------------------------------------------------------------------------

    def _call(self, method: str, params, call: Call):
        if not isinstance(params, dict):
            raise InvalidParams("params must be an object")
        handler = _METHODS.get(method)
        if handler is None:
            raise MethodNotFound(f"no admin method {method!r}; try one of {', '.join(sorted(_METHODS))}")
        return handler(self, params, call)

    def _ping(self, params, call: Call):
        return "pong"

    def _stats(self, params, call: Call):
        return self._snapshot()

    def _actors(self, params, call: Call):
        limit = params.get("limit", DEFAULT_ACTORS_LIMIT)
        if type(limit) is not int or limit < 0:
            raise InvalidParams('"limit" must be a non-negative integer')
        refs = pykka.ActorRegistry.get_all()
        kinds: dict[str, dict[str, int]] = {}
        listed = []
        for ref in refs:
            kind = ref.actor_class.__name__
            inbox = ref.actor_inbox.qsize()
            figures = kinds.setdefault(kind, {"count": 0, "inbox": 0})
            figures["count"] += 1
            figures["inbox"] += inbox
            if len(listed) < limit:
                listed.append(self._describe(ref, kind, inbox))
        listed.sort(key=lambda actor: (actor["kind"], actor["id"]))
        return {"node": self._node, "kinds": dict(sorted(kinds.items())), "actors": listed,
                "truncated": len(refs) > limit}

    def _describe(self, ref: pykka.ActorRef, kind: str, inbox: int) -> dict:
        described = {"kind": kind, "id": kind, "inbox": inbox}
        if ref == self.actor_ref or kind not in ("UserActor", "DeviceActor"):
            return described
        try:
            inspected = ref.ask(UserDevicesQuery() if kind == "UserActor" else ConnectionQuery(), timeout=ASK_TIMEOUT)
        except (pykka.ActorDeadError, pykka.Timeout):
            return described
        if kind == "UserActor":
            described["id"] = inspected["user"]
        else:
            user, device = inspected["user"], inspected["device"]
            described["id"] = f"{user}/{device}" if user else "(not authenticated)"
            described["remote"] = inspected["remote"]
        return described

    def _user(self, params, call: Call):
        user = _required(params, "user")
        view, _ = self._user_view(user)
        return {"user": user, **view}

    def _user_view(self, user: str) -> tuple[dict, pykka.ActorRef | None]:
        """What the store and the live user actor say of the user's devices, and that actor."""
        stored = self._store.ask(StoredUserQuery(user), timeout=ASK_TIMEOUT)
        if not stored["exists"]:
            raise InvalidParams(f"no user {user!r}")
        live_ref = self._user_actor(user)
        live = live_ref.ask(UserDevicesQuery(), timeout=ASK_TIMEOUT) if live_ref is not None else {"devices": {}}
        now_ms = time.time() * 1000
        nodes = self._device_nodes(user) if self._device_nodes is not None else {}
        devices = []
        for record in stored["devices"]:
            count, oldest = stored["backlog"].get(record.device, (0, None))
            online = live["devices"].get(record.device)
            node = nodes.get(record.device) or (self._node if online is not None else None)
            devices.append({
                "device": record.device,
                "registered": record.created,
                "first_authenticated": record.attached,
                "online": node is not None,
                "node": node,
                "pending": count,
                "oldest_pending_age_seconds": None if oldest is None else round((now_ms - oldest) / 1000, 3),
                "in_flight": online["in_flight"] if online else 0,
                "push_platform": record.push_platform,
                "push_token": record.push_token,
            })
        return {"live": live_ref is not None, "devices": devices}, live_ref

    def _device(self, params, call: Call):
        user, device = _required(params, "user"), _required(params, "device")
        view, live_ref = self._user_view(user)
        entry = next((d for d in view["devices"] if d["device"] == device), None)
        if entry is None:
            raise InvalidParams(f"user {user!r} has no device {device!r}")
        remote = None
        if live_ref is not None and entry["online"]:
            device_ref = live_ref.ask(DeviceRefsQuery(), timeout=ASK_TIMEOUT).get(device)
            if device_ref is not None:
                try:
                    remote = device_ref.ask(ConnectionQuery(), timeout=ASK_TIMEOUT)["remote"]
                except (pykka.ActorDeadError, pykka.Timeout):
                    remote = None
        pending = self._store.ask(PendingQuery(user, device, PENDING_SHOWN), timeout=ASK_TIMEOUT)
        return {
            "user": user,
            **entry,
            "remote": remote,
            "pending_messages": [
                {"id": m.id, "from": m.sender, "ts": m.ts, "expires": m.expires, "bytes": len(m.message_json)}
                for m in pending["messages"]
            ],
        }

    def _kick(self, params, call: Call):
        user = _required(params, "user")
        device = params.get("device")
        if device is not None and not isinstance(device, str):
            raise InvalidParams('"device" must be a string')
        live_ref = self._user_actor(user)
        if live_ref is None:
            return {"closed": 0}
        return {"closed": live_ref.ask(Kick(device), timeout=ASK_TIMEOUT)}

    def _send(self, params, call: Call):
        send = protocol.parse_send(params, self._limits)
        key = self._session.defer(call)
        self._store.tell(
            Append(SYSTEM_SENDER, send.to, send.message_json, None, send.ttl, key, self.actor_ref, self._router)
        )
        return _LATER

    def _expire(self, params, call: Call):
        user = _required(params, "user")
        key = self._session.defer(call)
        self._expiring[key] = user
        self._store.tell(ExpireUser(user, key, self.actor_ref))
        return _LATER

    def _watch(self, params, call: Call):
        user = _required(params, "user")
        if user not in self._watching:
            self._watching.add(user)
            self._router.tell(Watch(user, self.actor_ref))
        return "ACK"

    def _unwatch(self, params, call: Call):
        user = _required(params, "user")
        if user in self._watching:
            self._watching.discard(user)
            self._router.tell(Unwatch(user, self.actor_ref))
        return "ACK"

    def _on_watch_event(self, event: WatchEvent) -> None:
        if event.user not in self._watching:
            return
        base = {"user": event.user, "event": event.event, "ts": event.ts}
        if event.device is not None:
            base["device"] = event.device
        for message_id in event.ids or (None,):
            params = dict(base) if message_id is None else {**base, "id": message_id}
            self._session.notify("watch.event", params)

    def _user_actor(self, user: str) -> pykka.ActorRef | None:
        return self._router.ask(LiveUserQuery(user), timeout=ASK_TIMEOUT)


_LATER = object()  # the answer is written when the store replies

_METHODS = {
    "ping": AdminActor._ping,
    "stats": AdminActor._stats,
    "actors": AdminActor._actors,
    "user": AdminActor._user,
    "device": AdminActor._device,
    "kick": AdminActor._kick,
    "send": AdminActor._send,
    "expire": AdminActor._expire,
    "watch": AdminActor._watch,
    "unwatch": AdminActor._unwatch,
}


def _required(params: dict, name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidParams(f'"{name}" must be a non-empty string')
    return value
