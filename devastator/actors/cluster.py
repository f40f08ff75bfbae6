"""The cluster actor: this node's presence in Redis, and the news it passes to and from other nodes.

The router tells it which devices connect and leave here (``DevicePresent``,
``DeviceAbsent``) and which users just had messages stored here
(``Announce``); it publishes those users on the channels of the other alive
nodes where they have devices. Its subscriber greenlet reads this node's
channel and tells the router ``Poke`` for users whose messages were stored
elsewhere: their user actors read them from the store. A heartbeat greenlet
keeps this node alive in Redis. Both greenlets belong to the actor's group
and stop with it.
"""
from __future__ import annotations

import logging

import gevent
import orjson
import pykka
from gevent.pool import Group

from ..cluster import HEARTBEAT_SECONDS, NODE_TTL_MS, ClusterKeys, LiveNodes, Presence
from .messages import Announce, DeviceAbsent, DevicePresent, Inspect, Poke

log = logging.getLogger(__name__)

RESUBSCRIBE_SECONDS = 1.0


class ClusterActor(pykka.ThreadingActor):
    def __init__(self, *, client, subscriber_client, prefix: str, node: str, router: pykka.ActorRef):
        super().__init__()
        self._client = client
        self._subscriber_client = subscriber_client  # its own connection: a subscribed one does nothing else
        self._keys = ClusterKeys(prefix)
        self._node = node
        self._router = router
        self._live = LiveNodes(client, self._keys)
        self._presence = Presence(client, self._keys, node, self._live)
        self._greenlets = Group()
        self._down = False  # Redis unreachable: logged once, until it is back
        self.announced = 0

    def on_start(self) -> None:
        self._beat()  # alive before any device can be found here
        for loop in (self._heartbeat, self._subscribe):
            greenlet = self._greenlets.spawn(loop)
            greenlet.link_exception(lambda g: log.error("cluster %s crashed: %r", loop.__name__, g.exception))

    def on_stop(self) -> None:
        self._greenlets.kill(timeout=2)
        try:
            self._client.delete(self._keys.node(self._node))
        except Exception as error:  # Redis may be down; we are leaving anyway
            log.debug("cannot mark node %s gone: %s", self._node, error)

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._greenlets.kill(timeout=2)

    def on_receive(self, message):
        try:
            if isinstance(message, Announce):
                self._announce(message.users)
            elif isinstance(message, DevicePresent):
                self._presence.arrive(message.user, message.device)
            elif isinstance(message, DeviceAbsent):
                self._presence.leave(message.user, message.device)
            elif isinstance(message, Inspect):
                return {"node": self._node, "announced": self.announced}
        except Exception as error:  # Redis down or failing over: said once, the node goes on
            self._redis_trouble(error)
        return None

    def _announce(self, users) -> None:
        for node, node_users in self._presence.nodes_of(users).items():
            self._client.publish(self._keys.channel(node), orjson.dumps(sorted(node_users)))
            self.announced += len(node_users)
        self._redis_back()

    # -- greenlets ----------------------------------------------------------------------

    def _beat(self) -> None:
        self._client.set(self._keys.node(self._node), b"1", px=NODE_TTL_MS)

    def _heartbeat(self) -> None:
        while True:
            gevent.sleep(HEARTBEAT_SECONDS)
            try:
                self._beat()
                self._redis_back()
            except Exception as error:  # noqa: BLE001
                self._redis_trouble(error)

    def _subscribe(self) -> None:
        channel = self._keys.channel(self._node)
        while True:
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                for event in pubsub.listen():
                    if event.get("type") == "message":
                        self._router.tell(Poke(tuple(orjson.loads(event["data"]))))
            except Exception as error:  # Redis down: the key expires, other nodes stop telling us
                self._redis_trouble(error)
            finally:
                pubsub.close()
            gevent.sleep(RESUBSCRIBE_SECONDS)
            # Messages stored elsewhere while we were cut off: every user here looks again.
            self._router.tell(Poke(None))

    def _redis_trouble(self, error: Exception) -> None:
        if not self._down:
            self._down = True
            log.warning("cluster: Redis unreachable from node %s: %s", self._node, error)

    def _redis_back(self) -> None:
        if self._down:
            self._down = False
            log.warning("cluster: Redis reachable again from node %s", self._node)
