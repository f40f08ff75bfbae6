"""What push provider actors share: the messages they take and tell, and their counters.

Each provider (APNs, GCM CCS, FCM HTTP v1) is an actor that takes
``PushRequest`` messages, one per device to wake. The payload says only that
there is something to fetch and how much, unless the operator lets message
content through Apple or Google (``preview``). A provider tells its
``token_sink`` a ``PushTokenRejected`` when the platform says a token is no
longer valid, so that the token is removed from its device, and counts what
happened in its ``PushCounters``.
"""
from __future__ import annotations

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
