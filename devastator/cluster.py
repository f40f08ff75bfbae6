"""What nodes of a cluster share through Redis, besides the store: who is alive, where devices are.

Every node writes ``<prefix>node:<name>`` every second with a 5 s expiry: a
node that dies simply stops being alive. A device's node is kept in its
user's presence hash (the user's hash tag, so Redis Cluster keeps it beside
the user's mailbox). A node that stores a message for a user whose devices
are on other nodes publishes the user's id on those nodes' channels; they
read the new messages from the store. Push notifications are claimed in
Redis (``SET NX`` with the quiet period as expiry), so exactly one node
pushes to an offline device however many nodes accept messages for it.

Every client here is made by ``store.redis.connect`` (timeouts, no retries).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from redis.exceptions import RedisError

from .outage_log import OutageLog
from .store.redis import user_key

log = logging.getLogger(__name__)

NODE_TTL_MS = 5000
HEARTBEAT_SECONDS = 1.0
ALIVE_CACHE_SECONDS = 1.0


class ClusterKeys:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def node(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def channel(self, node: str) -> str:
        return f"{self.prefix}node:{node}:inbox"

    def presence(self, user: str) -> str:
        return user_key(self.prefix, user, "presence")

    def push_claim(self, user: str, device: str) -> str:
        return user_key(self.prefix, user, f"push:{device}")


class LiveNodes:
    """Which nodes are alive, asked of Redis at most once a second per node."""

    def __init__(self, client, keys: ClusterKeys, clock=time.monotonic):
        self._client = client
        self._keys = keys
        self._clock = clock
        self._known: dict[str, tuple[bool, float]] = {}

    def alive(self, node: str) -> bool:
        now = self._clock()
        known = self._known.get(node)
        if known is not None and now - known[1] < ALIVE_CACHE_SECONDS:
            return known[0]
        alive = bool(self._client.exists(self._keys.node(node)))
        self._known[node] = (alive, now)
        return alive


class Presence:
    """Where each user's devices are connected."""

    def __init__(self, client, keys: ClusterKeys, node: str, live_nodes: LiveNodes):
        self._client = client
        self._keys = keys
        self._node = node
        self._live = live_nodes
        # Remove our entry only if it is still ours: the device may have moved on.
        self._leave = client.register_script(
            "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then"
            " return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0"
        )

    def arrive(self, user: str, device: str) -> None:
        self._client.hset(self._keys.presence(user), device, self._node)

    def arrive_all(self, devices: Iterable[tuple[str, str]]) -> None:
        """``arrive`` for each (user, device), in one round trip."""
        pipeline = self._client.pipeline(transaction=False)
        for user, device in devices:
            pipeline.hset(self._keys.presence(user), device, self._node)
        pipeline.execute()

    def leave(self, user: str, device: str) -> None:
        self._leave(keys=[self._keys.presence(user)], args=[device, self._node])

    def nodes_of(self, users: Iterable[str]) -> dict[str, set[str]]:
        """Alive nodes other than this one with devices of each user: node -> users."""
        users = list(users)
        pipeline = self._client.pipeline(transaction=False)
        for user in users:
            pipeline.hvals(self._keys.presence(user))
        by_node: dict[str, set[str]] = {}
        for user, nodes in zip(users, pipeline.execute()):
            for node in {raw.decode() for raw in nodes}:
                if node != self._node and self._live.alive(node):
                    by_node.setdefault(node, set()).add(user)
        return by_node

    def devices_of(self, user: str) -> dict[str, str]:
        """device -> the alive node it is connected to, for the user's connected devices."""
        entries = self._client.hgetall(self._keys.presence(user))
        nodes = {device.decode(): node.decode() for device, node in entries.items()}
        return {device: node for device, node in nodes.items() if node == self._node or self._live.alive(node)}

    def online_anywhere(self, user: str, device: str) -> bool:
        node = self._client.hget(self._keys.presence(user), device)
        return node is not None and (node.decode() == self._node or self._live.alive(node.decode()))


class RedisPushCoordination:
    """Push decisions shared by the cluster: claims in Redis, presence on any node.

    While Redis fails, a device counts as offline and every claim as won: a
    push too many (from two nodes) beats a device never woken. The outage is
    logged once when it starts and once when it ends.
    """

    def __init__(self, client, keys: ClusterKeys, presence: Presence):
        self._client = client
        self._keys = keys
        self._presence = presence
        self._outage = OutageLog(log, "the Redis of push claims")

    def online(self, user: str, device: str) -> bool:
        try:
            online = self._presence.online_anywhere(user, device)
        except RedisError as error:
            self._outage.failed(error, presence_checks=1)
            return False
        self._outage.answered()
        return online

    def claim(self, user: str, device: str, quiet_seconds: float) -> bool:
        ttl_ms = max(1, int(quiet_seconds * 1000))
        try:
            claimed = bool(self._client.set(self._keys.push_claim(user, device), b"1", nx=True, px=ttl_ms))
        except RedisError as error:
            self._outage.failed(error, claims=1)
            return True
        self._outage.answered()
        return claimed

    def release(self, user: str, device: str) -> None:
        try:
            self._client.delete(self._keys.push_claim(user, device))
        except RedisError as error:  # the claim expires by itself after the quiet period
            self._outage.failed(error, releases=1)
            return
        self._outage.answered()
