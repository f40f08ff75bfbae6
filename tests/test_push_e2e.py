"""Push notifications end to end: a device registers a token, goes away, and is woken.

The real server runs with a provider pointed at a local fake that speaks the
platform's protocol (HTTP/2 for APNs, HTTPS for FCM, XMPP for GCM CCS).
"""
from __future__ import annotations

import time

import pykka
import pytest

from devastator.actors.messages import CommitCountsQuery, OnlineUsersQuery, PushDispatchQuery
from devastator.actors.push import PushDispatcherActor
from devastator.protocol.errors import INVALID_PARAMS, RpcError
from devastator.store import SqliteStore
from fake_apns import fake_apns  # noqa: F401  (fixture)
from fake_ccs import API_KEY, SENDER_ID, fake_ccs  # noqa: F401  (fixture)
from fake_fcm import fake_fcm, fake_fcm_key  # noqa: F401  (fixtures)

WAIT = 5.0
APNS_TOKEN = "ab" * 32
FCM_TOKEN = "fcm-registration-token-of-bobs-phone"
GCM_TOKEN = "gcm-registration-token-of-bobs-phone"


def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def settled(running) -> None:
    """Everything told so far reached the dispatcher: router, then dispatcher, answer in order."""
    running.server.router_ref.ask(OnlineUsersQuery())
    dispatcher().ask(PushDispatchQuery())


def dispatcher() -> pykka.ActorRef:
    (ref,) = pykka.ActorRegistry.get_by_class(PushDispatcherActor)
    return ref


def offline(running, user: str) -> None:
    wait_until(lambda: running.server.router_ref.ask(OnlineUsersQuery()).get(user, {}).get("online", 0) == 0,
               f"{user} to be offline")


def push_token_of(running, user: str, device: str) -> str | None:
    store = SqliteStore(running.settings.db_path)
    store.open()
    try:
        (record,) = [r for r in store.list_devices(user) if r.device == device]
        return record.push_token
    finally:
        store.close()


def register_and_leave(running, platform: str, token: str):
    phone = running.connect("bob", "phone")
    assert phone.call("push.register", {"platform": platform, "token": token}) == "ACK"
    assert push_token_of(running, "bob", "phone") == token
    phone.close()
    offline(running, "bob")


@pytest.fixture
def apns_server(servers, fake_apns):  # noqa: F811
    return servers(
        apns_topic=fake_apns.topic,
        apns_key_file=fake_apns.key_file,
        apns_key_id=fake_apns.key_id,
        apns_team_id=fake_apns.team_id,
        apns_host="localhost",
        apns_port=fake_apns.port,
        apns_ca_file=fake_apns.ca_file,
    )


@pytest.fixture
def fcm_server(servers, fake_fcm):  # noqa: F811
    return servers(
        fcm_service_account_file=fake_fcm.service_account_file,
        fcm_endpoint=fake_fcm.endpoint,
        fcm_token_uri=fake_fcm.token_uri,
        fcm_ca_file=fake_fcm.ca_file,
    )


@pytest.fixture
def ccs_server(servers, fake_ccs):  # noqa: F811
    return servers(
        gcm_sender_id=SENDER_ID,
        gcm_api_key=API_KEY,
        gcm_host=fake_ccs.host,
        gcm_port=fake_ccs.port,
        gcm_ca_file=fake_ccs.ca_file,
    )


def test_an_offline_apns_device_is_woken_once_then_gets_its_messages(apns_server, fake_apns):  # noqa: F811
    running = apns_server
    register_and_leave(running, "apns", APNS_TOKEN)
    alice = running.connect("alice")

    first = alice.send("bob", {"text": "secret words"})
    push = fake_apns.next_push()
    second = alice.send("bob", {"text": "more secret words"})
    settled(running)

    assert push.token == APNS_TOKEN
    assert push.headers["apns-topic"] == fake_apns.topic
    assert "secret" not in str(push.payload)  # no content through Apple unless turned on
    assert push.payload["devastator"]["pending"] == 1
    assert len(fake_apns.accepted) == 1  # coalesced: one push while bob stays away
    phone = running.connect("bob", "phone")
    assert [phone.receive(timeout=WAIT)["id"] for _ in range(2)] == [first["id"], second["id"]]


def test_an_unregistered_apns_token_is_removed_and_never_pushed_to_again(apns_server, fake_apns):  # noqa: F811
    running = apns_server
    register_and_leave(running, "apns", APNS_TOKEN)
    fake_apns.unregister(APNS_TOKEN)
    alice = running.connect("alice")

    alice.send("bob", "one")
    wait_until(lambda: push_token_of(running, "bob", "phone") is None, "the token to be removed")
    answered = len(fake_apns.answered)
    phone = running.connect("bob", "phone")  # back and away: a new message would be pushed...
    phone.close()
    offline(running, "bob")
    alice.send("bob", "two")
    settled(running)

    assert len(fake_apns.answered) == answered  # ...but not to a dead token
    assert fake_apns.accepted == []


def test_an_offline_fcm_device_is_woken_once_and_a_dead_token_removed(fcm_server, fake_fcm):  # noqa: F811
    running = fcm_server
    register_and_leave(running, "fcm", FCM_TOKEN)
    alice = running.connect("alice")

    sent = alice.send("bob", {"text": "secret words"})
    fake_fcm.wait_for(lambda: len(fake_fcm.accepted) == 1)
    alice.send("bob", "more")
    settled(running)
    (message,) = fake_fcm.accepted
    assert message["token"] == FCM_TOKEN
    assert "secret" not in str(message)
    assert len(fake_fcm.accepted) == 1

    phone = running.connect("bob", "phone")
    assert phone.receive(timeout=WAIT)["id"] == sent["id"]
    phone.close()
    offline(running, "bob")
    fake_fcm.unregistered.add(FCM_TOKEN)
    alice.send("bob", "three")
    wait_until(lambda: push_token_of(running, "bob", "phone") is None, "the token to be removed")
    requests = len(fake_fcm.seen)
    alice.send("bob", "four")
    settled(running)
    assert len(fake_fcm.seen) == requests


