"""Tests of the router actor: user actors on demand, routing, ticks, idle stops."""
from __future__ import annotations

import time

import pytest

from devastator.actors import RouterActor
from devastator.actors.messages import (
    Announce,
    Committed,
    DeviceOffline,
    DeviceOnline,
    DeviceRemoved,
    DevicesRemoved,
    OnlineUsersQuery,
    Poke,
    PollRemovals,
    PurgeExpired,
    Tick,
)
from devastator.store import StoredMessage

from actor_fakes import Recorder

IDLE = 60.0
LATER = 10**9  # a Tick.now far past any idle timeout started by time.monotonic()


class UserFactory:
    """``start_user`` for the router: a recorder per start, and who was started."""

    def __init__(self):
        self.started: list[str] = []
        self.actors: dict[str, list] = {}

    def __call__(self, user: str):
        self.started.append(user)
        probe = Recorder(f"user {user} #{len(self.actors.get(user, ())) + 1}")
        self.actors.setdefault(user, []).append(probe)
        return probe.ref

    def last(self, user: str):
        return self.actors[user][-1]


@pytest.fixture
def users():
    return UserFactory()


@pytest.fixture
def store():
    return Recorder("store")


@pytest.fixture
def device():
    return Recorder("device")


@pytest.fixture
def router(store, users):
    return RouterActor.start(store=store.ref, start_user=users, user_idle_timeout=IDLE, purge_interval=10.0)


def stored(seq: int, recipient: str) -> StoredMessage:
    return StoredMessage(seq, f"m{seq}", "zed", recipient, b"{}", 1_000, 10**15)


def test_a_user_actor_is_started_on_its_first_device_only(router, users, device):
    phone = DeviceOnline("alice", "phone", "reg", device.ref, 1)
    tablet = DeviceOnline("alice", "tablet", "reg", device.ref, 2)
    router.tell(phone)
    router.tell(tablet)
    router.tell(DeviceOnline("bob", "phone", "reg", device.ref, 3))

    assert router.ask(OnlineUsersQuery()) == {"alice": {"online": 2}, "bob": {"online": 1}}
    assert users.started == ["alice", "bob"]
    assert users.last("alice").drain() == [phone, tablet]


def test_committed_messages_go_to_live_users_only_split_and_in_order(router, users, device):
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 1))
    router.tell(DeviceOnline("bob", "phone", "reg", device.ref, 2))
    router.ask(OnlineUsersQuery())
    alice, bob = users.last("alice"), users.last("bob")
    alice.drain()
    bob.drain()

    router.tell(Committed((
        stored(1, "alice"), stored(2, "carol"), stored(3, "bob"), stored(4, "alice"), stored(5, "bob"),
    )))
    router.tell(Committed((stored(6, "carol"),)))
    router.ask(OnlineUsersQuery())

    assert alice.drain() == [Committed((stored(1, "alice"), stored(4, "alice")))]
    assert bob.drain() == [Committed((stored(3, "bob"), stored(5, "bob")))]
    assert users.started == ["alice", "bob"]  # carol has no device online: the store keeps hers


def test_ticks_reach_users_with_devices_online_and_purge_on_schedule(router, users, store, device):
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 1))
    router.ask(OnlineUsersQuery())
    alice = users.last("alice")
    alice.drain()

    for now in (5.0, 6.0, 14.9, 15.0):
        router.tell(Tick(now))
    router.ask(OnlineUsersQuery())

    assert alice.drain() == [Tick(5.0), Tick(6.0), Tick(14.9), Tick(15.0)]
    polls = [PollRemovals(None, router)]  # on start: the cursor of now
    assert store.drain() == [*polls, PurgeExpired(), PurgeExpired()]  # at 5.0, then at 15.0


def test_an_idle_user_actor_is_stopped_and_started_again_when_needed(router, users, device):
    online = DeviceOnline("alice", "phone", "reg", device.ref, 1)
    router.tell(online)
    router.tell(DeviceOffline("alice", "phone", device.ref))
    router.ask(OnlineUsersQuery())
    first = users.last("alice")
    assert first.drain() == [online, DeviceOffline("alice", "phone", device.ref)]

    # Offline, but not for user_idle_timeout yet.
    router.tell(Tick(time.monotonic()))
    assert router.ask(OnlineUsersQuery()) == {"alice": {"online": 0}}
    assert first.ref.is_alive()
    assert first.drain() == []  # no ticks for a user with no device online

    router.tell(Tick(LATER))
    assert router.ask(OnlineUsersQuery()) == {}
    assert first.ref.actor_stopped.wait(2)
    assert not first.ref.is_alive()

    router.tell(Committed((stored(1, "alice"),)))  # for nobody live: the store keeps it
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 2))
    assert router.ask(OnlineUsersQuery()) == {"alice": {"online": 1}}
    assert users.started == ["alice", "alice"]
    second = users.last("alice")
    assert second is not first
    assert second.drain() == [DeviceOnline("alice", "phone", "reg", device.ref, 2)]


