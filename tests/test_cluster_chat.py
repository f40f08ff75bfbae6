"""Receipts, copies, signals and history across real nodes sharing one real redis-server.

A receipt or a signal reaches the node where its recipient's devices are
(PROTOCOL.md 7); so do copies, and history reads the same whatever the node.
"""
from __future__ import annotations

import pytest

from test_cluster import WAIT, connect, nodes, redis  # noqa: F401  (fixtures)


def test_receipts_and_copies_reach_the_sender_s_devices_on_other_nodes(nodes):  # noqa: F811
    n1, n2, n3 = nodes("n1", "n2", "n3")
    phone = connect(n1, n1.token("alice", "phone"))
    laptop = connect(n2, n1.token("alice", "laptop"))
    bob = connect(n3, n1.token("bob"))

    sent = phone.send("bob", {"text": "across the cluster"}, receipt=True)
    assert bob.receive(timeout=WAIT)["id"] == sent["id"]
    copy = laptop.receive(timeout=WAIT)
    assert (copy["id"], copy["from"], copy["to"]) == (sent["id"], "alice", "bob")
    for device in (phone, laptop):
        receipt = device.receive_receipt(timeout=WAIT)
        assert (receipt["type"], receipt["message"], receipt["by"]) == ("delivered", sent["id"], "bob")
    assert bob.mark_read([sent["id"]]) == "ACK"
    for device in (phone, laptop):
        assert device.receive_receipt(timeout=WAIT)["type"] == "read"
    # Once each: nothing more comes, not even after the ACK timeout (2 s).
    phone.ping()
    with pytest.raises(TimeoutError):
        phone.receive_receipt(timeout=3.0)
    # History is the store's: the same page on every node.
    pages = [client.history("alice" if client is bob else "bob") for client in (phone, laptop, bob)]
    assert all([m["id"] for m in page["messages"]] == [sent["id"]] for page in pages)


def test_a_signal_reaches_recipients_on_other_nodes_and_nobody_else(nodes):  # noqa: F811
    n1, n2, n3 = nodes("n1", "n2", "n3")
    alice = connect(n1, n1.token("alice", "phone"))
    alice_laptop = connect(n2, n1.token("alice", "laptop"))
    bob_phone = connect(n2, n1.token("bob", "phone"))
    bob_tablet = connect(n3, n1.token("bob", "tablet"))
    carol = connect(n3, n1.token("carol"))

    assert alice.signal("bob", {"typing": True}) == "ACK"
    for device in (bob_phone, bob_tablet):
        signal = device.receive_signal(timeout=WAIT)
        assert (signal["from"], signal["to"], signal["signal"]) == ("alice", "bob", {"typing": True})
    # A message sent after the signal arrives after it, on each node: by then a stray signal would have too.
    alice.send(["bob", "carol"], "after the signal")
    for device in (bob_phone, bob_tablet, carol):
        device.receive(timeout=WAIT)
    alice_laptop.receive(timeout=WAIT)  # its copy
    for device in (carol, alice_laptop, alice):
        with pytest.raises(TimeoutError):
            device.receive_signal(timeout=0.5)
