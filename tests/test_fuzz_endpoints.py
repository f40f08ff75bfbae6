"""Malformed input on every endpoint: a clear answer or a close, never a traceback, and service goes on.

Random, seeded clients throw at a real server, all at once: bytes that are
no TLS, truncated and corrupted TLS, lying frames after a real handshake; bad
HTTP requests and WebSocket upgrades, bad WebSocket frames; bad frames and
calls on the admin socket. Meanwhile, and after, two bystanders keep
exchanging messages. The log must have no ERROR and no record with a
traceback, and nothing may be printed to stderr (where gevent reports a
greenlet that died).
"""
from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import struct

import gevent
import pytest

from devastator.protocol import encode_frame
from test_bad_input import random_frame, random_value
from test_websocket_rfc6455 import HANDSHAKE, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT
from test_websocket_rfc6455 import frame as ws_frame

CLIENTS_PER_KIND = 12
QUIET = 0.2  # a client reads what comes back until the server is quiet this long, or closes
ADMIN_METHODS = ["ping", "stats", "actors", "user", "device", "kick", "send", "expire", "watch", "nope", ""]
HTTP_PATHS = ["/", "/ws", "/healthz", "/metrics", "/debug/vars", "/client/devastator-client.js",
              "/%00", "/../../etc/passwd", "/" + "a" * 5000, "*", "http://other/x", "/\u00e9"]
SERVER_NAMES = ["localhost", ".".join(["x" * 63] * 3), "127.0.0.1"]
HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "CONNECT", "TRACE", "BREW", "get", ""]


def drain(sock, quiet: float = QUIET) -> None:
    """Read until the server closes or stays quiet; any way the connection ends is an answer."""
    sock.settimeout(quiet)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, OSError):
        return


def send_in_pieces(sock, rng: random.Random, data: bytes) -> None:
    """Write ``data`` cut anywhere, stopping if the server closes (an answer too)."""
    while data:
        cut = rng.randrange(1, len(data) + 1)
        try:
            sock.sendall(data[:cut])
        except OSError:
            return
        data = data[cut:]


