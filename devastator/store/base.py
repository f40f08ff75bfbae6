"""The store interface: what the delivery core needs from durable storage.

The embedded SQLite store implements it today; a clustered store (Redis) will
implement the same calls. Every call is blocking and is made by one caller at a
time (the store actor), which groups many calls into one durable commit with
``batch()``.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import ContextManager, Protocol, Sequence


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message in one recipient's mailbox, as delivered in ``msg.recv``."""

    seq: int  # the store's acceptance order; per recipient it is the delivery order
    id: str
    sender: str
    recipient: str
    message_json: bytes
    ts: int  # ms since the epoch, when it was accepted
    expires: int  # ms since the epoch


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``append`` stored: the sender's answer and the new mailbox entries."""

    id: str
    ts: int
    expires: int
    messages: tuple[StoredMessage, ...]  # empty when a retried ``cid`` matched
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Attachment:
    """A device coming online: how much waits for it."""

    pending: int


class UnknownUserError(LookupError):
    """A named user does not exist; ``args[0]`` lists the unknown ids."""


class Store(Protocol):
    def open(self) -> None: ...

    def close(self) -> None: ...

    def batch(self) -> ContextManager[None]:
        """Group the calls made inside into one durable commit."""

    def append(
        self,
        sender: str,
        recipients: Sequence[str],
        message_json: bytes,
        cid: str | None,
        ttl_seconds: int,
        now_ms: int,
    ) -> Accepted:
        """Store a message for every recipient; raises UnknownUserError."""

    def attach_device(self, user: str, device: str, now_ms: int) -> Attachment:
        """Register the device if new; a first-time device gets the user's stored messages.

        Raises UnknownUserError for a user that does not exist.
        """

    def load_pending(
        self, user: str, device: str, after_seq: int, limit: int, now_ms: int
    ) -> list[StoredMessage]:
        """Unexpired messages waiting for the device with seq > after_seq, oldest first."""

    def ack(self, user: str, device: str, seqs: Sequence[int]) -> None:
        """The device has the messages; retire those no device waits for any more."""

    def purge_expired(self, now_ms: int) -> int:
        """Drop expired messages and idempotency records; returns messages dropped."""

    def checkpoint(self) -> None:
        """Housekeeping the store wants done now and then, off the event loop.

        Called from a worker thread, never inside ``batch()``; may be a no-op.
        """

    # Operators' calls (CLI, console); not on the delivery path.
    def add_user(self, user: str, now_ms: int) -> bool: ...

    def add_device(self, user: str, device: str, now_ms: int) -> bool: ...

    def list_users(self) -> list[str]: ...

    def list_devices(self, user: str) -> list[str]: ...


class MessageIds:
    """Message ids that sort by acceptance time and are unique across processes.

    A random prefix per store instance and a counter: no system call per id.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(1)

    def new(self, ts_ms: int) -> str:
        return f"{ts_ms:012x}{self._prefix}{next(self._counter) & 0xFFFFFF:06x}"
