"""Receipts, copies, signals and history over real sockets (PROTOCOL.md 7), TLS and WebSocket.

Each test runs over both transports: ``connect`` opens a TLS connection or a
WebSocket one, as the ``transport`` parameter says.
"""
import subprocess
import sys
import urllib.request

import orjson

import pytest

from devastator.protocol.errors import RpcError
from test_crash import ROOT, ServerProcess

TRANSPORTS = ("tls", "ws")


@pytest.fixture(params=TRANSPORTS)
def connect(request, running):
    ws = request.param == "ws"

    def connect(user, device="default", **kwargs):
        return running.connect(user, device, ws=ws, **kwargs)

    return connect


def nothing_comes(waiting, client, timeout=0.5):
    """Nothing more arrives on ``waiting`` (a receive method) once the server answered a ping."""
    client.ping()  # what the server had for this connection was written before this answer
    with pytest.raises(TimeoutError):
        waiting(timeout=timeout)


# -- receipts -------------------------------------------------------------------------


def test_delivered_and_read_receipts_reach_every_device_of_the_sender(connect, running):
    phone, laptop = connect("alice", "phone"), connect("alice", "laptop")
    bob = connect("bob")
    running.register("bob", "tablet")  # offline: the message waits for it too
    sent = phone.send("bob", {"text": "hi"}, receipt=True)
    assert bob.receive()["id"] == sent["id"]  # the client ACKs it
    for device in (phone, laptop):
        delivered = device.receive_receipt()
        assert delivered == {"id": delivered["id"], "type": "delivered", "message": sent["id"], "by": "bob",
                             "ts": delivered["ts"]}
        assert delivered["ts"] >= sent["ts"]
    assert bob.mark_read([sent["id"]]) == "ACK"
    for device in (phone, laptop):
        read = device.receive_receipt()
        assert (read["type"], read["message"], read["by"]) == ("read", sent["id"], "bob")
    # One per recipient and type: reading again, or another device of bob ACKing, makes none.
    assert bob.mark_read([sent["id"]]) == "ACK"
    bob_tablet = connect("bob", "tablet")
    assert bob_tablet.receive()["id"] == sent["id"]
    nothing_comes(phone.receive_receipt, phone)


def test_a_message_that_did_not_ask_gets_no_receipt(connect, running):
    alice, bob = connect("alice"), connect("bob")
    sent = alice.send("bob", "quiet")
    assert bob.receive()["id"] == sent["id"]
    assert bob.mark_read([sent["id"]]) == "ACK"
    nothing_comes(alice.receive_receipt, alice)
    assert running.server.telemetry.receipts_stored == {}


def test_each_recipient_of_a_group_message_gets_its_own_receipts(connect):
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    sent = alice.send(["bob", "carol"], "all of you", receipt=True)
    bob.receive()
    carol.receive()
    receipts = {(r["by"], r["type"]) for r in (alice.receive_receipt(), alice.receive_receipt())}
    assert receipts == {("bob", "delivered"), ("carol", "delivered")}
    carol.mark_read([sent["id"]])
    assert alice.receive_receipt()["by"] == "carol"
    nothing_comes(alice.receive_receipt, alice)


def test_read_ignores_ids_the_reader_was_not_sent(connect):
    alice, bob, mallory = connect("alice"), connect("bob"), connect("mallory")
    sent = alice.send("bob", "for bob", receipt=True)
    bob.receive()
    assert alice.receive_receipt()["type"] == "delivered"
    assert mallory.mark_read([sent["id"], "no-such-id"]) == "ACK"
    nothing_comes(alice.receive_receipt, alice)


def test_a_read_before_any_ack_also_says_delivered(connect):
    alice, bob = connect("alice"), connect("bob", auto_ack=False)
    sent = alice.send("bob", "read me", receipt=True)
    assert bob.receive()["id"] == sent["id"]
    bob.mark_read([sent["id"]])
    assert [alice.receive_receipt()["type"] for _ in range(2)] == ["delivered", "read"]


