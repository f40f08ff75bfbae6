"""The store contract: what every Store implementation must do, run against each of them.

Each test gets a fresh, open store from the ``store`` fixture, which is
parametrised by implementation, so a clustered store passes exactly these.
"""
from __future__ import annotations

import pytest

from devastator.store import (
    DeviceRecord,
    PushTarget,
    RedisStore,
    SqliteStore,
    UnknownDeviceError,
    UnknownUserError,
)
from redis_server import new_redis_store, redis_server  # noqa: F401 (fixtures)

NOW = 1_800_000_000_000  # ms
TTL = 3600


def sqlite_store(request, tmp_path):
    return SqliteStore(tmp_path / "store.db", synchronous="NORMAL")


def redis_store(request, tmp_path):
    # A fresh key prefix on the session's redis-server (skipped without one, failed under CI).
    return request.getfixturevalue("new_redis_store")()


STORES = {"redis": redis_store, "sqlite": sqlite_store}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    store = STORES[request.param](request, tmp_path)
    store.open()
    yield store
    store.close()


def registered(store, user: str, device: str) -> str:
    store.add_user(user, NOW)
    return store.add_device(user, device, NOW)


def send(store, recipients, body=b'"hi"', *, cid=None, ttl=TTL, now=NOW, sender="alice"):
    with store.batch():
        return store.append(sender, list(recipients), body, cid, ttl, now)


def pending(store, user, device, now=NOW):
    return store.load_pending(user, device, 0, 1000, now)


def same_data(store):
    """Another store on the same data, as the CLI opens it in another process."""
    if isinstance(store, SqliteStore):
        return SqliteStore(store.path, synchronous="NORMAL")
    assert isinstance(store, RedisStore)
    return RedisStore(store.url, cluster_nodes=store.cluster_nodes, prefix=store.prefix)


# -- users and devices ---------------------------------------------------------------


def test_users_are_created_once(store):
    assert store.add_user("alice", NOW) is True
    assert store.add_user("alice", NOW) is False
    assert store.list_users() == ["alice"]


def test_a_device_keeps_its_registration_until_removed(store):
    first = registered(store, "bob", "phone")
    assert store.add_device("bob", "phone", NOW + 1) == first
    assert store.remove_device("bob", "phone", NOW) is True
    assert store.remove_device("bob", "phone", NOW) is False
    assert store.add_device("bob", "phone", NOW) != first


def test_a_device_of_an_unknown_user_is_refused(store):
    with pytest.raises(UnknownUserError):
        store.add_device("nobody", "phone", NOW)


def test_devices_are_listed_with_their_history(store):
    registration = registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    store.attach_device("bob", "phone", registration, NOW + 5)
    assert store.list_devices("bob") == [
        DeviceRecord("laptop", NOW, None),
        DeviceRecord("phone", NOW, NOW + 5),
    ]


def test_attaching_checks_user_device_and_registration(store):
    registration = registered(store, "bob", "phone")
    with pytest.raises(UnknownUserError):
        store.attach_device("nobody", "phone", registration, NOW)
    with pytest.raises(UnknownDeviceError):
        store.attach_device("bob", "tablet", registration, NOW)
    with pytest.raises(UnknownDeviceError):
        store.attach_device("bob", "phone", "stale", NOW)
    assert store.attach_device("bob", "phone", registration, NOW).pending == 0


# -- messages ----------------------------------------------------------------------------


def test_a_message_waits_for_every_device_in_order(store):
    phone, laptop = registered(store, "bob", "phone"), registered(store, "bob", "laptop")
    first = send(store, ["bob"], b'"one"')
    second = send(store, ["bob"], b'"two"')
    for device, registration in (("phone", phone), ("laptop", laptop)):
        assert store.attach_device("bob", device, registration, NOW).pending == 2
        assert [m.id for m in pending(store, "bob", device)] == [first.id, second.id]
    (message,) = first.messages
    assert (message.sender, message.recipient, message.message_json) == ("alice", "bob", b'"one"')
    assert message.expires == NOW + TTL * 1000


def test_unknown_recipients_fail_the_whole_send(store):
    registered(store, "bob", "phone")
    with pytest.raises(UnknownUserError) as unknown:
        send(store, ["bob", "carol"])
    assert unknown.value.args[0] == ["carol"]
    assert pending(store, "bob", "phone") == []


def test_a_retried_cid_is_stored_once_with_the_same_answer(store):
    registered(store, "bob", "phone")
    first = send(store, ["bob"], cid="c-1")
    again = send(store, ["bob"], cid="c-1", now=NOW + 10)
    assert (again.id, again.ts, again.duplicate, again.messages) == (first.id, first.ts, True, ())
    assert len(pending(store, "bob", "phone")) == 1
    other_sender = send(store, ["bob"], cid="c-1", sender="carol")
    assert other_sender.id != first.id


