"""The cluster actor: this node's presence in Redis, and the news it passes to and from other nodes.

The router tells it which devices connect and leave here (``DevicePresent``,
``DeviceAbsent``) and which users just had messages stored here
(``Announce``); it publishes those users on the channels of the other alive
nodes where they have devices. Its subscriber greenlet reads this node's
channel and tells the router ``Poke`` for users whose messages were stored
elsewhere: their user actors read them from the store. A heartbeat greenlet
keeps this node alive in Redis. Both greenlets belong to the actor's group
and stop with it; the subscriber's connection is the actor's own, closed
when it stops.

Redis failing is not a bug: a Redis error is counted, the outage logged once
when it starts and once when it ends (the heartbeat notices), and what it
lost is redone then: this node's devices are recorded as present again and
the users whose announcements Redis did not take are announced. Any other
exception is a bug and fails the actor, also one raised in its greenlets.
"""
from __future__ import annotations

import contextlib
import logging
import time

import gevent
import orjson
import pykka
from gevent.pool import Group
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..cluster import HEARTBEAT_SECONDS, NODE_TTL_MS, ClusterKeys, LiveNodes, Presence
from ..outage_log import OutageLog
from ..throttled_log import ThrottledLog
from .messages import (
    Announce,
    DeviceAbsent,
    DevicePresent,
    ClusterStateQuery,
    HelperCrashed,
    Poke,
    RedisAnswering,
    Signal,
    tell_if_alive,
)

log = logging.getLogger(__name__)

RESUBSCRIBE_SECONDS = 1.0
# A quiet subscribed connection is pinged this often; no answer within as long again means it is dead
# (a Redis stopped or cut off never closes it).
SUBSCRIBER_PING_SECONDS = 2.0
# Users whose announcement failed, kept to announce once Redis is back (a bound, not a policy).
MAX_UNANNOUNCED = 100_000


class ClusterActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        client,
        subscriber_client,
        prefix: str,
        node: str,
        router: pykka.ActorRef,
        subscriber_ping_interval: float = SUBSCRIBER_PING_SECONDS,
    ):
        super().__init__()
        self._client = client
        self._subscriber_client = subscriber_client  # its own connection: a subscribed one does nothing else
        self._keys = ClusterKeys(prefix)
        self._node = node
        self._router = router
        self._live = LiveNodes(client, self._keys)
        self._presence = Presence(client, self._keys, node, self._live)
        self._greenlets = Group()
        self._outage = OutageLog(log, f"the cluster's Redis (node {node})")
        self._bad_news = ThrottledLog(log)
        self._here: set[tuple[str, str]] = set()  # (user, device) connected to this node
        self._unannounced: set[str] = set()
        self._ping_interval = subscriber_ping_interval
        self.announced = 0

    def on_start(self) -> None:
        self._beat()  # alive before any device can be found here
        for loop in (self._heartbeat, self._subscribe):
            greenlet = self._greenlets.spawn(loop)
            greenlet.link_exception(self._helper_crashed(loop.__name__))

    def on_stop(self) -> None:
        self._greenlets.kill(timeout=2)
        try:
            self._client.delete(self._keys.node(self._node))
        except RedisError as error:  # Redis may be down; we are leaving anyway
            log.debug("cannot mark node %s gone: %s", self._node, error)
        self._subscriber_client.close()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._greenlets.kill(timeout=2)
        self._subscriber_client.close()

    def on_receive(self, message):
        if isinstance(message, ClusterStateQuery):
            return {"node": self._node, "announced": self.announced, "redis_down": self._outage.down}
        if isinstance(message, HelperCrashed):
            raise RuntimeError(f"the cluster actor's {message.name} greenlet crashed") from message.error
        if isinstance(message, DevicePresent):
            self._here.add((message.user, message.device))
            self._redis_call("presence_updates", self._presence.arrive, message.user, message.device)
        elif isinstance(message, DeviceAbsent):
            self._here.discard((message.user, message.device))
            self._redis_call("presence_updates", self._presence.leave, message.user, message.device)
        elif isinstance(message, Announce):
            if not self._redis_call("announcements", self._announce, message.users):
                self._keep_unannounced(message.users)
        elif isinstance(message, Signal):
            # Ephemeral: one Redis failed is one signal lost, never retried.
            self._redis_call("signals", self._forward_signal, message)
        elif isinstance(message, RedisAnswering):
            self._redo()
        return None

    def _forward_signal(self, signal: Signal) -> None:
        for node, node_users in self._presence.nodes_of(signal.recipients).items():
            self._client.publish(self._keys.channel(node), orjson.dumps({"signal": {
                "from": signal.sender,
                "to": sorted(node_users),
                "signal": orjson.Fragment(signal.signal_json),
                "ts": signal.ts,
            }}))

    def _redis_call(self, kind: str, call, *args) -> bool:
        """Run ``call``; False if Redis failed it (counted as ``kind``)."""
        try:
            call(*args)
        except RedisError as error:
            self._outage.failed(error, **{kind: 1})
            return False
        return True

    def _announce(self, users) -> None:
        for node, node_users in self._presence.nodes_of(users).items():
            self._client.publish(self._keys.channel(node), orjson.dumps(sorted(node_users)))
            self.announced += len(node_users)

    def _keep_unannounced(self, users) -> None:
        room = MAX_UNANNOUNCED - len(self._unannounced)
        self._unannounced.update(list(users)[:max(0, room)])

    def _redo(self) -> None:
        """Redis answers again: record this node's devices again, announce what it did not take."""
        if self._here and not self._redis_call("presence_updates", self._presence.arrive_all, list(self._here)):
            return
        users, self._unannounced = self._unannounced, set()
        if users and not self._redis_call("announcements", self._announce, tuple(users)):
            self._keep_unannounced(users)

    def _helper_crashed(self, name: str):
        def crashed(greenlet: gevent.Greenlet) -> None:
            log.error("cluster %s greenlet crashed: %r", name, greenlet.exception)
            tell_if_alive(self.actor_ref, HelperCrashed(name, greenlet.exception))

        return crashed

    # -- greenlets ----------------------------------------------------------------------

    def _beat(self) -> None:
        self._client.set(self._keys.node(self._node), b"1", px=NODE_TTL_MS)

    def _heartbeat(self) -> None:
        while True:
            gevent.sleep(HEARTBEAT_SECONDS)
            try:
                self._beat()
            except RedisError as error:
                self._outage.failed(error, heartbeats=1)
                continue
            if self._outage.down:
                self._outage.answered()
                tell_if_alive(self.actor_ref, RedisAnswering())

    def _subscribe(self) -> None:
        channel = self._keys.channel(self._node)
        while True:
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                self._listen(pubsub)
            except RedisError as error:  # Redis down: the key expires, other nodes stop telling us
                self._outage.failed(error, subscriptions=1)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    pubsub.close()
            gevent.sleep(RESUBSCRIBE_SECONDS)
            # Messages stored elsewhere while we were cut off: every user here looks again.
            self._router.tell(Poke(None))

    def _listen(self, pubsub) -> None:
        """Tell the router what other nodes publish, until the subscribed connection fails."""
        interval = self._ping_interval
        heard = time.monotonic()
        pinged = False
        while True:
            event = pubsub.get_message(timeout=interval)
            now = time.monotonic()
            if event is not None:
                heard, pinged = now, False
                if event.get("type") == "message":
                    self._poke(event["data"])
            elif pinged and now - heard >= 2 * interval:
                raise RedisTimeoutError(f"no answer to a ping on the subscribed connection within {interval:g} s")
            elif not pinged and now - heard >= interval:
                pubsub.ping()
                pinged = True

    def _poke(self, data: bytes) -> None:
        try:
            users = orjson.loads(data)
        except orjson.JSONDecodeError:
            users = None
        if isinstance(users, dict):
            self._relay_signal(users.get("signal"), data)
            return
        if not isinstance(users, list) or not all(isinstance(user, str) for user in users):
            # Someone else's publication on our channel: nothing to act on, worth a line.
            self._bad_news.warning("publication", "cluster: ignored a publication that is not a list of users:"
                                   " %.100r", data)
            return
        self._router.tell(Poke(tuple(users)))

    def _relay_signal(self, signal, data: bytes) -> None:
        """A signal another node published for users with devices here: to the router, as if sent here."""
        if (
            not isinstance(signal, dict)
            or not isinstance(signal.get("from"), str)
            or not isinstance(signal.get("to"), list)
            or not all(isinstance(user, str) for user in signal["to"])
            or not isinstance(signal.get("ts"), int)
            or "signal" not in signal
        ):
            self._bad_news.warning("publication", "cluster: ignored a publication that is not a signal: %.100r", data)
            return
        self._router.tell(Signal(signal["from"], tuple(signal["to"]), orjson.dumps(signal["signal"]), signal["ts"]))