@pytest.mark.parametrize("params, code", [
    ({"ids": "x"}, -32602), ({"ids": [1]}, -32602), ({}, -32602), ({"ids": ["a"] * 1 + [str(i) for i in range(1000)]}, -32004),
])
def test_bad_read_params_are_refused(connect, params, code):
    bob = connect("bob")
    with pytest.raises(RpcError) as refused:
        bob.call("msg.read", params)
    assert refused.value.code == code
    assert bob.ping() == "pong"


def test_receipts_reach_an_offline_sender_and_survive_kill_9(tmp_path):
    server = ServerProcess(tmp_path / "data")
    server.start()
    try:
        bob_token = server.token("bob")
        alice_token = token(server, "alice", "phone")
        alice = server.client()
        alice.auth_jwt(alice_token)
        sent = alice.send("bob", "ticks please", receipt=True)
        alice.close()  # the sender is offline from here on

        bob = server.client()
        bob.auth_jwt(bob_token)
        assert bob.receive()["id"] == sent["id"]  # ACKed by the client
        bob.close()
        bob = server.client()
        # Its user actor tells the store the ACK before this attachment: 0 pending means it is stored.
        assert bob.auth_jwt(bob_token)["pending"] == 0
        bob.close()
        server.kill()  # between the ACK and the sender's reconnect
        server.start()

        alice = server.client()
        assert alice.auth_jwt(alice_token)["pending"] == 1
        delivered = alice.receive_receipt()
        assert (delivered["type"], delivered["message"], delivered["by"]) == ("delivered", sent["id"], "bob")
        alice.close()

        bob = server.client()
        bob.auth_jwt(bob_token)
        assert bob.mark_read([sent["id"]]) == "ACK"  # stored before this answer
        bob.close()
        server.kill()
        server.start()

        alice = server.client()
        alice.auth_jwt(alice_token)
        read = alice.receive_receipt()
        assert (read["type"], read["message"], read["by"]) == ("read", sent["id"], "bob")
        # The delivered receipt was ACKed before: it does not come again.
        alice.ping()
        with pytest.raises(TimeoutError):
            alice.receive_receipt(timeout=0.5)
        alice.close()
    finally:
        server.kill()


def token(server, user, device):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "devastator"), "token", user, "--device", device,
         "--data-dir", str(server.data_dir)],
        check=True, capture_output=True, text=True, env=server.env,
    ).stdout
    return out.strip().splitlines()[-1]


# -- copies ---------------------------------------------------------------------------------


def test_a_copy_reaches_the_sender_s_other_devices_and_not_the_sending_one(connect):
    phone, laptop = connect("alice", "phone"), connect("alice", "laptop")
    bob = connect("bob")
    sent = phone.send("bob", {"text": "from my phone"})
    copy = laptop.receive()
    assert copy == {"id": sent["id"], "from": "alice", "to": "bob", "message": {"text": "from my phone"},
                    "ts": sent["ts"], "expires": copy["expires"]}
    assert bob.receive()["to"] == "bob"
    nothing_comes(phone.receive, phone)


def test_a_copy_carries_the_recipients_as_sent(connect):
    phone, laptop = connect("alice", "phone"), connect("alice", "laptop")
    connect("bob"), connect("carol")
    phone.send(["bob", "carol", "bob"], "group")
    assert laptop.receive()["to"] == ["bob", "carol"]


def test_a_copy_waits_for_an_offline_device_of_the_sender(connect, running):
    running.register("alice", "laptop")  # registered, not connected
    running.register("bob")
    phone = connect("alice", "phone")
    sent = phone.send("bob", "while the laptop sleeps")
    laptop = running.tls_client()
    assert laptop.auth_jwt(running.token("alice", "laptop"))["pending"] == 1
    assert laptop.receive()["id"] == sent["id"]


def test_a_message_to_oneself_reaches_every_device_once(connect):
    phone, laptop = connect("alice", "phone"), connect("alice", "laptop")
    sent = phone.send("alice", "note to self")
    for device in (phone, laptop):
        assert device.receive()["id"] == sent["id"]
        nothing_comes(device.receive, device)