def reset_on_close(sock: socket.socket) -> None:
    """Make close() send a reset instead of a FIN: a client that vanishes mid-way."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def client_hello(server_name: str = "localhost") -> bytes:
    """The first flight of a real TLS client, as bytes (ssl's memory BIOs: no socket)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


# -- the TLS endpoint ----------------------------------------------------------------------------


def tls_client(running, rng: random.Random) -> None:
    kind = rng.randrange(6)
    raw = socket.create_connection(running.tls_address, timeout=5)
    try:
        if kind == 0:  # no TLS at all
            send_in_pieces(raw, rng, rng.choice([b"GET / HTTP/1.1\r\n\r\n", rng.randbytes(rng.randrange(1, 600))]))
        elif kind == 1:  # a ClientHello cut short, or corrupted
            hello = client_hello(rng.choice(SERVER_NAMES))
            send_in_pieces(raw, rng, hello[:rng.randrange(1, len(hello))] if rng.random() < 0.5
                           else flip_bytes(rng, hello))
        elif kind == 2:  # a ClientHello, then a reset in the middle of the handshake
            raw.sendall(client_hello(rng.choice(SERVER_NAMES)))
            reset_on_close(raw)
            return
        tls = None
        if kind >= 3:
            context = ssl.create_default_context(cafile=str(running.ca))
            tls = context.wrap_socket(raw, server_hostname="localhost")
        if kind == 3:  # a real handshake, then bytes that are no TLS record
            plain = socket.socket(fileno=tls.detach())  # written under the TLS layer
            try:
                send_in_pieces(plain, rng, rng.randbytes(rng.randrange(1, 300)))
                drain(plain)
            finally:
                plain.close()
            return
        if kind == 4:  # lying frames, and random ones, cut anywhere
            data = b"".join(random_frame(rng) for _ in range(rng.randrange(1, 10)))
            send_in_pieces(tls, rng, data)
        elif kind == 5:  # half a frame, then a reset
            send_in_pieces(tls, rng, random_frame(rng)[: rng.randrange(1, 6)])
            reset_on_close(tls)
            tls.close()
            return
        drain(tls or raw)
    finally:
        raw.close()


# -- the HTTP port: routes, upgrades, WebSocket frames ---------------------------------------------------


def random_request(rng: random.Random) -> bytes:
    method = rng.choice(HTTP_METHODS)
    path = rng.choice(HTTP_PATHS)
    version = rng.choice(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.1 extra", ""])
    headers = [rng.choice(["Host: localhost", "Host:", "Host: a\x00b", ""])]
    for _ in range(rng.randrange(4)):
        headers.append(rng.choice([
            "Content-Length: " + rng.choice(["0", "5", "-1", "99999999999999999999", "abc", "5, 6"]),
            "Transfer-Encoding: " + rng.choice(["chunked", "gzip", "chunked, chunked"]),
            "Connection: " + rng.choice(["close", "Upgrade", "keep-alive", ""]),
            "Upgrade: " + rng.choice(["websocket", "h2c", "WebSocket, x"]),
            "Sec-WebSocket-Key: " + rng.choice(["dGhlIHNhbXBsZSBub25jZQ==", "short", ""]),
            "Sec-WebSocket-Version: " + rng.choice(["13", "8", "13, 8", ""]),
            "X-Long: " + "x" * rng.choice([10, 20000]),
            "no colon here", " leading: space", "Bad\x01Name: x", "\u00e9: \u4e2d",
        ]))
    line_end = rng.choice(["\r\n", "\n", "\r"])
    head = f"{method} {path} {version}{line_end}" + line_end.join(headers) + line_end * 2
    body = rng.choice([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", rng.randbytes(rng.randrange(50))])
    return head.encode() + body


def random_ws_frame(rng: random.Random) -> bytes:
    opcode = rng.choice([OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_CONTINUATION, 0x3, 0xB])
    payload = rng.choice([
        json.dumps({"jsonrpc": "2.0", "method": rng.choice(["ping", "msg.send", "auth.jwt"]), "id": 1,
                    "params": random_value(rng)}).encode(),
        rng.randbytes(rng.randrange(0, 140)),
        b"\xff\xfe invalid utf-8",
        struct.pack("!H", rng.choice([1000, 999, 1005, 1015, 5000, 65535])) + rng.randbytes(rng.randrange(4)),
    ])
    data = ws_frame(opcode, payload, fin=rng.random() < 0.8, mask=rng.random() < 0.9, rsv=rng.choice([0, 0, 0, 1]))
    if rng.random() < 0.1:  # a header announcing far more than follows
        data = bytes((0x81, 0xFF)) + struct.pack("!Q", rng.choice([1 << 20, 1 << 62, (1 << 64) - 1])) + data[:10]
    return data


def http_client(running, rng: random.Random) -> None:
    raw = socket.create_connection(running.http_address, timeout=5)
    try:
        kind = rng.randrange(4)
        if kind == 0:  # not HTTP (nor TLS, on wss://)
            send_in_pieces(raw, rng, rng.randbytes(rng.randrange(1, 400)))
            drain(raw)
            return
        if running.settings.ws_tls:
            raw = ssl.create_default_context(cafile=str(running.ca)).wrap_socket(raw, server_hostname="localhost")
        if kind == 1:  # bad requests, pipelined, cut anywhere
            send_in_pieces(raw, rng, b"".join(random_request(rng) for _ in range(rng.randrange(1, 4))))
        else:  # a good upgrade, then bad frames (and a reset, at times)
            raw.sendall(HANDSHAKE.encode())
            send_in_pieces(raw, rng, b"".join(random_ws_frame(rng) for _ in range(rng.randrange(1, 8))))
            if kind == 3:
                reset_on_close(raw)
                return
        drain(raw)
    finally:
        raw.close()


# -- the admin socket -------------------------------------------------------------------------------


def admin_client(running, rng: random.Random) -> None:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(5)
    raw.connect(str(running.settings.admin_socket))
    try:
        frames = []
        for _ in range(rng.randrange(1, 8)):
            if rng.random() < 0.5:
                frames.append(random_frame(rng))
            else:  # a well-framed call with random params, never naming the bystanders
                params = {rng.choice(["user", "device", "message", "count", "limit", "to"]): random_value(rng)
                          for _ in range(rng.randrange(4))}
                # JSON from the standard library: it writes integers beyond 64 bits, as a hostile client may.
                frames.append(encode_frame(json.dumps({
                    "jsonrpc": "2.0", "method": rng.choice(ADMIN_METHODS),
                    "params": rng.choice([params, [], "x", None]), "id": rng.randrange(100)}).encode()))
        send_in_pieces(raw, rng, b"".join(frames))
        drain(raw)
    finally:
        raw.close()


# -- all at once ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, seed", [("ws", 0), ("ws", 1), ("ws", 2), ("wss", 3)])
def test_malformed_input_on_every_endpoint_gets_no_traceback(servers, scheme, seed, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    running = servers(ws_tls=scheme == "wss")
    rng = random.Random(seed)
    sender, recipient = running.connect("bystander-a"), running.connect("bystander-b", ws=scheme == "ws")
    clients = [gevent.spawn(client, running, random.Random(rng.random()))
               for client in (tls_client, http_client, admin_client) for _ in range(CLIENTS_PER_KIND)]
    # The bystanders are served while the fuzzing goes on, and after.
    during = sender.send("bystander-b", {"during": seed})
    assert recipient.receive(timeout=5)["id"] == during["id"]
    gevent.joinall(clients, timeout=30, raise_error=True)
    assert all(client.successful() for client in clients)
    after = recipient.send("bystander-a", {"after": seed})
    assert sender.receive(timeout=5)["id"] == after["id"]

    with gevent.Timeout(10):  # every fuzzing connection is gone again
        while running.server.tls.connection_count + running.server.http.connection_count > 2:
            gevent.sleep(0.05)
    bad = [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    assert not bad, "\n".join(caplog.text.splitlines()[-50:])
    assert "Traceback" not in capfd.readouterr().err
