"""The messages actors tell each other: small frozen dataclasses, never dicts.

A message that expects an answer names the actor to answer (``reply_to``), so
that no actor ever blocks on another: the answer is one more message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pykka import ActorDeadError, ActorRef

from ..protocol.errors import RpcError
from ..store import PushTarget, StoredMessage


# -- transport -> device ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """JSON values (one per frame) read from the connection, in order.

    ``taken`` is called when the device actor picks it up: the reader reads on
    only while few of its reads wait in the actor's inbox (see transports/).
    ``pause(seconds)`` holds the reader back: the device actor refused a
    ``msg.send`` and told the client to retry after that long.
    """

    bodies: tuple[bytes | str, ...]
    taken: Callable[[], None] | None = None
    violation: ProtocolViolation | None = None  # read after the bodies; the connection ends with it
    pause: Callable[[float], None] | None = None


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The transport read something it cannot frame (PROTOCOL.md 2, RFC 6455).

    It comes after the bodies read before it, so that their answers go out
    first; then ``error`` is answered (when there is a JSON-RPC error for it)
    and the connection closes with ``code``, without ``conn.close``.
    """

    code: int
    reason: str
    error: RpcError | None = None


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    reason: str


# -- device -> store -> device/router ------------------------------------------


@dataclass(frozen=True, slots=True)
class Append:
    """Store a ``msg.send``; answer ``reply_to`` with SendResults, tell ``notify`` Committed.

    Made by a device actor for a socket's ``msg.send`` and by the API actor for
    ``POST /api/v1/send``: one path to the store for both.
    """

    sender: str
    recipients: tuple[str, ...]
    message_json: bytes
    cid: str | None
    ttl: int
    request_key: int
    reply_to: ActorRef
    notify: ActorRef
    receipt: bool = False  # the sender asked for receipts
    to_json: bytes = b""  # "to" as sent (copies carry it); empty: the recipients as a list
    # The device that sent it, which gets no copy; None (the server API): every device of the sender gets one.
    origin_device: str | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    request_key: int
    id: str | None = None
    ts: int | None = None
    error: RpcError | None = None


@dataclass(frozen=True, slots=True)
class SendResults:
    results: tuple[SendResult, ...]


@dataclass(frozen=True, slots=True)
class Committed:
    """Mailbox entries made durable, in acceptance order."""

    messages: tuple[StoredMessage, ...]
    # Devices of the recipients with push tokens: the router wakes the offline ones.
    push_targets: tuple[tuple[PushTarget, StoredMessage], ...] = ()
    # Users whose mailboxes may hold messages nobody was told of (the store could
    # not say whether a send landed): their user actors read the store again.
    recheck: tuple[str, ...] = ()


# -- device -> router -> user --------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceOnline:
    """A connection presents credentials for a device; the store checks ``registration``."""

    user: str
    device: str
    registration: str
    device_ref: ActorRef
    request_key: int


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    user: str
    device: str
    device_ref: ActorRef


# -- user -> store -> user -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttachDevice:
    user: str
    device: str
    registration: str
    device_ref: ActorRef
    request_key: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class DeviceAttached:
    device: str
    device_ref: ActorRef
    request_key: int
    pending: int = 0
    error: RpcError | None = None


@dataclass(frozen=True, slots=True)
class LoadPending:
    user: str
    device: str
    after_seq: int
    limit: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class PendingLoaded:
    device: str
    after_seq: int
    messages: tuple[StoredMessage, ...]
    complete: bool  # fewer than the limit came back: nothing more waits in the store
    failed: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    """The device has these deliveries; receipts they make are told to ``notify`` as Committed."""

    user: str
    device: str
    seqs: tuple[int, ...]
    notify: ActorRef | None = None


@dataclass(frozen=True, slots=True)
class MarkRead:
    """``msg.read``: store read receipts; answer ``reply_to`` ReadMarked, tell ``notify`` Committed."""

    user: str
    ids: tuple[str, ...]
    request_key: int
    reply_to: ActorRef
    notify: ActorRef


