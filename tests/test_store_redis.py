"""The Redis store beyond the contract: cluster mode, crashes, idempotent retries, its indexes,
and failures told send by send: a script failing in mid-pipeline, answers Redis never sent, a
Redis that stops answering (SIGSTOP) and goes on."""
from __future__ import annotations

import time
import uuid

import pytest
import redis

import test_store
from devastator.store import Accepted, RedisStore, StoreError, StoreUnavailableError, UnknownUserError
from redis_server import (  # noqa: F401 (fixtures)
    RedisServer,
    ReplyCutter,
    new_redis_store,
    redis_cluster,
    redis_server,
    require_redis_server,
)

NOW = test_store.NOW
TTL = test_store.TTL
CONTRACT = sorted(name for name in dir(test_store) if name.startswith("test_"))


@pytest.fixture
def store(new_redis_store):
    store = new_redis_store()
    store.open()
    yield store
    store.close()


@pytest.fixture
def raw(redis_server):
    """A plain client on the store's server, to look at its keys."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def registered(store, user, device):
    return test_store.registered(store, user, device)


def send(store, recipients, body=b'"hi"', **options):
    return test_store.send(store, recipients, body, **options)


# -- Redis Cluster -------------------------------------------------------------------------


@pytest.mark.parametrize("contract", CONTRACT)
def test_the_contract_holds_on_a_cluster(redis_cluster, contract):
    nodes = [f"127.0.0.1:{server.port}" for server in redis_cluster]
    store = RedisStore(cluster_nodes=nodes, prefix=f"test-{uuid.uuid4().hex[:12]}:")
    store.open()
    try:
        getattr(test_store, contract)(store)
    finally:
        store.close()


# -- idempotent sends ----------------------------------------------------------------------


def test_a_send_retried_after_a_failure_half_way_reaches_only_the_rest(store, raw):
    registered(store, "bob", "phone")
    registered(store, "carol", "phone")
    # Carol's keys broken on purpose: her script fails, Bob's (same pipeline) has run.
    user_key = store._user_key("carol", "user")
    saved = raw.hgetall(user_key)
    raw.delete(user_key)
    raw.set(user_key, b"broken")
    with pytest.raises(StoreError) as failed:
        send(store, ["bob", "carol"], b'"once"', cid="c-1")
    # What it did store is told, and Carol's mailbox is to be read again (her script may have half-run).
    assert [m.recipient for m in failed.value.messages] == ["bob"]
    assert failed.value.recheck == ("carol",)
    assert len(test_store.pending(store, "bob", "phone")) == 1
    raw.delete(user_key)
    raw.hset(user_key, mapping=saved)

    retried = send(store, ["bob", "carol"], b'"once"', cid="c-1", now=NOW + 10)
    assert retried.duplicate is False
    assert [(m.recipient, m.id, m.ts) for m in retried.messages] == [("carol", retried.id, NOW)]
    assert retried.recheck == ("bob",)  # the first try reached Bob: was he told?
    (to_bob,) = test_store.pending(store, "bob", "phone")
    (to_carol,) = test_store.pending(store, "carol", "phone")
    assert to_bob.id == to_carol.id == retried.id
    again = send(store, ["bob", "carol"], b'"once"', cid="c-1", now=NOW + 20)
    assert (again.id, again.duplicate, again.messages, again.recheck) == (retried.id, True, (), ("bob", "carol"))
    assert store.stats()["messages"] == 2


def test_a_retry_that_names_more_recipients_stores_for_the_new_ones(store):
    registered(store, "bob", "phone")
    registered(store, "carol", "phone")
    first = send(store, ["bob"], cid="c-1")
    second = send(store, ["bob", "carol"], cid="c-1", now=NOW + 5)
    assert second.id == first.id and not second.duplicate
    assert [m.recipient for m in second.messages] == ["carol"]
    assert len(test_store.pending(store, "bob", "phone")) == 1


def test_an_unknown_recipient_leaves_the_cid_unclaimed(store):
    registered(store, "bob", "phone")
    with pytest.raises(UnknownUserError):
        send(store, ["bob", "nobody"], cid="c-1")
    accepted = send(store, ["bob"], cid="c-1")
    assert not accepted.duplicate and len(accepted.messages) == 1


def test_an_expired_cid_record_is_a_new_send(store):
    registered(store, "bob", "phone")
    first = send(store, ["bob"], cid="c-1", ttl=1)
    later = send(store, ["bob"], cid="c-1", now=NOW + 2000)
    assert later.id != first.id and not later.duplicate


# -- bodies, indexes, housekeeping -----------------------------------------------------------


def test_bodies_come_back_byte_exact(store):
    registered(store, "bob", "phone")
    bodies = [b'{"a":"\\u00e9\xc3\xa9","n":1e3}', b'"\\u0000"', b"[" + b"7," * 5000 + b"7]"]
    for body in bodies:
        send(store, ["bob"], body)
    assert [m.message_json for m in test_store.pending(store, "bob", "phone")] == bodies


def test_a_purge_empties_the_indexes_and_the_counters(store, raw):
    registered(store, "bob", "phone")
    send(store, ["bob"], ttl=1, cid="c-1")
    assert raw.zscore(store._expiring_key, "bob") == NOW + 1000
    assert store.purge_expired(NOW + 1000) == 1
    assert raw.zscore(store._expiring_key, "bob") is None
    assert raw.zcard(store._user_key("bob", "ids")) == 0
    assert store.stats() == {"users": 1, "devices": 1, "messages": 0, "pending": 0}


def test_a_purge_keeps_the_user_indexed_until_its_last_message(store, raw):
    registered(store, "bob", "phone")
    send(store, ["bob"], ttl=1)
    send(store, ["bob"], ttl=60)
    assert store.purge_expired(NOW + 1000) == 1
    assert raw.zscore(store._expiring_key, "bob") == NOW + 60_000
    assert store.purge_expired(NOW + 60_000) == 1


def test_a_message_appended_during_a_purge_stays_indexed(store, raw):
    registered(store, "bob", "phone")
    send(store, ["bob"], ttl=1)
    # The purge's script for Bob has run (he has nothing left) ...
    purge = store._scripts["purge"]
    assert purge(keys=store._user_keys("bob"), args=[NOW + 1000, 100]) == [1, 1, -1]
    # ... a send comes before the purge updates the index: its ZADD LT changed nothing ...
    send(store, ["bob"], ttl=60, now=NOW + 1000)
    assert raw.zscore(store._expiring_key, "bob") == NOW + 1000
    # ... and the update, which had found nothing left, must not drop Bob.
    store._reindex({"bob": -1})
    assert raw.zscore(store._expiring_key, "bob") == NOW + 61_000


def test_old_removals_are_trimmed_and_the_cursor_kept(store):
    for device in ("a", "b", "c"):
        registered(store, "bob", device)
    store.remove_device("bob", "a", NOW)
    store.remove_device("bob", "b", NOW)
    cursor = store.removed_devices(None).cursor
    store.purge_expired(NOW + 2 * 24 * 3600 * 1000)
    assert store.removed_devices(0).devices == (("bob", "b"),)  # the newest stays
    assert store.removed_devices(None).cursor == cursor
    store.remove_device("bob", "c", NOW)
    assert store.removed_devices(cursor).devices == (("bob", "c"),)


def test_removing_a_device_frees_its_push_token(store):
    registered(store, "bob", "phone")
    store.set_push_token("bob", "phone", "fcm", "t-1")
    store.set_push_token("bob", "phone", "fcm", "t-2")
    assert store.device_for_push_token("fcm", "t-1") is None
    store.remove_device("bob", "phone", NOW)
    assert store.device_for_push_token("fcm", "t-2") is None


def test_keys_stay_under_the_prefix_and_a_user_s_under_its_tag(store, raw):
    registered(store, "bob", "phone")
    store.set_push_token("bob", "phone", "fcm", "t-1")
    send(store, ["bob"], cid="c-1")
    store.remove_device("bob", "phone", NOW)
    keys = sorted(key.decode() for key in raw.scan_iter(match=store.prefix + "*"))
    assert keys and all(key.startswith(store.prefix) for key in keys)
    assert {key.rsplit(":", 1)[-1] for key in keys if "{u:bob}" in key} >= {"user", "msgs", "expiry", "ids"}
    assert store._user_key("alice", "cid:c-1") in keys


def test_construction_does_no_io_and_an_unreachable_redis_fails_open():
    store = RedisStore("redis://127.0.0.1:1/0", connect_timeout=0.5)
    with pytest.raises(RuntimeError):
        store.stats()
    with pytest.raises(StoreUnavailableError):
        store.open()


# -- failures, send by send ------------------------------------------------------------------


@pytest.fixture
def cutter(redis_server):
    """A proxy to the session's redis-server that loses its answers when armed."""
    proxy = ReplyCutter(redis_server.port).start()
    yield proxy
    proxy.stop()


