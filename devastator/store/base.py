"""The store interface: what the delivery core needs from durable storage.

The embedded SQLite store and the clustered store (Redis) implement it. Every
call is blocking and is made by one caller at a time (the store actor), which
groups many calls into one durable commit with ``batch()``.

A call the store itself failed (a disk, a connection, a server's refusal: not
a bug of the caller) raises ``StoreError``; ``StoreUnavailableError`` when the
store did not answer at all, so that the call may or may not have been done.
"""
from __future__ import annotations

import itertools
import os
from typing import ContextManager, NamedTuple, Protocol, Sequence

import orjson

from ..records import frozen

# What a mailbox entry is (StoredMessage.kind): how it is delivered.
MESSAGE = "msg"  # a message to its recipient: msg.recv
COPY = "copy"  # a message in its sender's own mailbox, for the sender's other devices: msg.recv
RECEIPT = "receipt"  # a receipt for a message's sender: msg.receipt, message_json its params


@frozen
class StoredMessage:
    """One entry in one user's mailbox, as delivered in ``msg.recv`` (or ``msg.receipt``).

    ``recipient`` is the mailbox's owner. A COPY has ``sender == recipient``
    and carries the ``to`` as sent in ``to_json``; a RECEIPT's ``sender`` is
    the user who received (or read) the message, its ``message_json`` the
    whole ``msg.receipt`` params object. In a history page (``seq`` 0) an entry
    is a MESSAGE as its recipient got it.
    """

    seq: int  # the store's acceptance order; per recipient it is the delivery order
    id: str
    sender: str
    recipient: str
    message_json: bytes
    ts: int  # ms since the epoch, when it was accepted
    expires: int  # ms since the epoch
    kind: str = MESSAGE
    to_json: bytes = b""  # a COPY: the "to" as sent (a JSON string or array)
    # A COPY just stored: the device that sent it, which does not wait for it. Not kept by the store.
    origin_device: str | None = None


class Send(NamedTuple):
    """One ``msg.send`` for ``append_many`` (the parameters of ``append``)."""

    sender: str
    recipients: Sequence[str]
    message_json: bytes
    cid: str | None
    ttl_seconds: int
    receipt: bool = False
    to_json: bytes = b""
    origin_device: str | None = None


@frozen
class PushTarget:
    """A device that has a push token: what a provider needs to wake it."""

    user: str
    device: str
    platform: str  # "apns", "gcm" or "fcm"
    token: str


@frozen
class Accepted:
    """What ``append`` stored: the sender's answer and the new mailbox entries."""

    id: str
    ts: int
    expires: int
    messages: tuple[StoredMessage, ...]  # empty when a retried ``cid`` matched
    duplicate: bool = False
    # The recipients' devices with push tokens, to wake those that are offline.
    push_targets: tuple[PushTarget, ...] = ()
    # Recipients an earlier try of this ``cid`` reached although it failed: their
    # live devices may never have been told, so their mailboxes are read again.
    recheck: tuple[str, ...] = ()


@frozen
class Receipts:
    """Receipts a call stored in their owners' mailboxes: told and pushed like the entries of a send."""

    messages: tuple[StoredMessage, ...] = ()
    push_targets: tuple[PushTarget, ...] = ()


NO_RECEIPTS = Receipts()


@frozen
class HistoryPage:
    """Messages of a conversation, newest first; ``more``: older ones are kept too."""

    messages: tuple[StoredMessage, ...]
    more: bool


@frozen
class Attachment:
    """A device coming online: how much waits for it."""

    pending: int


@frozen
class DeviceRecord:
    """A registered device, as operators see it."""

    device: str
    created: int  # ms since the epoch, when it was registered
    attached: int | None  # ms since the epoch of its first authentication, None until then
    push_platform: str | None = None
    push_token: str | None = None


@frozen
class RemovedDevices:
    """Devices removed since a cursor, oldest first, and the cursor to ask from next."""

    cursor: int
    devices: tuple[tuple[str, str], ...]  # (user, device)


class UnknownUserError(LookupError):
    """A named user does not exist; ``args[0]`` lists the unknown ids."""