@dataclass(frozen=True, slots=True)
class ReadMarked:
    request_key: int
    error: RpcError | None = None


@dataclass(frozen=True, slots=True)
class LoadHistory:
    """``msg.history``: a page of the conversation of ``user`` with ``peer``, newest first."""

    user: str
    peer: str
    before: str | None
    limit: int
    request_key: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class HistoryLoaded:
    request_key: int
    messages: tuple[StoredMessage, ...] = ()
    more: bool = False
    error: RpcError | None = None


@dataclass(frozen=True, slots=True)
class PurgeExpired:
    pass


# -- registration: device -> store -> device --------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    """Create the user if new and register the device (``auth.google``)."""

    user: str
    device: str
    request_key: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class Registered:
    request_key: int
    user: str
    device: str
    registration: str | None = None
    error: RpcError | None = None


# -- push tokens: device -> store -> device; push dispatcher -> store ----------------


@dataclass(frozen=True, slots=True)
class SetPushToken:
    user: str
    device: str
    platform: str
    token: str
    request_key: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class PushTokenSet:
    request_key: int
    error: RpcError | None = None


@dataclass(frozen=True, slots=True)
class RemovePushToken:
    """The platform said the token is dead; forget it unless the device has a new one."""

    target: PushTarget


@dataclass(frozen=True, slots=True)
class FindPushDevice:
    """Whose is this push token? (An upstream message names only its sender's token.)"""

    platform: str
    token: str
    request_key: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class PushDeviceFound:
    request_key: int
    user: str | None  # None: no device holds the token
    device: str | None


# -- waking offline devices: router -> push dispatcher ------------------------------


@dataclass(frozen=True, slots=True)
class WakeDevices:
    """Messages were stored for these offline devices: each (target, newest message)."""

    targets: tuple[tuple[PushTarget, StoredMessage], ...]


@dataclass(frozen=True, slots=True)
class DeviceReachable:
    """The device connected: the next message after it leaves is worth a push again."""

    user: str
    device: str


# -- removed devices: router -> store -> router -> user -> device -------------------


@dataclass(frozen=True, slots=True)
class PollRemovals:
    after: int | None  # the cursor of the last answer; None: start from now
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class DevicesRemoved:
    cursor: int | None
    devices: tuple[tuple[str, str], ...]  # (user, device)


@dataclass(frozen=True, slots=True)
class DeviceRemoved:
    device: str


@dataclass(frozen=True, slots=True)
class Revoked:
    """The device was removed: its connection closes."""


# -- signals: device -> router -> user -> device; router <-> cluster actor ------------


@dataclass(frozen=True, slots=True)
class Signal:
    """A ``msg.signal``: handed to the recipients' devices online now, never stored.

    ``origin`` is the connection that sent it (it gets no echo of its own), or
    None when it came from another node.
    """

    sender: str
    recipients: tuple[str, ...]
    signal_json: bytes
    ts: int  # ms since the epoch
    origin: ActorRef | None = None


@dataclass(frozen=True, slots=True)
class DeliverSignal:
    """user -> device: write the ``msg.signal`` notification (dropped if the connection's output is backed up)."""

    sender: str
    recipient: str
    signal_json: bytes
    ts: int


# -- user -> device -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The device is attached; the device actor answers the pending ``auth.*``."""

    user: str
    device: str
    user_ref: ActorRef
    pending: int
    request_key: int


@dataclass(frozen=True, slots=True)
class AuthFailed:
    request_key: int
    error: RpcError


@dataclass(frozen=True, slots=True)
class Deliver:
    messages: tuple[StoredMessage, ...]
    as_batch: bool  # the backlog goes as JSON-RPC batches, live messages one by one


@dataclass(frozen=True, slots=True)
class Replaced:
    """Another connection authenticated as the same device; this one closes."""


