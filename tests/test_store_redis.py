"""The Redis store beyond the contract: cluster mode, crashes, idempotent retries, its indexes,
and failures told send by send: a script failing in mid-pipeline, answers Redis never sent, a
Redis that stops answering (SIGSTOP) and goes on."""
from __future__ import annotations

import time
import uuid

import pytest
import redis

import test_store
from devastator.store import Accepted, RedisStore, Send, StoreError, StoreUnavailableError, UnknownUserError
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
    store = new_redis_store(history_period_ms=test_store.PERIOD)
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
    store = RedisStore(
        cluster_nodes=nodes, prefix=f"test-{uuid.uuid4().hex[:12]}:", history_period_ms=test_store.PERIOD
    )
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
    sends = [Send("alice", [user], b'"to %s"' % user.encode(), f"c-{user}" if cid else None, TTL) for user in users]
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
            [Send("alice", ["bob", "carol"], b'"1"', None, TTL), Send("alice", ["carol"], b'"2"', "c-2", TTL),
             Send("alice", ["bob"], b'"3"', None, TTL)],
            NOW,
        )
    cutter.armed = False
    assert all(type(result) is StoreUnavailableError for result in results)
    # The sender too: a copy for its other devices may have landed.
    assert [result.recheck for result in results] == [("bob", "carol", "alice"), (), ()]
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
    assert unanswered.value.recheck == ("carol", "alice")
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
            (unanswered,) = store.append_many([Send("alice", ["bob"], b'"paused"', None, TTL)], NOW)
        assert time.monotonic() - started < 2.0
        assert type(unanswered) is StoreUnavailableError and unanswered.recheck == ("bob", "alice")
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


# -- receipts across two users' slots: each step safe to stop after ----------------------------


def receipt_case(store):
    """alice (phone, laptop) sent bob (phone) a message asking for receipts; bob's entry."""
    for device in ("phone", "laptop"):
        registered(store, "alice", device)
    registered(store, "bob", "phone")
    accepted = send(store, ["bob"], receipt=True, origin="phone")
    (entry,) = test_store.pending(store, "bob", "phone")
    return accepted, entry


def receipts_of(store, user="alice", device="phone"):
    return [m.id for m in test_store.pending(store, user, device) if m.kind == "receipt"]


def fail_script_once(monkeypatch, store, name, *, mode=None, error=redis.ConnectionError("lost")):
    """The store's next call of the user script ``name`` (with that mode, for "ack") fails, not run."""
    real = store._user_script
    failed = []

    def user_script(script, user, *args):
        if script == name and not failed and (mode is None or str(args[2]) == mode):
            failed.append(script)
            raise error
        return real(script, user, *args)

    monkeypatch.setattr(store, "_user_script", user_script)
    return failed


def test_an_ack_stopped_after_its_receipt_is_stored_completes_once_when_retried(store, monkeypatch):
    accepted, entry = receipt_case(store)
    failed = fail_script_once(monkeypatch, store, "ack", mode="0")  # the last step: noted, ACKed
    with pytest.raises(StoreUnavailableError):
        test_store.ack(store, "bob", "phone", [entry])
    assert failed
    rid = test_store.receipt_id(accepted.id, "delivered", "bob")
    assert receipts_of(store) == [rid]  # stored first ...
    assert [m.id for m in test_store.pending(store, "bob", "phone")] == [accepted.id]  # ... still pending
    # The device ACKs again: only what is missing is done, the receipt is not stored twice.
    assert test_store.ack(store, "bob", "phone", [entry]) == test_store.NO_RECEIPTS
    assert test_store.pending(store, "bob", "phone") == []
    assert receipts_of(store) == [rid] and receipts_of(store, device="laptop") == [rid]
    assert test_store.ack(store, "bob", "phone", [entry]) == test_store.NO_RECEIPTS
    assert store.stats() == {"users": 2, "devices": 3, "messages": 2, "pending": 3}  # the copy, the receipt


def test_an_ack_whose_receipt_could_not_be_stored_leaves_the_delivery_pending(store, raw):
    accepted, entry = receipt_case(store)
    saved = raw.dump(store._user_key("alice", "msgs"))
    break_mailbox(raw, store, "alice")  # the receipt's script fails on the sender's slot
    with pytest.raises(StoreError):
        test_store.ack(store, "bob", "phone", [entry])
    raw.delete(store._user_key("alice", "msgs"))
    raw.restore(store._user_key("alice", "msgs"), 0, saved)
    # Nothing lost: the delivery waits, and the ACK retried makes the receipt.
    assert [m.id for m in test_store.pending(store, "bob", "phone")] == [accepted.id]
    (receipt,) = test_store.ack(store, "bob", "phone", [entry]).messages
    assert receipt.id == test_store.receipt_id(accepted.id, "delivered", "bob")
    assert receipts_of(store) == [receipt.id]
    assert test_store.pending(store, "bob", "phone") == []


def test_a_receipt_pipeline_whose_answer_was_lost_is_stored_once_on_retry(store, monkeypatch):
    accepted, entry = receipt_case(store)
    real = store._store_receipts

    def lost(*args):
        real(*args)  # Redis ran it; the answer never came
        raise StoreUnavailableError("lost")

    monkeypatch.setattr(store, "_store_receipts", lost)
    with pytest.raises(StoreUnavailableError):
        test_store.ack(store, "bob", "phone", [entry])
    monkeypatch.setattr(store, "_store_receipts", real)
    assert test_store.ack(store, "bob", "phone", [entry]) == test_store.NO_RECEIPTS
    assert receipts_of(store) == [test_store.receipt_id(accepted.id, "delivered", "bob")]
    assert test_store.pending(store, "bob", "phone") == []


