"""Durable storage behind one small interface (``Store``)."""
from .base import Accepted, Attachment, Store, StoredMessage, UnknownUserError, MessageIds
from .sqlite import SqliteStore

__all__ = [
    "Accepted",
    "Attachment",
    "SqliteStore",
    "Store",
    "StoredMessage",
    "UnknownUserError",
    "MessageIds",
]
