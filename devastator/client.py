"""A Python client for Devastator, over TLS (framed) or WebSocket.

Blocking calls for scripts and tests; a reader thread (a greenlet when gevent
has patched the process) answers ``msg.recv`` with ACKs, drops duplicates by
message id, and hands messages to ``receive()``. ``reconnect()`` connects and
authenticates again; with ``auto_reconnect=True`` that happens by itself, with
backoff, whenever the connection drops::

    client = Client.connect_tls("127.0.0.1", 3001, ca="devastator-data/ca.pem")
    client.auth_jwt(token)
    client.send("bob", {"text": "hello"}, receipt=True)
    message = client.receive(timeout=5)
    client.mark_read([message["id"]])
    receipt = client.receive_receipt(timeout=5)  # {"id", "type", "message", "by", "ts"}
    client.signal("bob", {"typing": True})
    page = client.history("bob", limit=20)  # {"messages": [...], "more": bool}

The JSON-RPC bookkeeping (request ids, answers matched to them, the server's
requests passed on, ACK bytes, ``conn.close``) is the client half of the
connection session, ``protocol.session.ClientSession``.

Messages, receipts and signals wait in three queues (``messages``,
``receipts``, ``signals``); a ``msg.recv`` whose ``from`` is this client's own
user is a copy of a message sent from another of its devices.
"""
from __future__ import annotations

import collections
import queue
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import orjson

from .protocol.close_codes import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REPLACED,
    CLOSE_REVOKED,
    CLOSE_TOO_LARGE,
    CLOSE_UNSUPPORTED_DATA,
)
from .protocol import FrameDecoder, Notification, Request, encode_frames
from .protocol.errors import RpcError
from .protocol.session import DELIVERY_METHODS, Answer, ClientSession, CloseNotice

SEEN_IDS_KEPT = 100_000
RECONNECT_FIRST_DELAY = 0.1  # seconds; doubled after each failed attempt
RECONNECT_MAX_DELAY = 5.0
# Close codes after which connecting again cannot help (PROTOCOL.md 7): replaced,
# revoked, and the client's own protocol errors.
NO_RECONNECT_CODES = frozenset({
    CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_DATA, CLOSE_INVALID_DATA, CLOSE_TOO_LARGE, CLOSE_REPLACED, CLOSE_REVOKED,
})


class ConnectionClosed(ConnectionError):
    """The server closed the connection (or it failed)."""


class _TlsStream:
    def __init__(self, sock: ssl.SSLSocket, max_frame_bytes: int):
        self._sock = sock
        self._decoder = FrameDecoder(max_frame_bytes)
        self._write_lock = threading.Lock()

    def write(self, bodies: list[bytes]) -> None:
        with self._write_lock:
            self._sock.sendall(encode_frames(bodies))

    def write_raw(self, data: bytes) -> None:
        with self._write_lock:
            self._sock.sendall(data)

    def bodies(self) -> Iterator[bytes]:
        while True:
            data = self._sock.recv(65536)
            if not data:
                return
            yield from self._decoder.feed(data)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class CloseReason(NamedTuple):
    """Why the server closed: its ``conn.close`` notification, or its WebSocket close code."""

    code: int
    reason: str


class _WebSocketStream:
    def __init__(self, ws):
        self._ws = ws
        self._write_lock = threading.Lock()
        self.close_reason: CloseReason | None = None

    def write(self, bodies: list[bytes]) -> None:
        with self._write_lock:
            for body in bodies:
                self._ws.send(body.decode())

    def bodies(self) -> Iterator[str]:
        import websocket

        while True:
            try:
                opcode, data = self._ws.recv_data()
            except (websocket.WebSocketConnectionClosedException, OSError):
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                if len(data) >= 2:
                    self.close_reason = CloseReason(int.from_bytes(data[:2], "big"), data[2:].decode(errors="replace"))
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                yield data.decode()

    def close(self) -> None:
        self._ws.close()