@dataclass(frozen=True, slots=True)
class UserActorFailed:
    """The user actor serving this connection failed: it closes (1011), and the client reconnects."""


# -- device -> user ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acked:
    device: str
    device_ref: ActorRef
    ids: tuple[str, ...]


# -- the cluster: router <-> cluster actor, router -> user ----------------------------


@dataclass(frozen=True, slots=True)
class DevicePresent:
    user: str
    device: str


@dataclass(frozen=True, slots=True)
class DeviceAbsent:
    user: str
    device: str


@dataclass(frozen=True, slots=True)
class Announce:
    """Messages were stored here for these users: tell the nodes where their devices are."""

    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Poke:
    """Messages were stored on another node for these users (None: maybe for anyone): read the store."""

    users: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class RedisAnswering:
    """The cluster actor's Redis answers again after failing: redo what was lost meanwhile."""


@dataclass(frozen=True, slots=True)
class HelperCrashed:
    """A greenlet of the actor's own died of ``error``, a bug: the actor fails with it (and says so)."""

    name: str
    error: BaseException


# -- operators (admin endpoint) -> router -> user ------------------------------------


@dataclass(frozen=True, slots=True)
class Kick:
    """Close the device's connections (all of the user's when ``device`` is None); asked, answers a count."""

    device: str | None = None


@dataclass(frozen=True, slots=True)
class ExpireUser:
    """Expire every message stored for ``user`` now; answered with UserExpired."""

    user: str
    request_key: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class UserExpired:
    request_key: int
    count: int


@dataclass(frozen=True, slots=True)
class Kicked:
    """An operator closed this connection; its messages stay pending."""


@dataclass(frozen=True, slots=True)
class ForgetInFlight:
    """The user's stored messages were expired by an operator: stop resending them."""


@dataclass(frozen=True, slots=True)
class Watch:
    user: str
    watcher: ActorRef


@dataclass(frozen=True, slots=True)
class Unwatch:
    user: str
    watcher: ActorRef


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """What happened to a watched user's messages or devices."""

    user: str
    event: str  # stored, delivered, redelivered, acked, online, offline
    device: str | None
    ids: tuple[str, ...]
    ts: int  # ms since the epoch


# -- supervision: a watcher greenlet -> the watched actor's parent --------------------


@dataclass(frozen=True, slots=True)
class ChildStopped:
    """The child ``name`` (``ref``) stopped; unless its parent stopped it, it failed (see supervision.py)."""

    name: str
    ref: ActorRef


# -- clock -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    now: float  # time.monotonic()


# -- questions asked with ask() (console, admin endpoint, /healthz, the launcher, tests) -----
#
# One frozen dataclass per question; its docstring says who answers and what. An
# actor answers a question when it takes it from its inbox, after what was told to it
# before (requests the store actor took before may still wait for their commit).


@dataclass(frozen=True, slots=True)
class HealthQuery:
    """Is the actor well? (/healthz, and the launcher's "it answers")

    The store actor answers {"failing": None}, or {"failing": since when and why}
    while the store fails; the router {"users": its live user actors}, cheap
    whatever their number.
    """


@dataclass(frozen=True, slots=True)
class CommitCountsQuery:
    """The store actor's {"commits", "committed_requests"}: groups committed and the requests in them."""


@dataclass(frozen=True, slots=True)
class StoreStatsQuery:
    """The store actor's commit counts plus what the store holds (``Store.stats()``: messages, users...).

    Raises the store's StoreUnavailableError while the store does not answer.
    """


@dataclass(frozen=True, slots=True)
class StoredUserQuery:
    """What the store holds of ``user``: {"exists", "devices" (DeviceRecords), "backlog" {device: (count, oldest)}}.

    Asked of the store actor; raises the store's StoreUnavailableError while the store does not answer.
    """

    user: str


