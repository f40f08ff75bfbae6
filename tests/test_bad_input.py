"""Hostile and broken clients: the server answers or closes, and keeps serving everyone else."""
import random
import ssl
import struct

import gevent
import json

import orjson
import pykka
import pytest

from devastator.actors.messages import OnlineUsersQuery
from wire import RawTls

METHODS = ["ping", "auth.jwt", "auth.cert", "auth.google", "msg.send", "msg.echo", "push.register", "nope", ""]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**63, 1.5, -32600, 10**30])
    if kind == 3:
        return "".join(rng.choice("ab\u00e9\u4e2d\"\\\n\x00") for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice(["2.0", "alice", "bob", "msg.send", "ACK"])
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["jsonrpc", "method", "params", "id", "to", "message", "ttl", "cid", "token", "result"]):
            random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_frame(rng: random.Random) -> bytes:
    # JSON from the standard library: it writes integers beyond 64 bits, as a hostile client may.
    kind = rng.randrange(6)
    if kind == 0:  # garbage bytes in a well-formed frame
        body = rng.randbytes(rng.randrange(1, 40))
    elif kind == 1:  # a JSON-RPC-shaped request with random params
        request = {"jsonrpc": "2.0", "method": rng.choice(METHODS), "params": random_value(rng)}
        if rng.random() < 0.8:
            request["id"] = random_value(rng)
        body = json.dumps(request).encode()
    elif kind == 2:  # a batch of such
        body = json.dumps([
            {"jsonrpc": "2.0", "method": rng.choice(METHODS), "id": n, "params": random_value(rng)}
            for n in range(rng.randrange(0, 8))
        ]).encode()
    elif kind == 3:  # any JSON value
        body = json.dumps(random_value(rng)).encode()
    elif kind == 4:  # a header that lies about the length (shorter or longer)
        body = rng.randbytes(rng.randrange(1, 20))
        return struct.pack("<I", len(body) + rng.choice([-1, 1, 5, 1 << 30])) + body
    else:  # a response to nothing
        body = json.dumps({"jsonrpc": "2.0", "id": random_value(rng), "result": random_value(rng)}).encode()
    return struct.pack("<I", len(body)) + body


def drain_until_closed_or_quiet(sock: ssl.SSLSocket, quiet: float = 0.3) -> None:
    sock.settimeout(quiet)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, OSError):
        pass


def hostile_client(running, rng: random.Random, number: int, authenticate: bool) -> None:
    raw = RawTls(running)
    try:
        if authenticate:  # a device of its own: a second connection would replace the first
            raw.auth(running.token(f"fuzz{rng.randrange(3)}", f"device{number}"))
        data = b"".join(random_frame(rng) for _ in range(rng.randrange(1, 15)))
        # Written in random pieces: headers and bodies split anywhere.
        while data:
            cut = rng.randrange(1, len(data) + 1)
            try:
                raw.send(data[:cut])
            except OSError:
                break  # the server closed on a violation: that is an answer too
            data = data[cut:]
        drain_until_closed_or_quiet(raw.sock)
    finally:
        raw.close()


@pytest.mark.parametrize("seed", range(4))
def test_random_hostile_clients_never_stop_the_server(running, seed):
    rng = random.Random(seed)
    watcher = running.connect("watcher")
    listener = running.connect("listener")
    clients = [gevent.spawn(hostile_client, running, random.Random(rng.random()), n, rng.random() < 0.6)
               for n in range(25)]
    gevent.joinall(clients, timeout=30, raise_error=True)
    assert all(client.successful() for client in clients)
    assert watcher.ping() == "pong"
    sent = watcher.send("listener", {"after": "fuzz"})
    assert listener.receive(timeout=5)["id"] == sent["id"]
    # Every hostile connection is gone again: nothing leaks per connection.
    deadline = gevent.Timeout(5)
    with deadline:
        while running.server.tls.connection_count > 2:
            gevent.sleep(0.05)
    online = running.server.router_ref.ask(OnlineUsersQuery())
    assert sum(user["online"] for user in online.values()) == 2


def test_a_header_then_silence_is_closed_by_the_read_timeout(servers):
    running = servers(read_timeout=0.5)
    raw = RawTls(running)
    raw.send(b"\x10\x00")  # half a header, then nothing
    raw.sock.settimeout(3)
    # PROTOCOL.md 7: the server says why before it closes.
    assert raw.read_one() == {"jsonrpc": "2.0", "method": "conn.close", "params": {"code": 4003, "reason": "idle timeout"}}
    raw.assert_closed()


def test_a_client_that_never_reads_is_disconnected(servers):
    running = servers(max_outbound_bytes=64 * 1024)
    bystander = running.connect("bystander")
    raw = RawTls(running)
    raw.auth(running.token("sleepy"))
    echo = orjson.dumps({"jsonrpc": "2.0", "method": "msg.echo", "params": {"message": "x" * 30_000}, "id": 1})
    # It asks and asks, and reads none of the answers.
    with pytest.raises(OSError):
        for _ in range(2000):
            raw.send(struct.pack("<I", len(echo)) + echo)
    with gevent.Timeout(10):
        while running.server.tls.connection_count > 1:
            gevent.sleep(0.05)
    assert bystander.ping() == "pong"


def test_a_backlog_of_big_messages_drains_within_the_outbound_bound(servers):
    # 200 messages of 30 kB are 6 MB: far over what one connection may have
    # unsent (64 kB here), yet a client that reads gets them all, in order.
    running = servers(max_outbound_bytes=64 * 1024)
    sender = running.connect("sender")
    token = running.token("reader")
    big = "x" * 30_000
    ids = []
    for start in range(0, 200, 50):
        window = [sender.send_async("reader", {"n": n, "pad": big}) for n in range(start, start + 50)]
        ids.extend(p.wait(10)["id"] for p in window)
    reader = running.tls_client()
    assert reader.auth_jwt(token)["pending"] == 200
    received = [reader.receive(timeout=10) for _ in range(200)]
    assert [m["id"] for m in received] == ids
    assert not reader.closed.is_set()


def test_a_flooding_client_is_slowed_down_not_buffered(running):
    from devastator.actors import DeviceActor
    from devastator.transports.endpoint import READS_IN_FLIGHT

    note = orjson.dumps({"jsonrpc": "2.0", "method": "no.such.thing", "params": {"pad": "z" * 200}})
    chunk = (struct.pack("<I", len(note)) + note) * 500
    raw = RawTls(running)
    deepest = 0
    flooding = True

    def watch_inboxes():
        nonlocal deepest
        while flooding:
            for ref in pykka.ActorRegistry.get_by_class(DeviceActor):
                deepest = max(deepest, ref.actor_inbox.qsize())
            gevent.sleep(0)

    watcher = gevent.spawn(watch_inboxes)
    for _ in range(400):  # 200,000 notifications, about 50 MB, none of them answered
        raw.send(chunk)
    flooding = False
    watcher.join(5)
    assert 0 < deepest <= READS_IN_FLIGHT + 2  # the reads waiting, and a message or two of the actors'
    assert raw.call("ping", id="after") == {"jsonrpc": "2.0", "id": "after", "result": "pong"}
