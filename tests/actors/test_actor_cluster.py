"""The cluster actor on a real redis-server: presence, announcements, and Redis failing under it.

Redis errors are counted and logged once per outage, what they lost (a
device's presence, an announcement) is redone when Redis answers again, a
subscribed connection to a Redis that stopped answering is found out by its
pings, and anything that is not a Redis error is a bug that fails the actor.
"""
from __future__ import annotations

import logging
import time
import uuid

import orjson
import pytest
import redis

from actor_fakes import Recorder
from devastator.actors.cluster import ClusterActor
from devastator.actors.messages import Announce, ClusterStateQuery, DevicePresent, Poke
from devastator.cluster import ClusterKeys
from devastator.store.redis import connect
from redis_server import RedisServer, require_redis_server

WAIT = 5.0  # seconds: a bound for a test that fails, never a pause


@pytest.fixture
def redis_server(tmp_path):
    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def keys() -> ClusterKeys:
    return ClusterKeys(f"t-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def raw(redis_server):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=WAIT)
    yield client
    client.close()


@pytest.fixture
def router():
    return Recorder("router")


@pytest.fixture
def start_node(redis_server, keys, router):
    def start(node: str = "n1", **options):
        clients = [connect(redis_server.url, socket_timeout=0.5, connect_timeout=0.5) for _ in range(2)]
        ref = ClusterActor.start(
            client=clients[0], subscriber_client=clients[1], prefix=keys.prefix, node=node, router=router.ref,
            **options,
        )
        ref.ask(ClusterStateQuery())
        return ref

    return start


def another_node_with(raw, keys, user: str, node: str = "n2") -> None:
    """A node alive for a minute, holding a device of ``user``."""
    raw.set(keys.node(node), b"1", px=60_000)
    raw.hset(keys.presence(user), "phone", node)


def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_announcements_go_to_the_nodes_holding_the_users_devices(start_node, raw, keys):
    ref = start_node()
    another_node_with(raw, keys, "dave")
    subscriber = raw.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(keys.channel("n2"))
    ref.tell(Announce(("dave", "nobody")))
    message = None
    deadline = time.monotonic() + WAIT
    while message is None and time.monotonic() < deadline:
        message = subscriber.get_message(timeout=0.1)
    subscriber.close()
    assert message is not None and orjson.loads(message["data"]) == ["dave"]


def test_what_other_nodes_publish_pokes_the_router_and_garbage_is_ignored(start_node, raw, keys, router, caplog):
    ref = start_node()
    until(lambda: raw.pubsub_numsub(keys.channel("n1"))[0][1] == 1, "the node did not subscribe")
    for garbage in (b"{not json", b'{"users": 1}', b'["bob", 7]'):
        raw.publish(keys.channel("n1"), garbage)
    raw.publish(keys.channel("n1"), orjson.dumps(["bob", "carol"]))
    assert router.next(Poke) == Poke(("bob", "carol"))
    assert ref.is_alive()
    ignored = [r for r in caplog.records if r.name == "devastator.actors.cluster"]
    assert len(ignored) == 1 and "ignored a publication" in ignored[0].getMessage()


def test_a_bug_is_not_taken_for_redis_trouble(start_node):
    ref = start_node()
    ref.tell(Announce(None))  # a bug upstream: not users at all
    assert ref.actor_stopped.wait(WAIT), "the cluster actor carried on after a bug"


def test_an_outage_is_logged_once_and_what_it_lost_is_redone_when_redis_is_back(
    start_node, redis_server, raw, keys, caplog
):
    caplog.set_level(logging.WARNING, logger="devastator.actors.cluster")
    ref = start_node()
    another_node_with(raw, keys, "dave")  # its key outlives the restart: the append-only file has it
    redis_server.kill()
    ref.tell(DevicePresent("carol", "phone"))  # a device connecting meanwhile
    ref.tell(Announce(("dave",)))  # a message stored meanwhile for a user on node 2
    until(lambda: ref.ask(ClusterStateQuery())["redis_down"], "the outage went unnoticed")
    assert ref.ask(ClusterStateQuery())["announced"] == 0

    redis_server.start()
    until(lambda: ref.ask(ClusterStateQuery())["announced"] == 1, "the lost announcement was not made again")
    assert raw.hget(keys.presence("carol"), "phone") == b"n1"  # recorded again
    assert not ref.ask(ClusterStateQuery())["redis_down"]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "devastator.actors.cluster"]
    assert [level for level, _ in lines] == ["ERROR", "WARNING"], lines
    assert "is failing" in lines[0][1] and "answering again" in lines[1][1]
    assert "announcements 1" in lines[1][1] and "presence_updates 1" in lines[1][1]


def test_a_subscription_to_a_redis_that_stopped_answering_is_found_out_and_made_again(
    start_node, redis_server, raw, keys, router
):
    start_node(subscriber_ping_interval=0.2)
    until(lambda: raw.pubsub_numsub(keys.channel("n1"))[0][1] == 1, "the node did not subscribe")
    redis_server.pause()  # the subscribed connection stays open and hears nothing
    # Its pings go unanswered: it subscribes again, and meanwhile every user looks again.
    assert router.next(Poke, timeout=WAIT) == Poke(None)
    redis_server.resume()
    deadline = time.monotonic() + WAIT
    while True:  # published until the new subscription hears it
        raw.publish(keys.channel("n1"), orjson.dumps(["bob"]))
        if any(poke == Poke(("bob",)) for poke in router.drain()):
            break
        assert time.monotonic() < deadline, "the node did not subscribe again"
        time.sleep(0.05)
