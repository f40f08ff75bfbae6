"""RFC 6455 on the WebSocket endpoint, over ws:// and wss://, checked by clients that are not ours.

``websockets`` is a strict, independent client; ``RawWebSocket`` writes the
frames by hand to send what no library would. Every test ends by showing that
the server still serves others. Close codes are PROTOCOL.md section 7's.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import struct
import subprocess

import gevent
import pytest
import websockets.sync.client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import RunningServer
from devastator.protocol.errors import TOO_LARGE
from devastator.store import SqliteStore

TIMEOUT = 5.0
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(params=["ws", "wss"])
def scheme(request) -> str:
    return request.param


@pytest.fixture
def endpoint(servers, scheme):
    """Start a server whose HTTP port speaks ``scheme``; more settings as keywords."""

    def start(**changes) -> RunningServer:
        return servers(ws_tls=scheme == "wss", **changes)

    return start


def url(running: RunningServer) -> str:
    scheme = "wss" if running.settings.ws_tls else "ws"
    return f"{scheme}://localhost:{running.http_address[1]}/ws"


def client_context(running: RunningServer) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=str(running.ca)) if running.settings.ws_tls else None


def strict_client(running: RunningServer, **kwargs):
    return websockets.sync.client.connect(
        url(running), ssl=client_context(running), open_timeout=TIMEOUT, close_timeout=TIMEOUT,
        ping_interval=None, compression=None, proxy=None, legacy=True, **kwargs,
    )


def call(ws, method: str, params=None, id=1):
    request = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        request["params"] = params
    ws.send(json.dumps(request))
    return json.loads(ws.recv(timeout=TIMEOUT))


def assert_serving(running: RunningServer) -> None:
    """A new strict client is answered, and a TLS device still gets messages."""
    with strict_client(running) as ws:
        assert call(ws, "ping", id="serving") == {"jsonrpc": "2.0", "id": "serving", "result": "pong"}
        phone = running.connect("serving-phone")
        assert phone.ping() == "pong"


class RawWebSocket:
    """A WebSocket client written by hand: any frame, masked or not, and the server's frames as read."""

    def __init__(self, running: RunningServer, handshake: str = HANDSHAKE):
        raw = socket.create_connection(running.http_address, timeout=TIMEOUT)
        context = client_context(running)
        self.sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        self._buffer = b""
        self.sock.sendall(handshake.encode())
        self.status, self.headers = self._read_head()

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self._buffer += data

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
                   rsv: int = 0) -> None:
        self.sock.sendall(frame(opcode, payload, fin=fin, mask=mask, rsv=rsv))

    def send_json(self, value) -> None:
        self.send_frame(OP_TEXT, json.dumps(value).encode())

    def read_frame(self) -> tuple[int, bytes]:
        first, second = self._take(2)
        assert not second & 0x80, "a server must not mask its frames (RFC 6455 5.1)"
        assert not first & 0x70, "no extension was agreed: reserved bits must be 0"
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self._take(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", self._take(8))
        return first & 0x0F, self._take(size)

    def read_json(self):
        opcode, payload = self.read_frame()
        assert opcode == OP_TEXT, (opcode, payload)
        return json.loads(payload)

    def read_close(self) -> int | None:
        """Frames until the server's close frame: its code (None for an empty payload).

        Text and pongs before it are kept in ``self.before_close``.
        """
        self.before_close = []
        while True:
            opcode, payload = self.read_frame()
            if opcode == OP_CLOSE:
                assert len(payload) != 1, "a close payload is empty or starts with a 2-byte code"
                if payload:
                    payload[2:].decode()  # the reason is UTF-8 (RFC 6455 5.5.1)
                return struct.unpack("!H", payload[:2])[0] if payload else None
            self.before_close.append((opcode, payload))

    def assert_eof(self) -> None:
        """After the close handshake the server ends the TCP connection."""
        try:
            while True:
                self._fill()
        except (EOFError, ConnectionError, ssl.SSLError):
            return

    def close(self) -> None:
        self.sock.close()


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload)
    if size < 126:
        header = bytes((first, (0x80 if mask else 0) | size))
    elif size < 65536:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, size)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, size)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))


def json_frame(value) -> bytes:
    return frame(OP_TEXT, json.dumps(value).encode())


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


# -- the closing handshake ---------------------------------------------------------------------


@pytest.mark.parametrize("code, reason", [(1000, "bye"), (1001, ""), (4000, "custom code")])
def test_the_server_echoes_the_client_close_code(endpoint, code, reason):
    running = endpoint()
    ws = strict_client(running)
    assert call(ws, "ping") == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
    ws.close(code, reason)
    assert ws.protocol.close_rcvd is not None, "no close frame came back"
    assert ws.protocol.close_rcvd.code == code
    assert_serving(running)