def break_mailbox(raw, store, user):
    """The user's messages hash made a string: its append script fails (WRONGTYPE) before storing."""
    raw.set(store._user_key(user, "msgs"), b"broken")


@pytest.mark.parametrize("cid", [False, True], ids=["together", "with-cids"])
@pytest.mark.parametrize("failing", [0, 1, 2], ids=["first", "middle", "last"])
def test_each_send_of_a_group_gets_its_own_outcome(store, raw, failing, cid):
    users = ["bob", "carol", "dave"]
    for user in users:
        registered(store, user, "phone")
    break_mailbox(raw, store, users[failing])
    sends = [("alice", [user], b'"to %s"' % user.encode(), f"c-{user}" if cid else None, TTL) for user in users]
    with store.batch():
        results = store.append_many(sends, NOW)
    raw.delete(store._user_key(users[failing], "msgs"))

    for user, result in zip(users, results):
        if user == users[failing]:
            assert type(result) is StoreError
            assert (result.messages, result.recheck) == ((), (user,))
            assert test_store.pending(store, user, "phone") == []
        else:
            assert isinstance(result, Accepted) and result.recheck == ()
            assert [m.id for m in test_store.pending(store, user, "phone")] == [result.id]
            assert [m.recipient for m in result.messages] == [user]
    assert store.stats()["messages"] == 2