def test_pages_follow_the_cursor(store):
    registered(store, "bob", "phone")
    ids = [send(store, ["bob"], b"%d" % n).id for n in range(5)]
    page = store.load_pending("bob", "phone", 0, 2, NOW)
    assert [m.id for m in page] == ids[:2]
    rest = store.load_pending("bob", "phone", page[-1].seq, 10, NOW)
    assert [m.id for m in rest] == ids[2:]


def test_a_message_is_retired_once_every_device_acked(store):
    registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    (message,) = send(store, ["bob"]).messages
    with store.batch():
        store.ack("bob", "phone", [message.seq])
    assert pending(store, "bob", "phone") == []
    assert [m.id for m in pending(store, "bob", "laptop")] == [message.id]
    with store.batch():
        store.ack("bob", "laptop", [message.seq])
    assert pending(store, "bob", "laptop") == []


def test_expired_messages_are_not_loaded_and_are_purged(store):
    registered(store, "bob", "phone")
    send(store, ["bob"], ttl=1)
    kept = send(store, ["bob"], ttl=TTL)
    later = NOW + 2000
    assert [m.id for m in pending(store, "bob", "phone", now=later)] == [kept.id]
    with store.batch():
        assert store.purge_expired(later) == 1
    assert [m.id for m in pending(store, "bob", "phone", now=later)] == [kept.id]


def test_a_first_attachment_gets_what_is_still_stored(store):
    registered(store, "bob", "phone")
    sent = send(store, ["bob"])
    tablet = store.add_device("bob", "tablet", NOW)
    assert store.attach_device("bob", "tablet", tablet, NOW).pending == 1
    assert [m.id for m in pending(store, "bob", "tablet")] == [sent.id]


def test_a_user_with_no_device_keeps_messages_for_the_first(store):
    store.add_user("carol", NOW)
    sent = send(store, ["carol"])
    first = store.add_device("carol", "first", NOW)
    assert store.attach_device("carol", "first", first, NOW).pending == 1
    assert [m.id for m in pending(store, "carol", "first")] == [sent.id]


# -- removing devices ----------------------------------------------------------------------


def test_removing_a_device_retires_what_only_it_waited_for(store):
    registered(store, "bob", "phone")
    laptop = registered(store, "bob", "laptop")
    (message,) = send(store, ["bob"]).messages
    with store.batch():
        store.ack("bob", "laptop", [message.seq])
    store.remove_device("bob", "phone", NOW)
    # Nobody waits for it now: a device attaching for the first time does not get it.
    tablet = store.add_device("bob", "tablet", NOW)
    assert store.attach_device("bob", "tablet", tablet, NOW).pending == 0
    assert store.attach_device("bob", "laptop", laptop, NOW).pending == 0


def test_removing_the_last_device_keeps_messages_for_the_next(store):
    registered(store, "bob", "phone")
    sent = send(store, ["bob"])
    store.remove_device("bob", "phone", NOW)
    tablet = store.add_device("bob", "tablet", NOW)
    assert store.attach_device("bob", "tablet", tablet, NOW).pending == 1
    assert [m.id for m in pending(store, "bob", "tablet")] == [sent.id]


def test_removals_are_read_from_a_cursor(store):
    registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    start = store.removed_devices(None)
    assert start.devices == ()
    store.remove_device("bob", "phone", NOW)
    store.remove_device("bob", "laptop", NOW)
    removed = store.removed_devices(start.cursor)
    assert removed.devices == (("bob", "phone"), ("bob", "laptop"))
    assert store.removed_devices(removed.cursor).devices == ()
    assert store.removed_devices(None).cursor == removed.cursor


# -- push tokens ---------------------------------------------------------------------------


def test_a_push_token_is_kept_with_its_device_and_named_at_each_send(store):
    registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    assert store.set_push_token("bob", "phone", "fcm", "t-1") is True
    assert store.set_push_token("bob", "ghost", "fcm", "t-2") is False
    accepted = send(store, ["bob"])
    assert accepted.push_targets == (PushTarget("bob", "phone", "fcm", "t-1"),)
    assert store.device_for_push_token("fcm", "t-1") == ("bob", "phone")
    assert store.device_for_push_token("apns", "t-1") is None


def test_a_push_token_belongs_to_one_device(store):
    registered(store, "bob", "phone")
    registered(store, "carol", "phone")
    store.set_push_token("bob", "phone", "fcm", "t-1")
    store.set_push_token("carol", "phone", "fcm", "t-1")
    assert store.device_for_push_token("fcm", "t-1") == ("carol", "phone")
    assert send(store, ["bob"]).push_targets == ()