def test_a_read_stopped_after_its_receipts_are_stored_stores_them_once_when_retried(store, monkeypatch):
    accepted, entry = receipt_case(store)
    fail_script_once(monkeypatch, store, "read_done")
    with pytest.raises(StoreUnavailableError):
        test_store.read(store, "bob", [accepted.id])
    expected = [test_store.receipt_id(accepted.id, kind, "bob") for kind in ("delivered", "read")]
    assert receipts_of(store) == expected
    assert test_store.read(store, "bob", [accepted.id]) == test_store.NO_RECEIPTS
    assert test_store.read(store, "bob", [accepted.id]) == test_store.NO_RECEIPTS  # the record is gone now
    assert test_store.ack(store, "bob", "phone", [entry]) == test_store.NO_RECEIPTS
    assert receipts_of(store) == expected
    assert raw_wanted(store) == 0


def raw_wanted(store):
    return store._redis.hlen(store._user_key("bob", "wanted"))


def test_an_ack_without_receipts_is_one_script(store, monkeypatch):
    registered(store, "bob", "phone")
    (entry,) = send(store, ["bob"]).messages
    calls = []
    real = store._user_script
    monkeypatch.setattr(store, "_user_script", lambda name, user, *args: calls.append(name) or real(name, user, *args))
    assert test_store.ack(store, "bob", "phone", [entry]) == test_store.NO_RECEIPTS
    assert calls == ["ack"]


# -- history keys and their index ----------------------------------------------------------


def test_history_lives_under_each_user_s_tag_and_is_indexed_by_conversation(store, raw):
    for user in ("alice", "bob"):
        registered(store, user, "phone")
    send(store, ["bob"], receipt=True, now=NOW)
    send(store, ["alice"], sender="bob", now=NOW + 5)
    keys = {key.decode() for key in raw.scan_iter(match=store.prefix + "*")}
    # Each message once, on its recipient's side: bob's history of what alice sent him, and hers of bob.
    assert {store._history_key("bob", "alice"), store._history_key("alice", "bob")} <= keys
    assert store._history_key("bob", "alice").startswith(store.prefix + "{u:bob}:")
    assert raw.zcard(store._history_key("bob", "alice")) == raw.zcard(store._history_key("alice", "bob")) == 1
    assert {store._user_key("bob", "wanted"), store._user_key("bob", "wanted_expiry")} <= keys
    index = dict(raw.zrange(store._histories_key, 0, -1, withscores=True))
    assert index == {b'["bob","alice"]': NOW + test_store.PERIOD, b'["alice","bob"]': NOW + 5 + test_store.PERIOD}


def test_a_history_purge_trims_only_what_is_due_and_empties_the_index(store, raw):
    for user in ("alice", "bob"):
        registered(store, user, "phone")
    test_store.with_period(store, 10_000)
    send(store, ["bob"], now=NOW)
    young = send(store, ["bob"], now=NOW + 6000)
    store.purge_expired(NOW + 5000)  # nothing due yet
    assert raw.zcard(store._history_key("bob", "alice")) == 2
    store.purge_expired(NOW + 12_000)
    assert raw.zcard(store._history_key("bob", "alice")) == 1
    assert raw.zscore(store._histories_key, '["bob","alice"]') == NOW + 6000 + 10_000
    assert [m.id for m in test_store.history(store, "bob", "alice", now=NOW).messages] == [young.id]
    store.purge_expired(NOW + 17_000)
    assert raw.zcard(store._histories_key) == 0
    assert not raw.exists(store._history_key("alice", "bob"), store._history_key("bob", "alice"))


def test_a_message_written_during_a_history_purge_stays_indexed(store, raw):
    for user in ("alice", "bob"):
        registered(store, user, "phone")
    test_store.with_period(store, 10_000)
    send(store, ["bob"], now=NOW)
    member = '["bob","alice"]'
    key = store._history_key("bob", "alice")
    # The purge's trim has run (nothing left) ...
    assert store._scripts["trim_history"](keys=[key], args=[f"{NOW + 20_000 - 10_000:012x}"]) == -1
    # ... a send comes before the purge updates the index: its ZADD LT changed nothing ...
    later = send(store, ["bob"], now=NOW + 20_000)
    assert raw.zscore(store._histories_key, member) == NOW + 10_000
    # ... and the update, which had found nothing left, must not drop the conversation.
    store._reindex_histories({member: -1}, 10_000)
    assert raw.zscore(store._histories_key, member) == NOW + 30_000
    assert [m.id for m in test_store.history(store, "bob", "alice", now=NOW + 20_000).messages] == [later.id]


def test_records_from_before_kinds_of_entries_are_read_as_messages(store, raw):
    registered(store, "bob", "phone")
    (entry,) = send(store, ["bob"], b'"old"').messages
    # The record a message has always had: no tag, its first byte that of its ts.
    record = raw.hget(store._user_key("bob", "msgs"), f"{entry.seq:016d}")
    assert record[:1] == b"\x00"
    (loaded,) = test_store.pending(store, "bob", "phone")
    assert (loaded.kind, loaded.message_json, loaded.to_json) == ("msg", b'"old"', b"")