def test_sends_whose_answers_are_lost_name_their_recipients_and_the_rest_are_not_tried(store, cutter):
    for user in ("bob", "carol"):
        registered(store, user, "phone")
    cut = RedisStore(cutter.url, prefix=store.prefix)
    cut.open()
    assert cut.has_user("bob") and cut.has_user("carol")  # known: their sends go together
    cutter.arm()
    with cut.batch():
        results = cut.append_many(
            [("alice", ["bob", "carol"], b'"1"', None, TTL), ("alice", ["carol"], b'"2"', "c-2", TTL),
             ("alice", ["bob"], b'"3"', None, TTL)],
            NOW,
        )
    cutter.armed = False
    assert all(type(result) is StoreUnavailableError for result in results)
    assert [result.recheck for result in results] == [("bob", "carol"), (), ()]
    # Redis did run the first send, and was never sent the others.
    for user in ("bob", "carol"):
        assert [m.message_json for m in test_store.pending(store, user, "phone")] == [b'"1"']
    assert cut.append("alice", ["bob"], b'"4"', None, TTL, NOW).messages  # a new connection serves again
    cut.close()


def test_a_cid_whose_answer_was_lost_completes_once_and_asks_for_a_recheck(store, cutter):
    registered(store, "carol", "phone")
    cut = RedisStore(cutter.url, prefix=store.prefix)
    cut.open()
    assert cut.has_user("carol")
    cutter.arm(after=1)  # the claim is answered; the script's answer is lost
    with pytest.raises(StoreUnavailableError) as unanswered:
        send(cut, ["carol"], b'"once"', cid="c-1")
    cutter.armed = False
    assert unanswered.value.recheck == ("carol",)
    (landed,) = test_store.pending(store, "carol", "phone")

    retried = send(cut, ["carol"], b'"once"', cid="c-1", now=NOW + 10)
    assert (retried.id, retried.ts, retried.duplicate, retried.messages) == (landed.id, landed.ts, True, ())
    assert retried.recheck == ("carol",)  # the first try's success may never have been told
    assert len(test_store.pending(store, "carol", "phone")) == 1
    cut.close()


def test_a_paused_redis_fails_calls_within_the_timeout_and_serves_again_once_resumed(tmp_path):
    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        store = RedisStore(server.url, socket_timeout=0.5)
        store.open()
        registered(store, "bob", "phone")
        server.pause()
        started = time.monotonic()
        with store.batch():
            (unanswered,) = store.append_many([("alice", ["bob"], b'"paused"', None, TTL)], NOW)
        assert time.monotonic() - started < 2.0
        assert type(unanswered) is StoreUnavailableError and unanswered.recheck == ("bob",)
        with pytest.raises(StoreUnavailableError):
            store.stats()

        server.resume()
        # Redis runs what it was sent while paused: that is why the recipient is rechecked.
        deadline = time.monotonic() + 5
        while not test_store.pending(store, "bob", "phone"):
            assert time.monotonic() < deadline, "the send made while Redis was paused never landed"
            time.sleep(0.02)
        assert send(store, ["bob"], b'"resumed"').messages
        assert [m.message_json for m in test_store.pending(store, "bob", "phone")] == [b'"paused"', b'"resumed"']
        store.close()
    finally:
        server.stop()


# -- crashes ------------------------------------------------------------------------------


def test_a_killed_redis_keeps_every_answered_call(tmp_path):
    require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        store = RedisStore(server.url)
        store.open()
        registration = registered(store, "bob", "phone")
        store.attach_device("bob", "phone", registration, NOW)
        with store.batch():
            sent = [store.append("alice", ["bob"], b'"%d"' % n, f"c-{n}", TTL, NOW) for n in range(20)]
        store.remove_device("bob", "gone", NOW)
        server.kill()
        server.start()
        # The same store carries on: a new connection, its scripts loaded again.
        assert [m.id for m in test_store.pending(store, "bob", "phone")] == [a.id for a in sent]
        again = send(store, ["bob"], cid="c-3")
        assert again.duplicate and again.id == sent[3].id
        assert store.stats() == {"users": 1, "devices": 1, "messages": 20, "pending": 20}
        store.close()
    finally:
        server.stop()