def test_a_user_with_one_device_left_online_is_not_stopped(router, users, device):
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 1))
    router.tell(DeviceOnline("alice", "tablet", "reg", device.ref, 2))
    router.tell(DeviceOffline("alice", "phone", device.ref))
    router.tell(Tick(LATER))

    assert router.ask(OnlineUsersQuery()) == {"alice": {"online": 1}}
    alice = users.last("alice")
    assert alice.ref.is_alive()
    assert alice.drain()[-1] == Tick(LATER)


def test_a_device_offline_for_a_user_not_live_is_ignored(router, users, device):
    router.tell(DeviceOffline("alice", "phone", device.ref))
    assert router.ask(OnlineUsersQuery()) == {}
    assert users.started == []


def test_the_router_survives_a_user_actor_that_died(router, users, device):
    """A user actor that failed (an unhandled exception stops a pykka actor) must
    not take the router, and with it every user's traffic, down."""
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 1))
    router.ask(OnlineUsersQuery())
    users.last("alice").ref.stop()

    router.tell(Committed((stored(1, "alice"),)))
    router.tell(Tick(5.0))
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 2))

    # The first connection still counts until its DeviceOffline: a dead user actor leaves the counts true.
    assert router.ask(OnlineUsersQuery(), timeout=2)["alice"]["online"] == 2
    assert router.is_alive()
    assert len(users.actors["alice"]) == 2  # a fresh one took over at the first tell that failed
    assert DeviceOnline("alice", "phone", "reg", device.ref, 2) in users.last("alice").drain()


def test_stopping_the_router_stops_its_user_actors(router, users, device):
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 1))
    router.ask(OnlineUsersQuery())
    router.stop()
    assert not users.last("alice").ref.is_alive()


def test_removed_devices_are_polled_for_and_their_users_told(router, users, store, device):
    assert store.next(PollRemovals) == PollRemovals(None, router)
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 1))
    router.tell(DevicesRemoved(7, ()))  # the answer to the first poll: nothing since start
    router.tell(Tick(LATER))
    assert store.next(PurgeExpired) == PurgeExpired()
    assert store.next(PollRemovals) == PollRemovals(7, router)
    router.tell(Tick(LATER + 1.5))  # a poll is out: no second one
    router.tell(DevicesRemoved(9, (("alice", "phone"), ("nobody-online", "x"))))
    router.tell(Tick(LATER + 2.0))
    router.ask(OnlineUsersQuery())

    assert DeviceRemoved("phone") in users.last("alice").drain()
    assert [m for m in store.drain() if isinstance(m, PollRemovals)] == [PollRemovals(9, router)]


def test_users_to_recheck_read_their_mailboxes_again_here_and_on_other_nodes(store, users, device):
    cluster = Recorder("cluster")
    router = RouterActor.start(
        store=store.ref, start_user=users, user_idle_timeout=IDLE, start_cluster=lambda _router: cluster.ref
    )
    router.tell(DeviceOnline("alice", "phone", "reg", device.ref, 1))
    router.tell(DeviceOnline("bob", "phone", "reg", device.ref, 2))
    # The store could not tell whether a send to bob and carol landed; one to alice did.
    router.tell(Committed((stored(7, "alice"),), recheck=("bob", "carol")))
    router.ask(OnlineUsersQuery())

    assert [m for m in users.last("alice").drain() if isinstance(m, Committed)] == [Committed((stored(7, "alice"),))]
    assert [m for m in users.last("bob").drain() if isinstance(m, Poke)] == [Poke(None)]
    assert "carol" not in users.started  # no device online here: nothing to tell
    (announced,) = [m for m in cluster.drain() if isinstance(m, Announce)]
    assert sorted(announced.users) == ["alice", "bob", "carol"]
