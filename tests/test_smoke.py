def test_smoke(running):
    alice = running.connect("alice")
    bob = running.connect("bob")
    assert alice.ping() == "pong"
    result = alice.send("bob", {"text": "hi"})
    msg = bob.receive(timeout=5)
    assert msg["message"] == {"text": "hi"} and msg["id"] == result["id"]
