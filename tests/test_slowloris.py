"""Slow and lying clients on the TLS endpoint: a frame must arrive whole within ``frame_timeout``.

Real TLS connections that send half a header, or a header announcing more
than they send, more of them than ``max_connections`` lets in at once: each
is answered -32600 and closed at its deadline, and a well-behaved client
that came after them all is served within that deadline.
"""
import contextlib
import logging
import socket
import struct
import time

import gevent
import gevent.event
import pytest

from devastator import pki
from devastator.throttled_log import ThrottledLog
from devastator.transports import TlsTransport
from test_fuzz_endpoints import client_hello
from wire import RawTls, assert_error, assert_result, frame, request

FRAME_TIMEOUT = 1.0
MAX_CONNECTIONS = 6
SLOW_CLIENTS = 10  # more than MAX_CONNECTIONS: some wait in the listen queue for a place
# Handshakes, a loaded 2-core machine: a margin on top of the deadline, well under the 300 s idle timeout.
MARGIN = 3.0

HALF_HEADER = b"\x10\x00"
LYING_HEADER = struct.pack("<I", 1000) + b"x" * 10  # 1,000 bytes announced, 10 sent


@pytest.fixture
def running(servers):
    return servers(max_connections=MAX_CONNECTIONS, frame_timeout=FRAME_TIMEOUT)


def assert_cut_at_the_deadline(raw: RawTls, started: float) -> None:
    answer = raw.read_one()
    assert_error(answer, -32600, None)
    assert f"within {FRAME_TIMEOUT:g} s" in answer["error"]["message"], answer
    raw.assert_closed()
    assert time.monotonic() - started >= FRAME_TIMEOUT * 0.9


def slow_client(running, data: bytes, holding: list) -> float:
    """Connect (waiting for a place), send ``data``, hold on; return how long the server took to cut it."""
    raw = RawTls(running, timeout=FRAME_TIMEOUT * SLOW_CLIENTS + MARGIN)
    try:
        raw.send(data)
        started = time.monotonic()
        holding.append(raw)
        assert_cut_at_the_deadline(raw, started)
        return time.monotonic() - started
    finally:
        raw.close()


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.01)


def test_half_frames_beyond_max_connections_do_not_lock_a_good_client_out(running):
    holding: list = []
    slow = [gevent.spawn(slow_client, running, HALF_HEADER if n % 2 else LYING_HEADER, holding)
            for n in range(SLOW_CLIENTS)]
    # Every place is taken by a slow client; the others wait in the listen queue.
    wait_until(lambda: len(holding) >= MAX_CONNECTIONS and running.server.tls.connection_count == MAX_CONNECTIONS)
    assert len(holding) == MAX_CONNECTIONS

    started = time.monotonic()
    good = RawTls(running, timeout=FRAME_TIMEOUT + MARGIN)  # waits behind them for a place
    good.auth(running.token("patient"))
    assert_result(good.call("ping", id="served"), "pong", "served")
    assert time.monotonic() - started < FRAME_TIMEOUT + MARGIN

    gevent.joinall(slow, timeout=FRAME_TIMEOUT * SLOW_CLIENTS + MARGIN, raise_error=True)
    assert all(greenlet.successful() for greenlet in slow)
    assert all(greenlet.value < FRAME_TIMEOUT + MARGIN for greenlet in slow), [g.value for g in slow]
    good.assert_open()  # its own frames were whole: it is never cut
    good.close()


def test_a_frame_trickling_in_is_cut_at_its_deadline_not_at_the_idle_timeout(running):
    raw = RawTls(running)
    body = b'{"jsonrpc":"2.0","method":"ping","id":1}'
    data = struct.pack("<I", len(body)) + body
    cut = gevent.event.Event()

    def trickle():
        # A byte every tenth of the deadline: never silent for long, never whole in time.
        for byte in data:
            if cut.is_set():
                return
            try:
                raw.send(bytes([byte]))
            except OSError:
                return  # closed by the server
            gevent.sleep(FRAME_TIMEOUT / 10)

    started = time.monotonic()
    trickler = gevent.spawn(trickle)
    try:
        assert_cut_at_the_deadline(raw, started)
        assert time.monotonic() - started < FRAME_TIMEOUT + MARGIN
    finally:
        cut.set()
        trickler.join(MARGIN)
        raw.close()


def test_frames_split_across_reads_within_the_deadline_are_served(running):
    raw = RawTls(running)
    data = b"".join(frame(request("ping", None, n)) for n in range(3))
    for cut in range(0, len(data), 7):  # headers and bodies cut anywhere, each frame whole in time
        raw.send(data[cut:cut + 7])
        gevent.sleep(FRAME_TIMEOUT / 20)
    for n in range(3):
        assert_result(raw.read_one(), "pong", n)
    # Between frames silence is the idle timeout's business: nothing comes for longer than a frame's deadline.
    raw.sock.settimeout(FRAME_TIMEOUT * 1.5)
    with pytest.raises(TimeoutError):
        raw.sock.recv(1)
    raw.assert_open()
    raw.close()


def test_a_tls_handshake_trickling_in_is_cut_at_its_deadline(tmp_path):
    # The whole handshake has one deadline (10 s on the server; 1 s here), not one per read.
    paths = pki.ensure_pki(tmp_path / "data")
    transport = TlsTransport(
        host="127.0.0.1", port=0, ssl_context=pki.server_ssl_context(paths),
        new_device=lambda outbound: pytest.fail("no handshake should finish"),
        max_connections=4, max_frame_bytes=1 << 20, max_outbound_bytes=1 << 20, read_timeout=300.0,
        auth_log=ThrottledLog(logging.getLogger("test")), handshake_timeout=FRAME_TIMEOUT,
    )
    transport.start()
    raw = socket.create_connection(transport.address, timeout=FRAME_TIMEOUT + MARGIN)
    hello = client_hello()

    def trickle():
        for byte in hello:
            try:
                raw.sendall(bytes([byte]))
            except OSError:
                return  # cut by the server
            gevent.sleep(FRAME_TIMEOUT / 10)

    started = time.monotonic()
    trickler = gevent.spawn(trickle)
    try:
        with contextlib.suppress(ConnectionResetError):  # cut with a byte unread: a reset
            assert raw.recv(1) == b""
        assert FRAME_TIMEOUT * 0.9 <= time.monotonic() - started < FRAME_TIMEOUT + MARGIN
    finally:
        trickler.kill()
        raw.close()
        transport.stop(timeout=1)