class UnknownDeviceError(LookupError):
    """No such device, or credentials from an earlier registration of it."""


class StoreError(Exception):
    """The store failed a call; the caller did nothing wrong and may try again later.

    A send that failed half-way carries what it did store all the same
    (``messages``, ``push_targets``: their recipients are told as usual), and
    ``recheck``: recipients it may have been stored for without the store
    being able to tell, whose mailboxes must be read again.
    """

    def __init__(
        self,
        message: str,
        *,
        messages: tuple[StoredMessage, ...] = (),
        push_targets: tuple[PushTarget, ...] = (),
        recheck: tuple[str, ...] = (),
    ):
        super().__init__(message)
        self.messages = messages
        self.push_targets = push_targets
        self.recheck = recheck


class StoreUnavailableError(StoreError):
    """The store did not answer (connection refused or lost, timed out, still loading).

    What was asked may or may not have been done, and whatever is asked next
    will most likely fail the same way until the store is back.
    """


class Store(Protocol):
    # True: a batch commits all of its calls or none of them (one transaction),
    # so one failed call fails the whole batch. False: each call is durable on
    # its own once it returns, and a failed call leaves the others standing.
    all_or_nothing: bool

    def open(self) -> None: ...

    def close(self) -> None: ...

    def batch(self) -> ContextManager[None]:
        """Group the calls made inside into one durable commit."""

    # The history period in ms (PROTOCOL.md 7): messages are kept for ``history`` this
    # long whatever their TTL; 0: no history is kept. Set before ``open``.
    history_period_ms: int

    def append(
        self,
        sender: str,
        recipients: Sequence[str],
        message_json: bytes,
        cid: str | None,
        ttl_seconds: int,
        now_ms: int,
        *,
        receipt: bool = False,
        to_json: bytes = b"",
        origin_device: str | None = None,
    ) -> Accepted:
        """Store a message for every recipient; raises UnknownUserError.

        Also, unless the sender is among the recipients: a COPY in the
        sender's mailbox, waiting for each of its devices but ``origin_device``
        (none is stored when no such device exists); ``to_json`` is the "to"
        it carries (empty: the recipients as a JSON array). With ``receipt``,
        each recipient but the sender gets a receipt record: its first ACK
        (``ack``) and its ``mark_read`` then store receipts for the sender.
        While ``history_period_ms`` is set, the message enters the history of
        each (sender, recipient) conversation. ``Accepted.messages`` holds
        the recipients' entries, then the copy; ``push_targets`` only the
        recipients' devices (a copy wakes nobody).
        """

    def append_many(
        self, sends: Sequence[Send], now_ms: int
    ) -> list[Accepted | UnknownUserError | StoreError]:
        """``append`` for each Send, in order.

        A send with an unknown recipient gets its UnknownUserError in its place
        in the results; the others are stored. A store may send them together.
        A store that is not ``all_or_nothing`` puts the StoreError of a send it
        failed in that send's place (after a StoreUnavailableError, every send
        left gets one too, untried); an ``all_or_nothing`` one raises it.
        """

    def attach_device(self, user: str, device: str, registration: str, now_ms: int) -> Attachment:
        """A device authenticates: its first time, it gets the user's stored messages.

        Raises UnknownUserError for a user that does not exist, and
        UnknownDeviceError unless the device is registered under
        ``registration`` (removed devices and stale credentials fail here).
        """

    def load_pending(
        self, user: str, device: str, after_seq: int, limit: int, now_ms: int
    ) -> list[StoredMessage]:
        """Unexpired messages waiting for the device with seq > after_seq, oldest first."""

    def ack(self, user: str, device: str, seqs: Sequence[int], now_ms: int) -> Receipts:
        """The device has the entries; retire those no device waits for any more.

        A MESSAGE that asked for receipts, ACKed for the first time by any of
        the user's devices, gets a "delivered" receipt stored for its sender:
        returned, to be told like a send's entries. Done at most once per
        message and recipient, also when a later ACK repeats it.
        """

    def mark_read(self, user: str, message_ids: Sequence[str], now_ms: int) -> Receipts:
        """``msg.read``: a "read" receipt for the sender of each message that asked, once.

        Ids of messages that were not sent to ``user``, that did not ask, or
        whose read receipt exists are skipped.
        """

    def history(self, user: str, peer: str, before: str | None, limit: int, now_ms: int) -> HistoryPage:
        """The conversation of ``user`` with ``peer``: messages either sent to the other, newest first.

        Only messages younger than the history period, ACKed or not; older
        than the message id ``before`` when given (an id not in the
        conversation: older than where it would be, as ids sort by time).
        Raises UnknownUserError for an unknown ``peer``. A message to
        several recipients is in each (sender, recipient) conversation, with
        that recipient as its ``recipient``.
        """

    def purge_expired(self, now_ms: int) -> int:
        """Drop expired messages, receipt records, idempotency records and history past its period.

        Returns mailbox entries dropped.
        """

    def checkpoint(self) -> None:
        """Housekeeping the store wants done now and then, off the event loop.

        Called from a worker thread, never inside ``batch()``; may be a no-op.
        """

    # Operators' calls (CLI, console, telemetry); not on the delivery path.
    def stats(self) -> dict[str, int]:
        """Counts for telemetry: users, devices, messages stored, deliveries pending (not ACKed).

        Kept up to date as the store changes, by every process using it: a
        scrape never counts over a table.
        """

    def add_user(self, user: str, now_ms: int) -> bool: ...

    def add_device(self, user: str, device: str, now_ms: int) -> str:
        """Register the device if new; its registration id, which its credentials carry.

        Raises UnknownUserError.
        """

    def remove_device(self, user: str, device: str, now_ms: int) -> bool:
        """Forget the device (its credentials stop working); False if there was none.

        Messages only it waited for are retired, unless the user has no
        device left: then they wait for the next one, as for a new user.
        """

    def set_push_token(self, user: str, device: str, platform: str, token: str) -> bool:
        """Give the device this push token (replacing its last); False if there is no such device.

        A token belongs to one device: another device that had it loses it
        (an app reinstalled, a phone passed on).
        """

    def remove_push_token(self, user: str, device: str, platform: str, token: str) -> bool:
        """Forget the token if the device still has it (the platform said it is dead)."""

    def device_for_push_token(self, platform: str, token: str) -> tuple[str, str] | None:
        """(user, device) holding the token, or None."""

    def removed_devices(self, after: int | None) -> RemovedDevices:
        """Devices removed after the cursor ``after``; None: none, just the cursor of now.

        Servers poll this to close the connections of removed devices, also
        when another process (the CLI) removed them.
        """

    def backlog(self, user: str, now_ms: int) -> dict[str, tuple[int, int]]:
        """device -> (deliveries pending, ts of the oldest), for the user's devices that have any."""

    def expire_user(self, user: str, now_ms: int) -> int:
        """Expire every message stored for the user now; returns how many there were."""

    def has_user(self, user: str) -> bool: ...

    def list_users(self) -> list[str]: ...

    def list_devices(self, user: str) -> list[DeviceRecord]: ...


def receipt_id(message_id: str, kind: str, by: str) -> str:
    """The one id of the ``kind`` receipt of a message by a recipient: storing it twice stores it once."""
    return f"{message_id}.{kind[0]}.{by}"


RECEIPT_TYPES = ("delivered", "read")


def receipt_type(receipt: str) -> str:
    """The type a receipt id names (``receipt_id`` made it; message ids hold no dot)."""
    letter = receipt.split(".", 2)[1]
    return next(kind for kind in RECEIPT_TYPES if kind[0] == letter)


def receipt_json(receipt: str, kind: str, message_id: str, by: str, ts: int) -> bytes:
    """The ``msg.receipt`` params a RECEIPT entry carries (PROTOCOL.md 7)."""
    return orjson.dumps({"id": receipt, "type": kind, "message": message_id, "by": by, "ts": ts})


class MessageIds:
    """Message ids that sort by acceptance time and are unique across processes.

    A random prefix per store instance and a counter: no system call per id.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(1)

    def new(self, ts_ms: int) -> str:
        return f"{ts_ms:012x}{self._prefix}{next(self._counter) & 0xFFFFFF:06x}"