def test_a_close_without_a_code_is_answered_with_a_valid_close_frame(endpoint):
    running = endpoint()
    raw = RawWebSocket(running)
    raw.send_frame(OP_CLOSE)
    assert raw.read_close() in (None, 1000)
    raw.assert_eof()
    assert_serving(running)


@pytest.mark.parametrize("payload", [close_payload(999), close_payload(1005), close_payload(1006),
                                     close_payload(2999), b"\x03", close_payload(1000, "") + b"\xff\xfe"])
def test_an_invalid_close_frame_is_a_protocol_error(endpoint, payload):
    running = endpoint()
    raw = RawWebSocket(running)
    raw.send_frame(OP_CLOSE, payload)
    assert raw.read_close() in (1002, 1007)
    assert_serving(running)


# -- frames the server must refuse ---------------------------------------------------------------


PING = {"jsonrpc": "2.0", "method": "ping", "id": 1}


@pytest.mark.parametrize(
    "bad_frame, code",
    [
        (frame(OP_TEXT, json.dumps(PING).encode(), mask=False), 1002),  # 5.1: clients mask every frame
        (frame(OP_TEXT, json.dumps(PING).encode(), rsv=4), 1002),  # 5.2: RSV1 without an extension
        (frame(0x3, b"x"), 1002),  # a reserved data opcode
        (frame(0xB, b"x"), 1002),  # a reserved control opcode
        (frame(OP_PING, b"x" * 126), 1002),  # 5.5: control frames carry at most 125 bytes
        (frame(OP_PING, b"x", fin=False), 1002),  # 5.5: control frames are not fragmented
        (frame(OP_CONTINUATION, b"x"), 1002),  # a continuation of nothing
        (frame(OP_TEXT, b'{"a": "\xff"}'), 1007),  # 8.1: text is UTF-8
        (frame(OP_TEXT, b'"\xe2\x82', fin=False) + frame(OP_CONTINUATION, b'\x28"'), 1007),  # across frames
        (frame(OP_BINARY, json.dumps(PING).encode()), 1003),  # PROTOCOL.md 1: text frames only
        (frame(OP_TEXT, b'"a', fin=False) + frame(OP_TEXT, b'b"'), 1002),  # a new message inside one
    ],
    ids=["unmasked", "rsv1", "opcode-3", "opcode-11", "long-ping", "fragmented-ping", "stray-continuation",
         "invalid-utf8", "utf8-split-invalid", "binary", "text-inside-fragmented-text"],
)
def test_a_bad_frame_closes_with_its_code(endpoint, bad_frame, code):
    running = endpoint()
    raw = RawWebSocket(running)
    assert raw.status == 101
    raw.sock.sendall(bad_frame)
    assert raw.read_close() == code
    assert not [f for f in raw.before_close if f[0] == OP_TEXT and b"conn.close" in f[1]], \
        "a protocol violation gets no conn.close notification"
    raw.assert_eof()
    assert_serving(running)


def test_a_message_over_the_limit_is_too_large_then_1008(endpoint):
    running = endpoint(max_frame_bytes=4096, max_message_bytes=2048)
    raw = RawWebSocket(running)
    raw.sock.sendall(frame(OP_TEXT, b'"' + b"x" * 3000, fin=False) + frame(OP_CONTINUATION, b"x" * 3000 + b'"'))
    answer = raw.read_json()
    assert answer["error"]["code"] == TOO_LARGE and answer["id"] is None
    assert raw.read_close() == 1008
    assert_serving(running)


def test_a_fragmented_message_with_pings_between_is_one_message(endpoint):
    running = endpoint()
    raw = RawWebSocket(running)
    text = json.dumps({"jsonrpc": "2.0", "method": "ping", "id": "fragmented"}).encode()
    raw.sock.sendall(
        frame(OP_TEXT, text[:10], fin=False) + frame(OP_PING, b"between")
        + frame(OP_CONTINUATION, text[10:20], fin=False) + frame(OP_CONTINUATION, text[20:])
    )
    assert raw.read_frame() == (OP_PONG, b"between")  # 5.5.3: the pong carries the ping's payload
    assert raw.read_json() == {"jsonrpc": "2.0", "id": "fragmented", "result": "pong"}


def test_answers_queued_before_a_bad_frame_are_written_before_the_close(endpoint):
    running = endpoint()
    raw = RawWebSocket(running)
    batches = [[{"jsonrpc": "2.0", "method": "ping", "id": f"{b}-{n}"} for n in range(100)] for b in range(5)]
    raw.sock.sendall(b"".join(json_frame(batch) for batch in batches) + frame(OP_TEXT, b"x", mask=False))
    assert raw.read_close() == 1002
    answers = [json.loads(payload) for opcode, payload in raw.before_close if opcode == OP_TEXT]
    assert [[item["id"] for item in answer] for answer in answers] == [[r["id"] for r in b] for b in batches]
    assert_serving(running)