# -- signals ---------------------------------------------------------------------------------


def test_a_signal_reaches_online_devices_only_and_never_comes_back(connect, running):
    alice = connect("alice", "phone")
    alice_laptop = connect("alice", "laptop")
    bob, bob_tablet = connect("bob"), connect("bob", "tablet")
    assert alice.signal("bob", {"typing": True}) == "ACK"
    for device in (bob, bob_tablet):
        signal = device.receive_signal()
        assert signal == {"from": "alice", "to": "bob", "signal": {"typing": True}, "ts": signal["ts"]}
    # Never copied to the sender's devices, never echoed.
    nothing_comes(alice_laptop.receive_signal, alice_laptop)
    nothing_comes(alice.receive_signal, alice)
    # Never stored: a reconnect brings nothing back, and nothing waits for an offline device.
    bob.close()
    bob = running.tls_client()
    assert bob.auth_jwt(running.token("bob"))["pending"] == 0
    nothing_comes(bob.receive_signal, bob)
    nothing_comes(bob.receive, bob)
    assert running.server.telemetry.messages_accepted == 0


def test_a_signal_to_oneself_reaches_one_s_other_devices(connect):
    phone, laptop = connect("alice", "phone"), connect("alice", "laptop")
    phone.signal("alice", "draft saved")
    assert laptop.receive_signal()["signal"] == "draft saved"
    nothing_comes(phone.receive_signal, phone)


def test_signals_are_bounded_in_size(connect):
    alice, bob = connect("alice"), connect("bob")
    with pytest.raises(RpcError) as refused:
        alice.signal("bob", "x" * 5000)
    assert refused.value.code == -32004
    assert alice.signal("bob", "x" * 4000) == "ACK"
    assert len(bob.receive_signal()["signal"]) == 4000


def test_a_signal_flood_is_rate_limited_and_messages_still_flow(connect, running):
    alice, bob = connect("alice"), connect("bob")
    pending = [alice.request("msg.signal", {"to": "bob", "signal": n}) for n in range(200)]
    outcomes = []
    for waiting in pending:
        try:
            outcomes.append(waiting.wait(5))
        except RpcError as error:
            outcomes.append(error)
    refused = [outcome for outcome in outcomes if isinstance(outcome, RpcError)]
    burst = running.settings.signal_burst
    assert burst <= outcomes.count("ACK") < burst + 20  # the burst, plus what refilled meanwhile
    assert refused and all(error.code == -32003 and error.data["retry_after_ms"] > 0 for error in refused)
    sent = alice.send("bob", "a message gets through")
    while True:
        message = bob.receive()
        if message["id"] == sent["id"]:
            break
    assert running.server.telemetry.signals_dropped["rate"] == len(refused)


@pytest.mark.parametrize("params", [{"to": "bob"}, {"signal": 1}, {"to": 5, "signal": 1}, []])
def test_bad_signal_params_are_refused(connect, params):
    alice = connect("alice")
    with pytest.raises(RpcError) as refused:
        alice.call("msg.signal", params)
    assert refused.value.code == -32602


# -- history ---------------------------------------------------------------------------------


def test_history_pages_are_complete_newest_first_and_both_ways(connect):
    alice, bob = connect("alice"), connect("bob")
    sent = []
    for n in range(130):
        sender, to = (alice, "bob") if n % 3 else (bob, "alice")
        sent.append(sender.send(to, n)["id"])
    connect("carol").send("alice", "not in this conversation")
    seen, before = [], None
    while True:
        page = alice.history("bob", before=before, limit=50)
        seen.extend(page["messages"])
        if not page["more"]:
            break
        before = page["messages"][-1]["id"]
    assert [m["id"] for m in seen] == sent[::-1]
    assert [m["message"] for m in seen] == list(range(129, -1, -1))
    assert {(m["from"], m["to"]) for m in seen} == {("alice", "bob"), ("bob", "alice")}
    assert set(seen[0]) == {"id", "from", "to", "message", "ts", "expires"}
    # The other side sees the same conversation.
    assert bob.history("alice", limit=100)["messages"] == seen[:100]


