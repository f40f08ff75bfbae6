"""The messages actors tell each other: small frozen dataclasses (``@frozen``), never dicts.

A message that expects an answer names the actor to answer (``reply_to``), so
that no actor ever blocks on another: the answer is one more message.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import gevent
from gevent.pool import Group
from pykka import ActorDeadError, ActorRef

from ..protocol.errors import RpcError
from ..records import frozen
from ..store import PushTarget, StoredMessage

_log = logging.getLogger(__name__)


# -- transport -> device ------------------------------------------------------


@frozen
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


@frozen
class ProtocolViolation:
    """The transport read something it cannot frame (PROTOCOL.md 2, RFC 6455).

    It comes after the bodies read before it, so that their answers go out
    first; then ``error`` is answered (when there is a JSON-RPC error for it)
    and the connection closes with ``code``, without ``conn.close``.
    """

    code: int
    reason: str
    error: RpcError | None = None


@frozen
class ConnectionLost:
    reason: str


# -- device -> store -> device/router ------------------------------------------


@frozen
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


@frozen
class SendResult:
    request_key: int
    id: str | None = None
    ts: int | None = None
    error: RpcError | None = None


@frozen
class SendResults:
    results: tuple[SendResult, ...]


@frozen
class Committed:
    """Mailbox entries made durable, in acceptance order."""

    messages: tuple[StoredMessage, ...]
    # Devices of the recipients with push tokens: the router wakes the offline ones.
    push_targets: tuple[tuple[PushTarget, StoredMessage], ...] = ()
    # Users whose mailboxes may hold messages nobody was told of (the store could
    # not say whether a send landed): their user actors read the store again.
    recheck: tuple[str, ...] = ()


# -- device -> router -> user --------------------------------------------------


@frozen
class DeviceOnline:
    """A connection presents credentials for a device; the store checks ``registration``."""

    user: str
    device: str
    registration: str
    device_ref: ActorRef
    request_key: int


@frozen
class DeviceOffline:
    user: str
    device: str
    device_ref: ActorRef


# -- user -> store -> user -----------------------------------------------------


@frozen
class AttachDevice:
    user: str
    device: str
    registration: str
    device_ref: ActorRef
    request_key: int
    reply_to: ActorRef


@frozen
class DeviceAttached:
    device: str
    device_ref: ActorRef
    request_key: int
    pending: int = 0
    error: RpcError | None = None


@frozen
class LoadPending:
    user: str
    device: str
    after_seq: int
    limit: int
    reply_to: ActorRef


@frozen
class PendingLoaded:
    device: str
    after_seq: int
    messages: tuple[StoredMessage, ...]
    complete: bool  # fewer than the limit came back: nothing more waits in the store
    failed: bool = False


@frozen
class Ack:
    """The device has these deliveries; receipts they make are told to ``notify`` as Committed."""

    user: str
    device: str
    seqs: tuple[int, ...]
    notify: ActorRef | None = None


@frozen
class MarkRead:
    """``msg.read``: store read receipts; answer ``reply_to`` ReadMarked, tell ``notify`` Committed."""

    user: str
    ids: tuple[str, ...]
    request_key: int
    reply_to: ActorRef
    notify: ActorRef


@frozen
class ReadMarked:
    request_key: int
    error: RpcError | None = None


@frozen
class LoadHistory:
    """``msg.history``: a page of the conversation of ``user`` with ``peer``, newest first."""

    user: str
    peer: str
    before: str | None
    limit: int
    request_key: int
    reply_to: ActorRef


@frozen
class HistoryLoaded:
    request_key: int
    messages: tuple[StoredMessage, ...] = ()
    more: bool = False
    error: RpcError | None = None


@frozen
class PurgeExpired:
    pass


# -- registration: device -> store -> device --------------------------------------


@frozen
class Register:
    """Create the user if new and register the device (``auth.google``)."""

    user: str
    device: str
    request_key: int
    reply_to: ActorRef


@frozen
class Registered:
    request_key: int
    user: str
    device: str
    registration: str | None = None
    error: RpcError | None = None


# -- push tokens: device -> store -> device; push dispatcher -> store ----------------


@frozen
class SetPushToken:
    user: str
    device: str
    platform: str
    token: str
    request_key: int
    reply_to: ActorRef


@frozen
class PushTokenSet:
    request_key: int
    error: RpcError | None = None


@frozen
class RemovePushToken:
    """The platform said the token is dead; forget it unless the device has a new one."""

    target: PushTarget


@frozen
class FindPushDevice:
    """Whose is this push token? (An upstream message names only its sender's token.)"""

    platform: str
    token: str
    request_key: int
    reply_to: ActorRef


@frozen
class PushDeviceFound:
    request_key: int
    user: str | None  # None: no device holds the token
    device: str | None


# -- waking offline devices: router -> push dispatcher ------------------------------


@frozen
class WakeDevices:
    """Messages were stored for these offline devices: each (target, newest message)."""

    targets: tuple[tuple[PushTarget, StoredMessage], ...]


@frozen
class DeviceReachable:
    """The device connected: the next message after it leaves is worth a push again."""

    user: str
    device: str


# -- removed devices: router -> store -> router -> user -> device -------------------


@frozen
class PollRemovals:
    after: int | None  # the cursor of the last answer; None: start from now
    reply_to: ActorRef


@frozen
class DevicesRemoved:
    cursor: int | None
    devices: tuple[tuple[str, str], ...]  # (user, device)


@frozen
class DeviceRemoved:
    device: str


@frozen
class Revoked:
    """The device was removed: its connection closes."""


# -- signals: device -> router -> user -> device; router <-> cluster actor ------------


@frozen
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


@frozen
class DeliverSignal:
    """user -> device: write the ``msg.signal`` notification (dropped if the connection's output is backed up)."""

    sender: str
    recipient: str
    signal_json: bytes
    ts: int


# -- user -> device -------------------------------------------------------------


@frozen
class Authenticated:
    """The device is attached; the device actor answers the pending ``auth.*``."""

    user: str
    device: str
    user_ref: ActorRef
    pending: int
    request_key: int


@frozen
class AuthFailed:
    request_key: int
    error: RpcError


@frozen
class Deliver:
    messages: tuple[StoredMessage, ...]
    as_batch: bool  # the backlog goes as JSON-RPC batches, live messages one by one


@frozen
class Replaced:
    """Another connection authenticated as the same device; this one closes."""


@frozen
class UserActorFailed:
    """The user actor serving this connection failed: it closes (1011), and the client reconnects."""


# -- device -> user ---------------------------------------------------------------


@frozen
class Acked:
    device: str
    device_ref: ActorRef
    ids: tuple[str, ...]


# -- the cluster: router <-> cluster actor, router -> user ----------------------------


@frozen
class DevicePresent:
    user: str
    device: str


@frozen
class DeviceAbsent:
    user: str
    device: str


@frozen
class Announce:
    """Messages were stored here for these users: tell the nodes where their devices are."""

    users: tuple[str, ...]


@frozen
class Poke:
    """Messages were stored on another node for these users (None: maybe for anyone): read the store."""

    users: tuple[str, ...] | None


@frozen
class RedisAnswering:
    """The cluster actor's Redis answers again after failing: redo what was lost meanwhile."""


@frozen
class HelperCrashed:
    """A greenlet of the actor's own died of ``error``, a bug: the actor fails with it (and says so)."""

    name: str
    error: BaseException


# -- operators (admin endpoint) -> router -> user ------------------------------------


@frozen
class Kick:
    """Close the device's connections (all of the user's when ``device`` is None); asked, answers a count."""

    device: str | None = None


@frozen
class ExpireUser:
    """Expire every message stored for ``user`` now; answered with UserExpired."""

    user: str
    request_key: int
    reply_to: ActorRef


@frozen
class UserExpired:
    request_key: int
    count: int


@frozen
class Kicked:
    """An operator closed this connection; its messages stay pending."""


@frozen
class ForgetInFlight:
    """The user's stored messages were expired by an operator: stop resending them."""


@frozen
class Watch:
    user: str
    watcher: ActorRef


@frozen
class Unwatch:
    user: str
    watcher: ActorRef


@frozen
class WatchEvent:
    """What happened to a watched user's messages or devices."""

    user: str
    event: str  # stored, delivered, redelivered, acked, online, offline
    device: str | None
    ids: tuple[str, ...]
    ts: int  # ms since the epoch


# -- supervision: a watcher greenlet -> the watched actor's parent --------------------


@frozen
class ChildStopped:
    """The child ``name`` (``ref``) stopped; unless its parent stopped it, it failed (see supervision.py)."""

    name: str
    ref: ActorRef


# -- clock -------------------------------------------------------------------------


@frozen
class Tick:
    now: float  # time.monotonic()


# -- questions asked with ask() (console, admin endpoint, /healthz, the launcher, tests) -----
#
# One frozen dataclass per question; its docstring says who answers and what. An
# actor answers a question when it takes it from its inbox, after what was told to it
# before (requests the store actor took before may still wait for their commit).


@frozen
class HealthQuery:
    """Is the actor well? (/healthz, and the launcher's "it answers")

    The store actor answers {"failing": None}, or {"failing": since when and why}
    while the store fails; the router {"users": its live user actors}, cheap
    whatever their number.
    """


@frozen
class CommitCountsQuery:
    """The store actor's {"commits", "committed_requests"}: groups committed and the requests in them."""


@frozen
class StoreStatsQuery:
    """The store actor's commit counts plus what the store holds (``Store.stats()``: messages, users...).

    Raises the store's StoreUnavailableError while the store does not answer.
    """


@frozen
class StoredUserQuery:
    """What the store holds of ``user``: {"exists", "devices" (DeviceRecords), "backlog" {device: (count, oldest)}}.

    Asked of the store actor; raises the store's StoreUnavailableError while the store does not answer.
    """

    user: str


@frozen
class PendingQuery:
    """The first ``limit`` messages stored for ``device`` of ``user``: {"messages": [StoredMessage]}.

    Asked of the store actor; raises the store's StoreUnavailableError while the store does not answer.
    """

    user: str
    device: str
    limit: int


@frozen
class OnlineUsersQuery:
    """The router's live user actors: {user: {"online": connections}}."""


@frozen
class LiveUserQuery:
    """The router's user actor of ``user`` (an ActorRef), or None when it has none (no device online)."""

    user: str


@frozen
class UserDevicesQuery:
    """A user actor's {"user", "devices": {device: {"in_flight", "oldest_in_flight_age", "cursor",
    "caught_up"}}, "attaching": [devices]}: its connected devices and their deliveries."""


@frozen
class DeviceRefsQuery:
    """A user actor's device actors: {device: ActorRef}."""


@frozen
class ConnectionQuery:
    """A device actor's {"user", "device" (None before its auth), "remote", "pending_sends"}."""


@frozen
class ClusterStateQuery:
    """The cluster actor's {"node", "announced": announcements made, "redis_down"}."""


@frozen
class ApiWaitingQuery:
    """The API actor's {"waiting": requests it told on and awaits the answer of}."""


@frozen
class PushDispatchQuery:
    """The push dispatcher's {"providers": platforms, "pushes": pushes asked, "waiting": devices woken
    and not back}."""


@frozen
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


def tell_later(group: Group, ref: ActorRef, message, delay: float) -> None:
    """Tell ``message`` (if that actor is still alive) after ``delay`` seconds, from a timer in ``group``.

    An actor's own timers: killing the group at its stop cancels those not yet due.
    """
    timer = gevent.Greenlet(tell_if_alive, ref, message)
    timer.link_exception(lambda crashed: _log.error("timer for %s crashed: %r", ref, crashed.exception))
    group.add(timer)
    timer.start_later(delay)


# -- the server API: HTTP greenlet -> API actor -> store, router ---------------------------


@frozen
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


@frozen
class AddUser:
    """Create the user if new (the "from" of a server API send, told just before its Append); no answer."""

    user: str


@frozen
class LoadUser:
    """What the store knows of a user for ``GET /api/v1/users/{user}``; answered UserLoaded."""

    user: str
    request_key: int
    reply_to: ActorRef


@frozen
class UserLoaded:
    request_key: int
    exists: bool = False
    devices: tuple[str, ...] = ()  # registered, in the store's order
    pending: tuple[tuple[str, int], ...] = ()  # (device, deliveries not ACKed) for those that have any
    error: RpcError | None = None


@frozen
class RemoveDevice:
    """Revoke a device's credentials (``DELETE /api/v1/users/{user}/devices/{device}``); answered DeviceRemovalDone."""

    user: str
    device: str
    request_key: int
    reply_to: ActorRef


@frozen
class DeviceRemovalDone:
    request_key: int
    removed: bool = False  # False: no such device (or no such user, then ``unknown_user``)
    unknown_user: bool = False
    error: RpcError | None = None