# -- conn.close and the server's own close codes ----------------------------------------------------


def read_conn_close(ws) -> tuple[dict, int]:
    """The conn.close notification, then the close frame's code, as a strict client sees them."""
    notification = json.loads(ws.recv(timeout=TIMEOUT))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None, "no close frame"
    return notification, closed.value.rcvd.code


def test_a_replaced_connection_gets_conn_close_and_4001(endpoint):
    running = endpoint()
    token = running.token("carol", "laptop")
    first = strict_client(running)
    assert call(first, "auth.jwt", {"token": token})["result"]["user"] == "carol"
    second = strict_client(running)
    assert call(second, "auth.jwt", {"token": token})["result"]["device"] == "laptop"
    notification, code = read_conn_close(first)
    assert notification["method"] == "conn.close" and "id" not in notification
    assert notification["params"]["code"] == 4001 and notification["params"]["reason"]
    assert code == 4001
    assert call(second, "ping") == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
    second.close()
    assert_serving(running)


def test_a_removed_device_gets_conn_close_and_4002(endpoint):
    running = endpoint()
    ws = strict_client(running)
    assert "result" in call(ws, "auth.jwt", {"token": running.token("dave", "tablet")})
    removal = SqliteStore(running.settings.db_path)
    removal.open()
    try:
        assert removal.remove_device("dave", "tablet", 0)
    finally:
        removal.close()
    notification, code = read_conn_close(ws)
    assert notification["params"]["code"] == 4002
    assert code == 4002
    assert_serving(running)


def test_shutting_down_sends_conn_close_and_1001(endpoint):
    running = endpoint()
    ws = strict_client(running)
    assert call(ws, "ping") == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
    stopping = gevent.spawn(running.server.stop)
    notification, code = read_conn_close(ws)
    assert notification["params"] == {"code": 1001, "reason": "server shutting down"}
    assert code == 1001
    stopping.get(timeout=15)


def test_the_server_pings_a_quiet_connection_and_a_pong_keeps_it_open(endpoint):
    running = endpoint(ws_ping_interval=0.1, read_timeout=0.5)
    raw = RawWebSocket(running)
    answered = 0
    with gevent.Timeout(10):
        while answered < 12:  # well past the idle timeout, kept alive by pongs alone
            opcode, payload = raw.read_frame()
            assert opcode == OP_PING, (opcode, payload)
            raw.send_frame(OP_PONG, payload)
            answered += 1
    raw.send_json(PING)
    while True:  # a ping may cross the request
        opcode, payload = raw.read_frame()
        if opcode == OP_TEXT:
            assert json.loads(payload) == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
            break
        assert opcode == OP_PING


def test_a_connection_that_answers_no_ping_is_closed_with_4003(endpoint):
    running = endpoint(ws_ping_interval=0.1, read_timeout=0.5)
    raw = RawWebSocket(running)
    assert raw.read_close() == 4003
    texts = [json.loads(payload) for opcode, payload in raw.before_close if opcode == OP_TEXT]
    assert texts == [{"jsonrpc": "2.0", "method": "conn.close", "params": {"code": 4003, "reason": "idle timeout"}}]
    assert any(opcode == OP_PING for opcode, _ in raw.before_close)
    raw.assert_eof()
    assert_serving(running)


def test_the_devastator_subprotocol_is_selected_when_offered(endpoint):
    running = endpoint()
    with strict_client(running, subprotocols=["devastator.v1"]) as ws:
        assert ws.subprotocol == "devastator.v1"
        assert call(ws, "ping") == {"jsonrpc": "2.0", "id": 1, "result": "pong"}
    raw = RawWebSocket(running, HANDSHAKE.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: chat, superchat\r\n\r\n"))
    assert raw.status == 101 and "sec-websocket-protocol" not in raw.headers


def test_the_accept_key_is_rfc_6455s(endpoint):
    raw = RawWebSocket(endpoint())
    assert raw.status == 101
    assert raw.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3's example
    assert raw.headers["upgrade"].lower() == "websocket"
    assert "upgrade" in raw.headers["connection"].lower()


# -- the opening handshake's errors are HTTP answers -------------------------------------------------


def without(header: str) -> str:
    return "".join(line + "\r\n" for line in HANDSHAKE.split("\r\n") if line and not line.startswith(header)) + "\r\n"


@pytest.mark.parametrize(
    "handshake, status",
    [
        (without("Host"), 400),
        (without("Sec-WebSocket-Key"), 400),
        (HANDSHAKE.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), 400),  # not 16 bytes
        (without("Sec-WebSocket-Version"), 400),
        (HANDSHAKE.replace("Version: 13", "Version: 8"), 426),
        (without("Connection"), 400),
        (HANDSHAKE.replace("GET /ws", "GET /nope"), 404),
        (HANDSHAKE.replace("HTTP/1.1", "HTTP/1.0"), 400),
        (HANDSHAKE.replace("GET /ws", "POST /ws"), 405),
        (without("Upgrade"), 426),
        ("GARBAGE\r\n\r\n", 400),
    ],
    ids=["no-host", "no-key", "short-key", "no-version", "version-8", "no-connection-upgrade", "unknown-path",
         "http-1.0", "post", "no-upgrade", "garbage"],
)
def test_a_bad_upgrade_is_an_http_error(endpoint, handshake, status, caplog):
    running = endpoint()
    caplog.set_level(logging.DEBUG)
    raw = RawWebSocket(running, handshake)
    assert raw.status == status
    if status == 426 and "Version: 8" in handshake:
        assert raw.headers["sec-websocket-version"] == "13"
    raw.assert_eof()
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert_serving(running)