@dataclass(frozen=True, slots=True)
class PendingQuery:
    """The first ``limit`` messages stored for ``device`` of ``user``: {"messages": [StoredMessage]}.

    Asked of the store actor; raises the store's StoreUnavailableError while the store does not answer.
    """

    user: str
    device: str
    limit: int


@dataclass(frozen=True, slots=True)
class OnlineUsersQuery:
    """The router's live user actors: {user: {"online": connections}}."""


@dataclass(frozen=True, slots=True)
class LiveUserQuery:
    """The router's user actor of ``user`` (an ActorRef), or None when it has none (no device online)."""

    user: str


@dataclass(frozen=True, slots=True)
class UserDevicesQuery:
    """A user actor's {"user", "devices": {device: {"in_flight", "oldest_in_flight_age", "cursor",
    "caught_up"}}, "attaching": [devices]}: its connected devices and their deliveries."""


@dataclass(frozen=True, slots=True)
class DeviceRefsQuery:
    """A user actor's device actors: {device: ActorRef}."""


@dataclass(frozen=True, slots=True)
class ConnectionQuery:
    """A device actor's {"user", "device" (None before its auth), "remote", "pending_sends"}."""


@dataclass(frozen=True, slots=True)
class ClusterStateQuery:
    """The cluster actor's {"node", "announced": announcements made, "redis_down"}."""


@dataclass(frozen=True, slots=True)
class ApiWaitingQuery:
    """The API actor's {"waiting": requests it told on and awaits the answer of}."""


@dataclass(frozen=True, slots=True)
class PushDispatchQuery:
    """The push dispatcher's {"providers": platforms, "pushes": pushes asked, "waiting": devices woken
    and not back}."""


@dataclass(frozen=True, slots=True)
class PushProviderQuery:
    """A push provider's state and counters: {"platform", its connection ("host", "port" or "project"),
    "down", "queued", "retrying", ... and ``PushCounters.as_dict()``}."""


def tell_if_alive(ref: ActorRef, message) -> bool:
    """Tell ``message``; False if that actor has stopped (a closed connection, an idle user)."""
    try:
        ref.tell(message)
    except ActorDeadError:
        return False
    return True


# -- the server API: HTTP greenlet -> API actor -> store, router ---------------------------


@dataclass(frozen=True, slots=True)
class ApiCall:
    """One server API request, told to the API actor by the greenlet of its HTTP connection.

    ``request`` is typed (protocol/api.py: ApiSend, TokenRequest, UserLookup,
    DeviceRemoval); ``answer`` is the gevent AsyncResult that greenlet waits on,
    set with a ``protocol.api.ApiAnswer``; ``admission`` is the HTTP connection's
    ConnectionAdmission, told of a send's answer like a device actor's.
    """

    request: Any
    answer: Any
    admission: Any = None


@dataclass(frozen=True, slots=True)
class AddUser:
    """Create the user if new (the "from" of a server API send, told just before its Append); no answer."""

    user: str


@dataclass(frozen=True, slots=True)
class LoadUser:
    """What the store knows of a user for ``GET /api/v1/users/{user}``; answered UserLoaded."""

    user: str
    request_key: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class UserLoaded:
    request_key: int
    exists: bool = False
    devices: tuple[str, ...] = ()  # registered, in the store's order
    pending: tuple[tuple[str, int], ...] = ()  # (device, deliveries not ACKed) for those that have any
    error: RpcError | None = None


@dataclass(frozen=True, slots=True)
class RemoveDevice:
    """Revoke a device's credentials (``DELETE /api/v1/users/{user}/devices/{device}``); answered DeviceRemovalDone."""

    user: str
    device: str
    request_key: int
    reply_to: ActorRef


@dataclass(frozen=True, slots=True)
class DeviceRemovalDone:
    request_key: int
    removed: bool = False  # False: no such device (or no such user, then ``unknown_user``)
    unknown_user: bool = False
    error: RpcError | None = None
