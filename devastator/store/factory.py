"""The store the settings ask for: the embedded SQLite file, or the Redis shared by a cluster."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Store

if TYPE_CHECKING:
    from ..config import Settings


def make_store(settings: Settings) -> Store:
    """A store, not yet open (``open()`` connects)."""
    if settings.store == "redis":
        from .redis import RedisStore

        return RedisStore(
            settings.redis_url,
            cluster_nodes=settings.redis_cluster_nodes or None,
            prefix=settings.redis_prefix,
            socket_timeout=settings.redis_socket_timeout,
            connect_timeout=settings.redis_connect_timeout,
            history_period_ms=settings.history_period * 1000,
        )
    from .sqlite import SqliteStore

    return SqliteStore(
        settings.db_path, synchronous=settings.sqlite_synchronous, history_period_ms=settings.history_period * 1000
    )