def test_malformed_requests_are_one_throttled_warning(endpoint, caplog):
    running = endpoint()
    for _ in range(5):
        RawWebSocket(running, "GARBAGE\r\n\r\n").assert_eof()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "devastator.http"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


# -- slow and half-sent requests cannot hold the port ------------------------------------------------------


def test_a_half_sent_request_head_is_cut_at_the_deadline(endpoint):
    running = endpoint(http_header_timeout=0.3)
    raw = RawWebSocket.__new__(RawWebSocket)
    sock = socket.create_connection(running.http_address, timeout=TIMEOUT)
    context = client_context(running)
    raw.sock = context.wrap_socket(sock, server_hostname="localhost") if context else sock
    raw._buffer = b""
    raw.sock.sendall(HANDSHAKE[:40].encode())
    status, _ = raw._read_head()
    assert status == 408
    raw.assert_eof()


def test_an_upgrade_sent_one_byte_at_a_time_is_cut_at_the_deadline(endpoint):
    running = endpoint(http_header_timeout=0.5)
    sock = socket.create_connection(running.http_address, timeout=TIMEOUT)
    context = client_context(running)
    sock = context.wrap_socket(sock, server_hostname="localhost") if context else sock

    def trickle():
        for byte in HANDSHAKE.encode():
            sock.sendall(bytes((byte,)))
            gevent.sleep(0.05)  # the client's pace, not a wait for the server

    sender = gevent.spawn(trickle)
    received = b""
    try:
        with gevent.Timeout(TIMEOUT):
            while True:
                data = sock.recv(4096)
                if not data:
                    break
                received += data
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        sender.kill()
    assert not received.startswith(b"HTTP/1.1 101"), received
    assert received.startswith(b"HTTP/1.1 408"), received


def test_half_sent_requests_beyond_max_connections_do_not_lock_the_port_out(endpoint):
    running = endpoint(max_connections=20, http_header_timeout=0.5)
    context = client_context(running)
    held = []
    for _ in range(30):
        sock = socket.create_connection(running.http_address, timeout=TIMEOUT)
        if context:
            sock = context.wrap_socket(sock, server_hostname="localhost", do_handshake_on_connect=False)
        else:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        held.append(sock)
    try:
        host, port = running.http_address
        if context:
            conn = http.client.HTTPSConnection("localhost", port, timeout=TIMEOUT, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        for sock in held:
            sock.close()


def test_wss_asks_for_no_client_certificate(servers):
    running = servers(ws_tls=True)
    port = running.http_address[1]
    probe = subprocess.run(
        ["openssl", "s_client", "-connect", f"localhost:{port}", "-CAfile", str(running.ca), "-state",
         "-tls1_2"],
        input="", capture_output=True, text=True, timeout=30,
    )
    assert "Verify return code: 0 (ok)" in probe.stdout, probe.stdout + probe.stderr
    assert "certificate request" not in (probe.stdout + probe.stderr).lower()
    # The TLS endpoint still asks (mutual TLS for mobile devices).
    probe = subprocess.run(
        ["openssl", "s_client", "-connect", f"localhost:{running.tls_address[1]}", "-CAfile", str(running.ca),
         "-state", "-tls1_2"],
        input="", capture_output=True, text=True, timeout=30,
    )
    assert "certificate request" in (probe.stdout + probe.stderr).lower()


def test_a_strict_client_is_refused_an_upgrade_of_an_unknown_path(endpoint):
    running = endpoint()
    with pytest.raises(InvalidStatus) as refused:
        websockets.sync.client.connect(url(running).replace("/ws", "/nope"), ssl=client_context(running),
                                       open_timeout=TIMEOUT, proxy=None, legacy=True)
    assert refused.value.response.status_code == 404
