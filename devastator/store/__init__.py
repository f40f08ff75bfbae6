"""Durable storage behind one small interface (``Store``)."""
from .base import (
    Accepted,
    Attachment,
    DeviceRecord,
    MessageIds,
    PushTarget,
    RemovedDevices,
    Store,
    StoredMessage,
    StoreError,
    StoreUnavailableError,
    UnknownDeviceError,
    UnknownUserError,
)
from .redis import RedisStore
from .sqlite import SqliteStore

__all__ = [
    "Accepted",
    "Attachment",
    "DeviceRecord",
    "MessageIds",
    "PushTarget",
    "RedisStore",
    "RemovedDevices",
    "SqliteStore",
    "Store",
    "StoredMessage",
    "StoreError",
    "StoreUnavailableError",
    "UnknownDeviceError",
    "UnknownUserError",
]