def test_a_dead_token_is_removed_only_if_the_device_still_has_it(store):
    registered(store, "bob", "phone")
    store.set_push_token("bob", "phone", "fcm", "t-1")
    store.set_push_token("bob", "phone", "fcm", "t-2")  # the app got a new token meanwhile
    assert store.remove_push_token("bob", "phone", "fcm", "t-1") is False
    assert store.device_for_push_token("fcm", "t-2") == ("bob", "phone")
    assert store.remove_push_token("bob", "phone", "fcm", "t-2") is True
    assert send(store, ["bob"]).push_targets == ()


# -- operators' views ------------------------------------------------------------------------


def test_the_backlog_counts_pending_deliveries_per_device(store):
    registered(store, "bob", "phone")
    registered(store, "bob", "laptop")
    send(store, ["bob"], now=NOW)
    (later,) = send(store, ["bob"], now=NOW + 5).messages
    with store.batch():
        store.ack("bob", "laptop", [later.seq])
    assert store.backlog("bob", NOW + 10) == {"phone": (2, NOW), "laptop": (1, NOW)}
    assert store.backlog("nobody", NOW) == {}


def test_expiring_a_user_s_messages_empties_every_device(store):
    registered(store, "bob", "phone")
    registered(store, "carol", "phone")
    send(store, ["bob", "carol"])
    send(store, ["bob"])
    assert store.expire_user("bob", NOW) == 2
    assert pending(store, "bob", "phone") == []
    assert len(pending(store, "carol", "phone")) == 1
    assert store.stats() == {"users": 2, "devices": 2, "messages": 1, "pending": 1}


def test_the_counts_follow_every_change(store):
    counts = {"users": 0, "devices": 0, "messages": 0, "pending": 0}

    def changed(**deltas):
        for name, delta in deltas.items():
            counts[name] += delta
        assert store.stats() == counts

    changed()
    phone = registered(store, "bob", "phone")
    registered(store, "bob", "phone")  # nothing new
    store.add_user("carol", NOW)  # no device yet
    changed(users=2, devices=1)
    first = send(store, ["bob", "carol"]).messages[0]
    (second,) = send(store, ["bob"], cid="c-1").messages
    send(store, ["bob"], cid="c-1")  # a retry stores nothing
    changed(messages=3, pending=2)
    laptop = store.add_device("bob", "laptop", NOW)
    store.attach_device("bob", "laptop", laptop, NOW)  # a first attachment: bob's two messages
    store.attach_device("bob", "phone", phone, NOW)
    changed(devices=1, pending=2)
    with store.batch():
        store.ack("bob", "phone", [first.seq, second.seq])
        store.ack("bob", "phone", [first.seq])  # again: nothing more
    changed(pending=-2)
    with store.batch():
        store.ack("bob", "laptop", [first.seq])  # nobody waits for it now
    changed(messages=-1, pending=-1)
    store.remove_device("bob", "laptop", NOW)  # the second was only the laptop's
    changed(devices=-1, messages=-1, pending=-1)
    assert store.remove_device("bob", "laptop", NOW) is False
    changed()
    assert store.expire_user("carol", NOW) == 1
    changed(messages=-1)
    send(store, ["bob"], ttl=1)
    changed(messages=1, pending=1)
    with store.batch():
        store.purge_expired(NOW + 1000)
    changed(messages=-1, pending=-1)
    assert counts == {"users": 2, "devices": 1, "messages": 0, "pending": 0}


def test_the_counts_include_what_another_process_changed(store):
    other = same_data(store)
    other.open()
    try:
        registered(other, "bob", "phone")
        send(other, ["bob"])
    finally:
        other.close()
    assert store.stats() == {"users": 1, "devices": 1, "messages": 1, "pending": 1}
    (message,) = pending(store, "bob", "phone")
    with store.batch():
        store.ack("bob", "phone", [message.seq])
    other.open()
    try:
        assert other.stats() == {"users": 1, "devices": 1, "messages": 0, "pending": 0}
    finally:
        other.close()


def test_several_sends_at_once_keep_their_order_and_their_own_failures(store):
    registered(store, "bob", "phone")
    store.add_user("carol", NOW)
    sends = [
        ("alice", ["bob"], b'"one"', None, TTL),
        ("alice", ["bob", "nobody"], b'"lost"', None, TTL),
        ("alice", ["bob", "carol"], b'"two"', "c-1", TTL),
        ("alice", ["bob"], b'"three"', None, TTL),
        ("alice", ["bob"], b'"two again"', "c-1", TTL),
    ]
    with store.batch():
        results = store.append_many(sends, NOW)
    assert isinstance(results[1], UnknownUserError) and results[1].args[0] == ["nobody"]
    assert results[4].duplicate and results[4].id == results[2].id
    assert [m.message_json for m in pending(store, "bob", "phone")] == [b'"one"', b'"two"', b'"three"']
    seqs = [results[i].messages[0].seq for i in (0, 2, 3)]
    assert seqs == sorted(seqs)
