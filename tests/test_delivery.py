"""Delivery guarantees over real TLS (PROTOCOL.md sections 5 and 6)."""
import time

import gevent
import pytest

from devastator.actors.messages import OnlineUsersQuery
from wire import RawTls


@pytest.fixture
def quick(servers):
    """A server whose ACK timeout is short enough to watch a redelivery."""
    return servers(ack_timeout=0.5)


def test_online_delivery_with_ack(running):
    alice = running.connect("alice")
    bob = running.connect("bob")
    result = alice.send("bob", {"text": "hello"})
    assert set(result) == {"id", "ts"}
    message = bob.receive(timeout=5)
    assert message == {
        "id": result["id"],
        "from": "alice",
        "to": "bob",
        "message": {"text": "hello"},
        "ts": result["ts"],
        "expires": result["ts"] + running.settings.default_ttl * 1000,
    }
    # Acked: a reconnect brings nothing back.
    bob.ping()  # the ACK went before this answer
    bob.close()
    again = running.tls_client()
    assert again.auth_jwt(running.token("bob"))["pending"] == 0


def test_unacked_message_is_sent_again_on_reconnect(running):
    alice = running.connect("alice")
    bob = running.connect("bob", auto_ack=False)
    sent = alice.send("bob", "are you there?")
    assert bob.receive(timeout=5)["id"] == sent["id"]
    bob.close()
    bob = running.tls_client()
    assert bob.auth_jwt(running.token("bob"))["pending"] == 1
    assert bob.receive(timeout=5)["id"] == sent["id"]


def test_unacked_message_is_sent_again_after_the_ack_timeout(quick):
    alice = quick.connect("alice")
    bob = quick.connect("bob", auto_ack=False, dedupe=False)
    sent = alice.send("bob", "ping me back")
    first = bob.receive(timeout=5)
    second = bob.receive(timeout=5)  # same connection, after ack_timeout
    assert first["id"] == second["id"] == sent["id"]
    bob.ack([sent["id"]])
    bob.ping()
    with pytest.raises(TimeoutError):
        bob.receive(timeout=1.5)  # acked: no third delivery


def test_offline_messages_arrive_as_one_batch_right_after_auth(running):
    alice = running.connect("alice")
    token = running.token("bob")
    ids = [alice.send("bob", {"n": n})["id"] for n in range(150)]
    raw = RawTls(running)
    raw.send_value({"jsonrpc": "2.0", "method": "auth.jwt", "params": {"token": token}, "id": "a"})
    assert raw.read_one() == {
        "jsonrpc": "2.0", "id": "a", "result": {"user": "bob", "device": "default", "pending": 150}
    }
    first, second = raw.read(2)
    assert isinstance(first, list) and isinstance(second, list)
    assert [len(first), len(second)] == [100, 50]  # chunks of at most 100
    requests = first + second
    assert [r["id"] for r in requests] == ids
    assert all(r["method"] == "msg.recv" and r["jsonrpc"] == "2.0" for r in requests)
    assert [r["params"]["message"]["n"] for r in requests] == list(range(150))
    raw.send_value([{"jsonrpc": "2.0", "id": r["id"], "result": "ACK"} for r in requests])
    assert raw.call("ping", id=1) == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
    raw.close()
    again = running.tls_client()
    assert again.auth_jwt(running.token("bob"))["pending"] == 0


def test_two_devices_of_one_user_each_get_the_message(running):
    alice = running.connect("alice")
    phone = running.connect("bob", "phone")
    laptop_token = running.token("bob", "laptop")  # known device, offline
    sent = alice.send("bob", "to all of bob")
    assert phone.receive(timeout=5)["id"] == sent["id"]
    phone.ping()
    laptop = running.tls_client()
    assert laptop.auth_jwt(laptop_token)["pending"] == 1
    assert laptop.receive(timeout=5)["id"] == sent["id"]


def test_a_device_that_first_authenticates_later_gets_what_is_still_stored(running):
    alice = running.connect("alice")
    phone = running.connect("bob", "phone", auto_ack=False)
    sent = alice.send("bob", "early")
    assert phone.receive(timeout=5)["id"] == sent["id"]
    # A brand-new device (never seen) gets the message the phone has not ACKed yet.
    tablet = running.tls_client()
    assert tablet.auth_jwt(running.token("bob", "tablet", 60))["pending"] == 1
    assert tablet.receive(timeout=5)["id"] == sent["id"]


def test_messages_wait_for_a_user_with_no_device_yet(running):
    alice = running.connect("alice")
    running.token("carol", "first")  # creates carol and the device "first"
    sent = alice.send("carol", "welcome")
    carol = running.tls_client()
    assert carol.auth_jwt(running.token("carol", "first", 60))["pending"] == 1
    assert carol.receive(timeout=5)["id"] == sent["id"]


def test_ttl_expiry(quick):
    alice = quick.connect("alice")
    token = quick.token("bob")
    alice.send("bob", "short-lived", ttl=1)
    kept = alice.send("bob", "long-lived", ttl=60)
    gevent.sleep(1.2)  # the TTL is wall-clock time: let it pass
    bob = quick.tls_client()
    assert bob.auth_jwt(token)["pending"] == 1
    assert bob.receive(timeout=5)["id"] == kept["id"]
    with pytest.raises(TimeoutError):
        bob.receive(timeout=0.5)