def test_history_shows_only_conversations_the_caller_was_part_of(connect):
    alice, bob, mallory = connect("alice"), connect("bob"), connect("mallory")
    alice.send("bob", "private")
    assert mallory.history("alice") == {"messages": [], "more": False}
    assert mallory.history("bob") == {"messages": [], "more": False}
    mallory.send("alice", "hello")
    assert [m["message"] for m in mallory.history("alice")["messages"]] == ["hello"]


def test_history_includes_a_group_message_in_each_conversation(connect):
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    sent = alice.send(["bob", "carol"], "to both")
    assert [(m["id"], m["to"]) for m in bob.history("alice")["messages"]] == [(sent["id"], "bob")]
    assert [(m["id"], m["to"]) for m in carol.history("alice")["messages"]] == [(sent["id"], "carol")]


def test_history_of_an_unknown_user_is_minus_32005(connect):
    alice = connect("alice")
    with pytest.raises(RpcError) as refused:
        alice.history("nobody-here")
    assert refused.value.code == -32005
    assert refused.value.data == {"unknown": ["nobody-here"]}


@pytest.mark.parametrize("params", [{}, {"with": "bob", "limit": 0}, {"with": "bob", "limit": 101},
                                    {"with": "bob", "before": 3}])
def test_bad_history_params_are_refused(connect, params):
    alice = connect("alice")
    with pytest.raises(RpcError) as refused:
        alice.call("msg.history", params)
    assert refused.value.code == -32602


def test_history_off_is_method_not_found(servers):
    running = servers(history_period=0)
    alice = running.connect("alice")
    with pytest.raises(RpcError) as refused:
        alice.history("alice")
    assert refused.value.code == -32601


def test_history_stops_at_the_period(servers):
    running = servers(history_period=1)
    alice, bob = running.connect("alice"), running.connect("bob")
    old = alice.send("bob", "old")
    # Wait for the clock, not a fixed time: the message leaves history once its second is over.
    while alice.history("bob")["messages"]:
        alice.ping()
    new = alice.send("bob", "new")
    assert [m["id"] for m in alice.history("bob")["messages"]] == [new["id"]]
    assert old["id"] != new["id"]


# -- operators ---------------------------------------------------------------------------------


def test_metrics_and_debug_vars_count_receipts_copies_signals_and_history(connect, running):
    phone, laptop, bob = connect("alice", "phone"), connect("alice", "laptop"), connect("bob")
    sent = phone.send("bob", "counted", receipt=True)
    bob.receive()
    bob.mark_read([sent["id"]])
    laptop.receive()
    for device in (phone, laptop):
        for _ in range(2):
            device.receive_receipt()
    phone.signal("bob", "typing")
    bob.receive_signal()
    phone.history("bob")
    host, port = running.http_address
    metrics = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    for line in ('devastator_receipts_stored_total{type="delivered"} 1.0',
                 'devastator_receipts_stored_total{type="read"} 1.0',
                 "devastator_copies_stored_total 1.0",
                 "devastator_signals_accepted_total 1.0",
                 "devastator_signals_delivered_total 1.0",
                 "devastator_history_pages_total 1.0"):
        assert line in metrics.splitlines()
    # Both of alice's devices had the two receipts written to them.
    assert "devastator_receipts_delivered_total 4.0" in metrics.splitlines()
    debug = orjson.loads(urllib.request.urlopen(f"http://{host}:{port}/debug/vars", timeout=5).read())
    assert debug["receipts"] == {"stored": {"delivered": 1, "read": 1}, "delivered": 4}
    assert debug["signals"] == {"accepted": 1, "delivered": 1, "dropped": {}}
    assert debug["copies_stored"] == 1 and debug["history_pages"] == 1
