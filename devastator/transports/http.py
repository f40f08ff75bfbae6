"""The HTTP port: the WebSocket endpoint ``/ws`` for browsers, and ``/healthz``.

One text frame carries one JSON value (PROTOCOL.md 1); binary frames are
refused with close code 1003. gevent-websocket stays behind this module: the
actors only see an OutboundQueue, as with the TLS endpoint.
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
from typing import Callable, Iterable, Mapping

import pykka
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from geventwebsocket.exceptions import WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Header, WebSocket

from ..protocol import ErrorResponse, encode
from ..protocol.errors import RpcError, TooLarge
from ..telemetry import Telemetry
from .endpoint import Endpoint, listener
from .outbound import OutboundQueue

log = logging.getLogger(__name__)

CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008

# An operator endpoint: path -> (content type, function making the body).
Route = tuple[str, Callable[[], bytes]]


class _BoundedWebSocket(WebSocket):
    """gevent-websocket with a size limit checked before a payload is read.

    The library reads whatever length a frame header announces, and unmasks
    byte by byte in Python; this reads at most the limit per message and
    unmasks with one integer XOR. The library's class has ``__slots__``, so the
    per-connection limit and count live in the request's environ.
    """

    __slots__ = ()

    def read_frame(self):
        header = Header.decode_header(self.stream)
        if header.flags:
            raise WebSocketError("reserved bits set")
        if header.opcode < self.OPCODE_CLOSE:  # data frames: count the message's size
            environ = self.environ
            size = header.length
            if header.opcode != self.OPCODE_CONTINUATION:
                environ[_MESSAGE_BYTES] = 0
            size += environ.get(_MESSAGE_BYTES, 0)
            environ[_MESSAGE_BYTES] = size
            if size > environ[_MAX_MESSAGE_BYTES]:
                raise TooLarge(f"message over {environ[_MAX_MESSAGE_BYTES]} bytes")
        if not header.length:
            return header, b""
        payload = self.raw_read(header.length)
        if len(payload) != header.length:
            raise WebSocketError("unexpected EOF reading frame payload")
        if header.mask:
            payload = _unmask(payload, header.mask)
        return header, payload


_MAX_MESSAGE_BYTES = "devastator.max_message_bytes"
_MESSAGE_BYTES = "devastator.message_bytes"


def _close_frame(ws: WebSocket, code: int, reason: bytes) -> None:
    # The library's close() drops its code argument; write the frame ourselves.
    payload = struct.pack("!H", code) + reason
    ws.raw_write(Header.encode_header(True, WebSocket.OPCODE_CLOSE, b"", len(payload), 0) + payload)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def _text_frames(bodies: Iterable[bytes]) -> bytes:
    return b"".join(
        Header.encode_header(True, WebSocket.OPCODE_TEXT, b"", len(body), 0) + body for body in bodies
    )


class _WebSocketHandler(WebSocketHandler):
    def log_request(self) -> None:
        """No access log: a line per request is telemetry, not an actionable event."""


class HttpTransport(Endpoint):
    name = "HTTP/WebSocket endpoint"
    transport = "ws"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        new_device: Callable[[OutboundQueue], pykka.ActorRef],
        max_connections: int,
        max_frame_bytes: int,
        max_outbound_bytes: int,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        routes: Mapping[str, Route] | None = None,
        telemetry: Telemetry | None = None,
        reuse_port: bool = False,
    ):
        super().__init__(new_device=new_device, max_outbound_bytes=max_outbound_bytes, telemetry=telemetry)
        self._max_frame_bytes = max_frame_bytes
        self._read_timeout = read_timeout
        self._routes = dict(routes or {})
        self._routes.setdefault("/healthz", ("application/json", lambda: b'{"status":"ok"}'))
        kwargs = {"ssl_context": ssl_context} if ssl_context is not None else {}
        self._server = WSGIServer(
            listener(host, port, reuse_port=reuse_port),
            self._app,
            handler_class=_WebSocketHandler,
            spawn=Pool(max_connections),
            log=None,
            error_log=log,
            **kwargs,
        )

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/ws":
            ws = environ.get("wsgi.websocket")
            if ws is None:
                start_response("426 Upgrade Required", [("Content-Type", "text/plain"), ("Upgrade", "websocket")])
                return [b"a WebSocket upgrade is required on /ws\n"]
            self._serve_websocket(ws, environ)
            return []
        route = self._routes.get(path)
        if route is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        content_type, render = route
        body = render()
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def _serve_websocket(self, ws: WebSocket, environ) -> None:
        ws.__class__ = _BoundedWebSocket  # same object, our read_frame (see the class)
        environ[_MAX_MESSAGE_BYTES] = self._max_frame_bytes
        raw = ws.handler.socket
        raw.settimeout(self._read_timeout)
        remote = f"{environ.get('REMOTE_ADDR')}:{environ.get('REMOTE_PORT')}"
        outbound = OutboundQueue(
            write=lambda bodies: ws.raw_write(_text_frames(bodies)),
            shut=lambda: _shut(raw),
            spawn=self._spawn_writer,
            max_bytes=self._max_outbound_bytes,
            remote=remote,
        )
        self._serve(outbound, lambda forward: self._read(ws, forward, outbound))

    def _read(self, ws: WebSocket, forward: Callable[[tuple], None], outbound: OutboundQueue) -> str:
        while not outbound.closing:
            try:
                message = ws.receive()
            except RpcError as violation:
                outbound.send([encode(ErrorResponse.from_error(violation))])
                outbound.close(final=lambda: _close_frame(ws, CLOSE_POLICY_VIOLATION, b"message too large"))
                return f"protocol violation: {violation.message}"
            except (WebSocketError, OSError) as error:
                return f"read failed: {error}"
            if message is None:
                return "closed by peer"
            if not isinstance(message, str):
                outbound.close(
                    final=lambda: _close_frame(ws, CLOSE_UNSUPPORTED_DATA, b"binary frames are not accepted")
                )
                return "binary frame refused"
            forward((message,))
        return "closed by server"


def _shut(raw: socket.socket) -> None:
    try:
        raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