class Pending:
    """The answer to a request, when it comes."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def _set(self, result=None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None):
        if not self._done.wait(timeout):
            raise TimeoutError("no answer in time")
        if self._error is not None:
            raise self._error
        return self._result


class Client:
    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        auto_ack: bool = True,
        dedupe: bool = True,
        auto_reconnect: bool = False,
        timeout: float = 10.0,
    ):
        self._connect = connect
        self.auto_ack = auto_ack
        self.dedupe = dedupe
        self.auto_reconnect = auto_reconnect
        self.reconnect_error: RpcError | None = None  # why automatic reconnection gave up
        # Why the server last closed the connection, if it said (conn.close or a WebSocket close code).
        self.close_reason: CloseReason | None = None
        self._stopping = False
        self._reconnecting = False
        self.timeout = timeout
        self._lock = threading.Lock()  # around the session: callers' threads and the reader share it
        self._session = ClientSession()  # answers are matched to their Pending
        self.messages: queue.Queue = queue.Queue()  # msg.recv params, oldest first
        self.receipts: queue.Queue = queue.Queue()  # msg.receipt params, oldest first
        self.signals: queue.Queue = queue.Queue()  # msg.signal params, as they came
        self.echoes: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._credentials: tuple[str, dict | None] | None = None
        self._stream = None
        self._open()

    # -- connecting ------------------------------------------------------------------

    @classmethod
    def connect_tls(
        cls,
        host: str,
        port: int,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        verify: bool = True,
        max_frame_bytes: int = 1 << 20,
        **kwargs,
    ) -> Client:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cert:
            context.load_cert_chain(str(cert), str(key) if key else None)

        def connect():
            raw = socket.create_connection((host, port), timeout=kwargs.get("timeout", 10.0))
            sock = context.wrap_socket(raw, server_hostname=host)
            sock.settimeout(None)
            return _TlsStream(sock, max_frame_bytes)

        return cls(connect, **kwargs)

    @classmethod
    def connect_ws(cls, url: str, *, ca: str | Path | None = None, **kwargs) -> Client:
        """``ws://`` or, trusting ``ca``, ``wss://`` (the server's ``ws_tls`` setting)."""
        import websocket

        sslopt = {"ca_certs": str(ca)} if ca else None

        def connect():
            ws = websocket.create_connection(url, timeout=kwargs.get("timeout", 10.0), sslopt=sslopt)
            ws.settimeout(None)
            return _WebSocketStream(ws)

        return cls(connect, **kwargs)

    def _open(self) -> None:
        self._stream = self._connect()
        self.close_reason = None
        self.closed.clear()
        self._reader = threading.Thread(target=self._read, args=(self._stream,), daemon=True)
        self._reader.start()

    def reconnect(self) -> dict | None:
        """Connect again and authenticate as before; returns the auth result."""
        self.close()
        self._stopping = False
        self._open()
        return self._authenticate_again()

    def _authenticate_again(self) -> dict | None:
        if self._credentials is None:
            return None
        method, params = self._credentials
        return self.call(method, params)

    def _reconnect_in_background(self) -> None:
        """With ``auto_reconnect``: connect and authenticate again, backing off, until it works."""
        delay = RECONNECT_FIRST_DELAY
        while not self._stopping:
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
            try:
                self._open()
                self._authenticate_again()
            except OSError:  # refused, reset, closed or timed out: try again
                continue
            except RpcError as error:  # the credentials are refused: retrying will not help
                self.reconnect_error = error
                break
            with self._lock:
                if not self.closed.is_set():
                    self._reconnecting = False
                    return
        with self._lock:
            self._reconnecting = False

    @property
    def reconnecting(self) -> bool:
        """With ``auto_reconnect``: the connection dropped and is being made again."""
        return self._reconnecting

    def close(self) -> None:
        self._stopping = True
        if self._stream is not None:
            self._stream.close()
        self.closed.wait(self.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calling ----------------------------------------------------------------------

    def request(self, method: str, params=None) -> Pending:
        pending = Pending()
        with self._lock:
            _, body = self._session.request(method, params, pending)
        self._write([body])
        return pending

    def call(self, method: str, params=None, timeout: float | None = None):
        return self.request(method, params).wait(self.timeout if timeout is None else timeout)

    def notify(self, method: str, params=None) -> None:
        self._write([self._session.notification(method, params)])

    def ping(self) -> str:
        return self.call("ping")

    def auth_jwt(self, token: str) -> dict:
        result = self.call("auth.jwt", {"token": token})
        self._credentials = ("auth.jwt", {"token": token})
        return result

    def auth_cert(self) -> dict:
        result = self.call("auth.cert")
        self._credentials = ("auth.cert", None)
        return result

    def auth_google(self, id_token: str, *, device: str | None = None, csr: bytes | str | None = None) -> dict:
        """Register with an OpenID Connect ID token; later reconnects use the JWT it returns."""
        params: dict[str, Any] = {"token": id_token}
        if device is not None:
            params["device"] = device
        if csr is not None:
            params["csr"] = csr.decode() if isinstance(csr, bytes) else csr
        result = self.call("auth.google", params)
        self._credentials = ("auth.jwt", {"token": result["token"]})
        return result

    def send_async(self, to, message, *, cid: str | None = None, ttl: int | None = None,
                   receipt: bool = False) -> Pending:
        params: dict[str, Any] = {"to": to, "message": message}
        if cid is not None:
            params["cid"] = cid
        if ttl is not None:
            params["ttl"] = ttl
        if receipt:
            params["receipt"] = True
        return self.request("msg.send", params)

    def send(self, to, message, *, cid: str | None = None, ttl: int | None = None, receipt: bool = False,
             timeout: float | None = None) -> dict:
        """``msg.send``; with ``receipt`` the sender's devices get delivered and read receipts."""
        pending = self.send_async(to, message, cid=cid, ttl=ttl, receipt=receipt)
        return pending.wait(self.timeout if timeout is None else timeout)

    def mark_read(self, ids, timeout: float | None = None) -> str:
        """``msg.read``: the senders of these messages that asked get read receipts."""
        return self.call("msg.read", {"ids": list(ids)}, timeout)

    def signal(self, to, data, timeout: float | None = None) -> str:
        """``msg.signal``: ``data`` to the recipients' devices online now; never stored."""
        return self.call("msg.signal", {"to": to, "signal": data}, timeout)

    def history(self, with_user: str, *, before: str | None = None, limit: int | None = None,
                timeout: float | None = None) -> dict:
        """One ``msg.history`` page with ``with_user``, newest first: ``{"messages", "more"}``."""
        params: dict[str, Any] = {"with": with_user}
        if before is not None:
            params["before"] = before
        if limit is not None:
            params["limit"] = limit
        return self.call("msg.history", params, timeout)

    def receive(self, timeout: float | None = None) -> dict:
        """The next message (``msg.recv`` params); raises TimeoutError."""
        return self._next(self.messages, timeout, "message")

    def receive_receipt(self, timeout: float | None = None) -> dict:
        """The next receipt (``msg.receipt`` params); raises TimeoutError."""
        return self._next(self.receipts, timeout, "receipt")

    def receive_signal(self, timeout: float | None = None) -> dict:
        """The next signal (``msg.signal`` params); raises TimeoutError."""
        return self._next(self.signals, timeout, "signal")

    def _next(self, waiting: queue.Queue, timeout: float | None, what: str) -> dict:
        try:
            return waiting.get(timeout=self.timeout if timeout is None else timeout)
        except queue.Empty:
            raise TimeoutError(f"no {what} in time") from None

    def ack(self, ids) -> None:
        self._write([self._session.acks(ids)])

    def _write(self, bodies: list[bytes]) -> None:
        try:
            self._stream.write(bodies)
        except OSError as error:
            raise ConnectionClosed(str(error)) from error

    # -- reading ------------------------------------------------------------------------

    def _read(self, stream) -> None:
        try:
            for body in stream.bodies():
                self._on_body(body)
        except (OSError, ValueError, RpcError):  # ValueError: ssl, when close() shut the socket under this read
            pass
        finally:
            with self._lock:
                pending = self._session.abandon()
            for waiting in pending:
                waiting._set(error=ConnectionClosed("connection closed before the answer"))
            if self.close_reason is None:
                self.close_reason = getattr(stream, "close_reason", None)
            hopeless = self.close_reason is not None and self.close_reason.code in NO_RECONNECT_CODES
            with self._lock:
                start = self.auto_reconnect and not self._stopping and not self._reconnecting and not hopeless
                self._reconnecting = self._reconnecting or start
            self.closed.set()  # after the decision, so that a waiter sees ``reconnecting`` settled
            if start:
                threading.Thread(target=self._reconnect_in_background, daemon=True).start()

    def _on_body(self, body) -> None:
        with self._lock:
            events, as_batch = self._session.receive(body)
        replies = [reply for reply in map(self._on_event, events) if reply is not None]
        data = self._session.replies(replies, as_batch=as_batch)  # a batch's answers go as one
        if data is not None:
            self._write([data])

    def _on_event(self, event):
        """Act on one thing the server sent; returns the answer to write, if any."""
        kind = type(event)
        if kind is Answer:
            event.token._set(event.result, event.error)
            return None
        if kind is Request:
            if event.method in DELIVERY_METHODS:
                # Both are deliveries: ACKed, and told apart from a redelivery by their id.
                delivery_id = event.id
                waiting = self.messages if event.method == "msg.recv" else self.receipts
                if not self.dedupe:
                    waiting.put(event.params)
                elif delivery_id not in self._seen:
                    self._seen[delivery_id] = None
                    if len(self._seen) > SEEN_IDS_KEPT:
                        self._seen.popitem(last=False)
                    waiting.put(event.params)
                return ClientSession.ack(event) if self.auto_ack else None
            if event.method == "msg.echo":
                self.echoes.put(event.params)
                return ClientSession.ack(event)
            return ClientSession.unknown(event)
        if kind is Notification:
            if event.method == "msg.signal":
                self.signals.put(event.params)
            return None
        if kind is CloseNotice:
            self.close_reason = CloseReason(event.code, event.reason)
        return None


def frame(value) -> bytes:
    """One JSON value as a TLS frame (for tests and tools writing raw frames)."""
    return encode_frames([orjson.dumps(value)])
