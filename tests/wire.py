"""Raw wire helpers for tests: a framed TLS socket and JSON-RPC value builders."""
from __future__ import annotations

import collections
import socket
import ssl

import orjson

from conftest import RunningServer
from devastator.client import frame
from devastator.protocol import FrameDecoder

READ_TIMEOUT = 5.0
DEFAULT_MAX_FRAME_BYTES = 1 << 20


class RawTls:
    """A TLS socket that writes raw bytes and reads whole JSON values back."""

    def __init__(self, running: RunningServer, timeout: float = READ_TIMEOUT, *, cert=None, key=None):
        context = ssl.create_default_context(cafile=str(running.ca))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key))
        raw = socket.create_connection(running.tls_address, timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.sock.settimeout(timeout)
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        self._values: collections.deque = collections.deque()
        self._ids = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_value(self, value) -> None:
        self.send(frame(value))

    def read(self, count: int = 1) -> list:
        """The next ``count`` JSON values; fails on EOF or after the timeout."""
        while len(self._values) < count:
            data = self.sock.recv(65536)  # TimeoutError if nothing comes in time
            if not data:
                raise AssertionError(f"server closed the connection; got only {list(self._values)}")
            self._feed(data)
        return [self._values.popleft() for _ in range(count)]

    def read_one(self):
        return self.read(1)[0]

    def call(self, method: str, params=None, id=None):
        """Send one request and return the next value read (its answer)."""
        if id is None:
            self._ids += 1
            id = f"r{self._ids}"
        self.send_value(request(method, params, id))
        return self.read_one()

    def assert_closed(self) -> None:
        """Nothing more arrives and the server closes the connection."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self._feed(data)
        except TimeoutError:
            raise AssertionError("the server did not close the connection") from None
        except (ConnectionError, ssl.SSLError):
            pass  # a reset or a TLS alert is a close too
        assert not self._values, f"unexpected values before the close: {list(self._values)}"

    def assert_open(self) -> None:
        """The connection still answers a ping, and nothing else was pending."""
        self.send_value(request("ping", None, "still-open"))
        assert self.read_one() == {"jsonrpc": "2.0", "id": "still-open", "result": "pong"}
        assert not self._values

    def auth(self, token: str) -> dict:
        answer = self.call("auth.jwt", {"token": token}, id="auth")
        assert "result" in answer, answer
        return answer["result"]

    def close(self) -> None:
        self.sock.close()

    def _feed(self, data: bytes) -> None:
        for body in self._decoder.feed(data):
            self._values.append(orjson.loads(body))


def request(method: str, params, id) -> dict:
    value = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        value["params"] = params
    return value


def notification(method: str, params=None) -> dict:
    value = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        value["params"] = params
    return value


def assert_error(answer, code: int, id) -> None:
    assert isinstance(answer, dict), answer
    assert answer.get("jsonrpc") == "2.0", answer
    assert "id" in answer and answer["id"] == id and type(answer["id"]) is type(id), answer
    assert "result" not in answer, answer
    assert answer["error"]["code"] == code, answer
    assert isinstance(answer["error"]["message"], str), answer


def assert_result(answer, result, id) -> None:
    assert answer == {"jsonrpc": "2.0", "id": id, "result": result}


# -- the server keeps serving others ---------------------------------------------------
