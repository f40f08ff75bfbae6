"""What push provider actors share: the messages they take and tell, and their counters.

Each provider (APNs, GCM CCS, FCM HTTP v1) is an actor that takes
``PushRequest`` messages, one per device to wake. The payload says only that
there is something to fetch and how much, unless the operator lets message
content through Apple or Google (``preview``). A provider tells its
``token_sink`` a ``PushTokenRejected`` when the platform says a token is no
longer valid, so that the token is removed from its device, and counts what
happened in its ``PushCounters``.

A provider is optional: when its actor dies (in ``on_start`` or later), the
dispatcher turns its platform off in the ``PushPlatforms`` the device actors
read, so that ``push.register`` for it answers -32602 until the server
restarts, and the rest of the server goes on.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Platform = Literal["apns", "gcm", "fcm"]


@dataclass(frozen=True, slots=True)
class PushRequest:
    """Wake one device: it has ``pending`` messages waiting."""

    user: str
    device: str
    token: str
    pending: int
    # Set only when the operator turned on message content in pushes: the
    # newest pending message's JSON, as the sender wrote it.
    preview: bytes | None = None


@dataclass(frozen=True, slots=True)
class PushTokenRejected:
    """The platform said this token is unregistered or invalid: remove it."""

    platform: Platform
    user: str
    device: str
    token: str
    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamMessage:
    """A message a device sent through the platform (GCM CCS upstream)."""

    platform: Platform
    token: str  # the sending device's registration token
    message_id: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class PushCounters:
    """Push outcomes of one provider, read by /debug/vars and /metrics."""

    sent: int = 0
    failed: int = 0
    tokens_removed: int = 0
    retried: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "tokens_removed": self.tokens_removed,
            "retried": self.retried,
        }


class PushPlatforms:
    """The platforms whose provider runs now: ``push.register`` for any other answers -32602.

    Made by the launcher from the configured providers, read by device actors
    (``platform in platforms``) and metrics, and changed only by the push
    dispatcher when a provider dies. Everything runs in one OS thread, so no lock.
    """

    def __init__(self, configured: Iterable[str] = ()):
        self.configured = frozenset(configured)
        self._running = set(self.configured)

    def __contains__(self, platform: object) -> bool:
        return platform in self._running

    def turn_off(self, platform: str) -> None:
        self._running.discard(platform)

    def running(self) -> dict[str, bool]:
        """Each configured platform, and whether its provider runs."""
        return {platform: platform in self._running for platform in sorted(self.configured)}