def test_an_expired_delivery_is_not_sent_again(quick):
    alice = quick.connect("alice")
    bob = quick.connect("bob", auto_ack=False, dedupe=False)
    sent = alice.send("bob", "soon gone", ttl=1)
    assert bob.receive(timeout=5)["id"] == sent["id"]
    # Resent after each 0.5 s ACK timeout until it expires, then never again.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            message = bob.receive(timeout=deadline - time.monotonic())
        except TimeoutError:
            break
        assert message["expires"] > time.time() * 1000 - 1000
    with pytest.raises(TimeoutError):
        bob.receive(timeout=1.0)


def test_cid_makes_a_retried_send_idempotent(running):
    alice = running.connect("alice")
    bob = running.connect("bob")
    first = alice.send("bob", "once", cid="c-1")
    retry = alice.send("bob", "once", cid="c-1")
    other = alice.send("bob", "twice", cid="c-2")
    assert retry == first and other["id"] != first["id"]
    # Another sender may use the same cid for its own message.
    carol = running.connect("carol")
    assert carol.send("bob", "hers", cid="c-1")["id"] != first["id"]
    received = [bob.receive(timeout=5)["message"] for _ in range(3)]
    assert received == ["once", "twice", "hers"]
    with pytest.raises(TimeoutError):
        bob.receive(timeout=0.5)


def test_cid_retries_in_one_batch_are_stored_once(running):
    alice = running.connect("alice")
    running.token("bob")
    pending = [alice.send_async("bob", "same", cid="dup") for _ in range(5)]
    results = [p.wait(5) for p in pending]
    assert all(r == results[0] for r in results)
    bob = running.tls_client()
    assert bob.auth_jwt(running.token("bob"))["pending"] == 1


def test_order_per_recipient(running):
    alice = running.connect("alice")
    carol = running.connect("carol")
    bob = running.connect("bob")
    answers = []
    for n in range(300):
        sender = alice if n % 2 == 0 else carol
        answers.append(sender.send_async("bob", n))
    ids = [p.wait(10)["id"] for p in answers]
    received = [bob.receive(timeout=5) for _ in range(300)]
    # Each sender's messages in the order sent; all in the order the server accepted them.
    assert [m["message"] for m in received if m["from"] == "alice"] == list(range(0, 300, 2))
    assert [m["message"] for m in received if m["from"] == "carol"] == list(range(1, 300, 2))
    assert sorted(m["id"] for m in received) == sorted(ids)
    assert [m["ts"] for m in received] == sorted(m["ts"] for m in received)


def test_order_across_offline_backlog_and_live_messages(running):
    alice = running.connect("alice")
    running.token("bob")
    for start in range(0, 1201, 400):  # more than one delivery window (1000)
        chunk = [alice.send_async("bob", n) for n in range(start, min(start + 400, 1201))]
        assert all(p.wait(10) for p in chunk)
    bob = running.tls_client()
    bob.auth_jwt(running.token("bob"))
    live = [alice.send_async("bob", n) for n in range(1201, 1300)]
    received = [bob.receive(timeout=10)["message"] for _ in range(1300)]
    assert received == list(range(1300))
    assert all(p.wait(5) for p in live)


def test_send_to_several_users(running):
    alice = running.connect("alice")
    bob, carol = running.connect("bob"), running.connect("carol")
    sent = alice.send(["bob", "carol", "bob"], "to both")
    assert bob.receive(timeout=5)["id"] == carol.receive(timeout=5)["id"] == sent["id"]
    with pytest.raises(TimeoutError):
        bob.receive(timeout=0.5)  # "bob" twice is still one delivery


def test_msg_echo(running):
    alice = running.connect("alice")
    assert alice.call("msg.echo", {"message": {"x": [1, 2]}}) == "ACK"
    assert alice.echoes.get(timeout=5) == {"message": {"x": [1, 2]}}


def test_the_same_device_connecting_again_replaces_the_old_connection(running):
    old = running.connect("bob", "phone")
    new = running.connect("bob", "phone")
    assert old.closed.wait(5)
    alice = running.connect("alice")
    sent = alice.send("bob", "to the new one")
    assert new.receive(timeout=5)["id"] == sent["id"]


def test_idle_connections_are_closed_and_ping_keeps_them(servers):
    running = servers(read_timeout=0.6)
    idle = running.tls_client()
    busy = running.tls_client()
    for _ in range(4):
        gevent.sleep(0.3)
        assert busy.ping() == "pong"
    assert idle.closed.wait(2)
    assert not busy.closed.is_set()


def test_user_actors_stop_when_idle_and_come_back(servers):
    running = servers(user_idle_timeout=0.2)
    bob = running.connect("bob")
    bob.close()
    router = running.server.router_ref
    deadline = time.monotonic() + 5
    while "bob" in router.ask(OnlineUsersQuery()):
        assert time.monotonic() < deadline
        gevent.sleep(0.05)
    alice = running.connect("alice")
    alice.send("bob", "after idle")
    bob = running.connect("bob")
    assert bob.receive(timeout=5)["message"] == "after idle"


def test_a_backlog_of_large_messages_comes_in_frames_within_the_frame_limit(running):
    alice = running.connect("alice")
    token = running.token("bob")
    pad = "y" * 60_000  # 100 of these would be a 6 MB batch
    ids = []
    for start in range(0, 120, 40):
        window = [alice.send_async("bob", {"n": n, "pad": pad}) for n in range(start, start + 40)]
        ids.extend(p.wait(10)["id"] for p in window)
    raw = RawTls(running)  # its FrameDecoder refuses any frame over 1 MiB
    assert raw.auth(token)["pending"] == 120
    received = []
    while len(received) < 120:
        batch = raw.read_one()
        assert isinstance(batch, list)
        received.extend(batch)
        raw.send_value([{"jsonrpc": "2.0", "id": r["id"], "result": "ACK"} for r in batch])
    assert [r["id"] for r in received] == ids