def test_a_device_online_is_not_pushed_to(fcm_server, fake_fcm):  # noqa: F811
    running = fcm_server
    phone = running.connect("bob", "phone")
    phone.call("push.register", {"platform": "fcm", "token": FCM_TOKEN})
    alice = running.connect("alice")
    sent = alice.send("bob", "live")
    assert phone.receive(timeout=WAIT)["id"] == sent["id"]
    settled(running)
    assert fake_fcm.accepted == []


def test_push_content_can_be_turned_on(servers, fake_fcm):  # noqa: F811
    running = servers(
        fcm_service_account_file=fake_fcm.service_account_file,
        fcm_endpoint=fake_fcm.endpoint,
        fcm_token_uri=fake_fcm.token_uri,
        fcm_ca_file=fake_fcm.ca_file,
        push_content=True,
    )
    register_and_leave(running, "fcm", FCM_TOKEN)
    running.connect("alice").send("bob", {"text": "visible words"})
    fake_fcm.wait_for(lambda: len(fake_fcm.accepted) == 1)
    assert "visible words" in str(fake_fcm.accepted[0])


def test_a_platform_not_configured_is_refused_with_invalid_params(fcm_server):
    phone = fcm_server.connect("bob", "phone")
    with pytest.raises(RpcError) as refused:
        phone.call("push.register", {"platform": "apns", "token": APNS_TOKEN})
    assert refused.value.code == INVALID_PARAMS and "apns" in refused.value.message
    assert push_token_of(fcm_server, "bob", "phone") is None


def test_a_token_moves_with_its_owner(fcm_server):
    """A token belongs to one device: registering it elsewhere takes it away."""
    first = fcm_server.connect("bob", "old-phone")
    first.call("push.register", {"platform": "fcm", "token": FCM_TOKEN})
    second = fcm_server.connect("carol", "new-phone")
    second.call("push.register", {"platform": "fcm", "token": FCM_TOKEN})
    assert push_token_of(fcm_server, "bob", "old-phone") is None
    assert push_token_of(fcm_server, "carol", "new-phone") == FCM_TOKEN


def test_an_offline_gcm_device_is_woken_once_and_a_dead_token_removed(ccs_server, fake_ccs):  # noqa: F811
    running = ccs_server
    register_and_leave(running, "gcm", GCM_TOKEN)
    alice = running.connect("alice")

    sent = alice.send("bob", {"text": "secret words"})
    fake_ccs.wait_until(lambda: len(fake_ccs.delivered) == 1, "one push delivered")
    alice.send("bob", "more")
    settled(running)
    (record,) = fake_ccs.delivered
    assert record.payload["to"] == GCM_TOKEN and "secret" not in str(record.payload)
    phone = running.connect("bob", "phone")
    assert phone.receive(timeout=WAIT)["id"] == sent["id"]
    phone.close()
    offline(running, "bob")

    fake_ccs.nack(GCM_TOKEN, "DEVICE_UNREGISTERED", times=None)
    alice.send("bob", "three")
    wait_until(lambda: push_token_of(running, "bob", "phone") is None, "the token to be removed")
    received = len(fake_ccs.received)
    alice.send("bob", "four")
    settled(running)
    assert len(fake_ccs.received) == received


def test_an_upstream_message_is_stored_as_a_send_from_its_device(ccs_server, fake_ccs):  # noqa: F811
    running = ccs_server
    register_and_leave(running, "gcm", GCM_TOKEN)
    alice = running.connect("alice")
    connection = fake_ccs.connection(1)

    data = {"to": "alice", "message": '{"text": "from the push channel"}'}
    fake_ccs.send_upstream(connection, token=GCM_TOKEN, message_id="up-1", data=data)
    fake_ccs.upstream_ack("up-1")
    fake_ccs.send_upstream(connection, token=GCM_TOKEN, message_id="up-1", data=data)  # CCS said it twice

    got = alice.receive(timeout=WAIT)
    assert (got["from"], got["message"]) == ("bob", {"text": "from the push channel"})
    settled(running)
    running.server.store_ref.ask(CommitCountsQuery())
    with pytest.raises(TimeoutError):
        alice.receive(timeout=0.5)  # stored once: the upstream message id is its cid


def test_a_receipt_wakes_the_offline_sender_and_a_copy_does_not(fcm_server, fake_fcm):  # noqa: F811
    running = fcm_server
    phone = running.connect("bob", "phone")
    assert phone.call("push.register", {"platform": "fcm", "token": FCM_TOKEN}) == "ACK"
    running.register("carol")
    sent = phone.send("carol", "tell me when you have it", receipt=True)
    phone.close()
    offline(running, "bob")
    # A copy for the offline phone of what bob's laptop sends: his own message wakes nobody.
    running.connect("bob", "laptop").send("carol", "from the laptop")
    settled(running)
    assert fake_fcm.accepted == []

    carol = running.connect("carol")
    assert {carol.receive(timeout=WAIT)["id"] for _ in range(2)} >= {sent["id"]}
    fake_fcm.wait_for(lambda: len(fake_fcm.accepted) == 1)  # the delivered receipt for bob
    assert fake_fcm.accepted[0]["token"] == FCM_TOKEN
    phone = running.connect("bob", "phone")
    receipts = [phone.receive_receipt(timeout=WAIT)]
    assert (receipts[0]["type"], receipts[0]["message"], receipts[0]["by"]) == ("delivered", sent["id"], "carol")
