"""The HTTP port: the WebSocket endpoint ``/ws``, the chat page, and the operator routes.

HTTP/1.1 is parsed by h11 and WebSocket frames by wsproto (both sans-IO):
this module only reads sockets, checks the upgrade (RFC 6455 4.2) and hands
an upgraded connection to a device actor, as the TLS endpoint does. The
request head, and the TLS handshake before it, must arrive whole within
``header_timeout``, so that half-sent requests cannot hold the port.

gevent-websocket and gevent.pywsgi are not used: the library upgrades any
path before the application sees it, answers HTTP/1.0 with "402", drops the
code of its close frames and accepts unmasked client frames, and pywsgi has
no deadline for a request head.
"""
from __future__ import annotations

import base64
import binascii
import http
import logging
import socket
import ssl
from typing import Callable, Mapping

import gevent
import gevent.socket
import h11
import orjson
import pykka
from wsproto.utilities import generate_accept_token

from ..admission import AdmissionControl
from ..protocol.api import is_api_path
from ..protocol.errors import INVALID_REQUEST
from ..telemetry import Telemetry
from .api import ApiEndpoint
from .endpoint import READ_SIZE, OnDemandEndpoint, half_close, listener, read_to_end, shut_socket
from .outbound import OutboundQueue
from .websocket import SUBPROTOCOL, WebSocketReader, WebSocketSession

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 16384
MAX_IGNORED_BODY_BYTES = 65536  # a body sent with a GET is read and dropped, up to this
WEBSOCKET_PATH = "/ws"
WEBSOCKET_VERSION = b"13"

# An operator or page route: path -> (content type, function making the body, or (status, body)).
Route = tuple[str, Callable[[], bytes | tuple[int, bytes]]]


class _HeaderTimeout(Exception):
    """The request head (or the TLS handshake) did not arrive in time."""


class _Refusal(Exception):
    """An HTTP error answer to a request, with the headers it needs."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class HttpTransport(OnDemandEndpoint):
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
        header_timeout: float = 10.0,
        ping_interval: float = 25.0,
        ssl_context: ssl.SSLContext | None = None,
        routes: Mapping[str, Route] | None = None,
        request_log=None,
        telemetry: Telemetry | None = None,
        reuse_port: bool = False,
        admission: AdmissionControl | None = None,
        api: ApiEndpoint | None = None,
    ):
        super().__init__(new_device=new_device, max_outbound_bytes=max_outbound_bytes, telemetry=telemetry,
                         admission=admission, max_connections=max_connections)
        self._max_frame_bytes = max_frame_bytes
        self._read_timeout = read_timeout
        self._header_timeout = header_timeout
        self._ping_interval = ping_interval
        self._ssl_context = ssl_context
        self._request_log = request_log  # a ThrottledLog: malformed requests, one line per cause a minute
        self._routes = dict(routes or {})
        self._routes.setdefault("/healthz", ("application/json", lambda: b'{"status":"ok"}'))
        self._api = api  # the server API under /api/ (PROTOCOL.md 8); None: those paths are 404
        self._server = self._stream_server(listener(host, port, reuse_port=reuse_port))

    # -- one connection: requests until an upgrade or the end ---------------------------

    def _accept(self, raw: socket.socket, address) -> bool:
        """Requests until the connection ends, or until a WebSocket's reading is handed over (True)."""
        remote = f"{address[0]}:{address[1]}"
        sock = raw
        handed_over = False
        try:
            with gevent.Timeout(self._header_timeout, _HeaderTimeout):
                if self._ssl_context is not None:
                    sock = self._ssl_context.wrap_socket(raw, server_side=True)
                else:
                    # gevent closes the accepted socket when this handler returns; a WebSocket outlives it.
                    # (wrap_socket, too, takes the descriptor over.)
                    sock = gevent.socket.socket(fileno=raw.detach())
            handed_over = self._serve_requests(sock, remote)
        except _HeaderTimeout:
            log.debug("%s: TLS handshake not finished in time", remote)
        except (OSError, ValueError) as error:
            log.debug("%s: connection failed: %s", remote, error)
        finally:
            if not handed_over:
                sock.close()
                raw.close()
        return handed_over

    def _serve_requests(self, sock, remote: str) -> bool:
        """Answer requests until the connection ends (False) or is upgraded and handed over (True)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        api_session = None  # made at the connection's first API request
        while True:
            request = api_read = None
            try:
                with gevent.Timeout(self._header_timeout, _HeaderTimeout):
                    request = _next_event(conn, sock)
                    if not isinstance(request, h11.Request):
                        return False  # the client closed between requests
                    upgrade = self._check_upgrade(request)
                    if upgrade is None and self._api is not None and is_api_path(_path(request.target)):
                        api_session = api_session or self._api.session()
                        api_read = self._api.read(conn, sock, request, api_session)  # the body too, in time
                    elif upgrade is None:
                        self._skip_body(conn, sock)
            except _HeaderTimeout:
                self._refuse(conn, sock, remote, 408, "request not received in time", api_path=self._api_path(request))
                return False
            except h11.RemoteProtocolError as error:
                self._refuse(conn, sock, remote, error.error_status_hint, f"malformed request: {error}",
                             api_path=self._api_path(request))
                return False
            except _Refusal as refusal:
                self._refuse(conn, sock, remote, refusal.status, refusal.message, refusal.headers)
                return False
            if upgrade is not None:
                return self._serve_websocket(conn, sock, remote, upgrade)
            if api_read is not None:
                label, prepared, close = api_read
                self._api.write(conn, sock, request, label, self._api.answer(prepared, api_session), close)
                if close:
                    return False
            else:
                self._answer_route(conn, sock, request)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return False  # Connection: close, or HTTP/1.0
            conn.start_next_cycle()

    def _answer_route(self, conn: h11.Connection, sock, request: h11.Request) -> None:
        path = _path(request.target)
        if request.method not in (b"GET", b"HEAD"):
            status, content_type, body = 405, "text/plain", b"only GET and HEAD are served here\n"
            headers = [("Allow", "GET, HEAD")]
        elif path in self._routes:
            content_type, render = self._routes[path]
            try:
                rendered = render()
            except Exception as error:  # what the page reports on is failing (the store is down): say so
                if self._request_log is not None:
                    self._request_log.warning(f"route {path}: {type(error).__name__}", "%s cannot be rendered: %r",
                                              path, error)
                content_type, rendered = "text/plain", (503, f"{path} is unavailable: {error!r}\n".encode())
            status, body = rendered if isinstance(rendered, tuple) else (200, rendered)
            headers = [("Cache-Control", "no-cache")]
        else:
            status, content_type, body, headers = 404, "text/plain", b"not found\n", []
        headers += [("Content-Type", content_type), ("Content-Length", str(len(body))),
                    ("X-Content-Type-Options", "nosniff")]
        if status == 405:
            headers.append(("Connection", "close"))  # its body, if any, is not read
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if request.method != b"HEAD":
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        sock.sendall(data)

    def _skip_body(self, conn: h11.Connection, sock) -> None:
        """Read a request's body (a GET may have one) up to its end, or refuse a long one."""
        skipped = 0
        while True:
            event = _next_event(conn, sock)
            if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return  # PAUSED: an upgrade to something else, declined by answering normally
            if isinstance(event, h11.Data):
                skipped += len(event.data)
                if skipped > MAX_IGNORED_BODY_BYTES:
                    raise _Refusal(413, "request body too large")
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed in a request body", error_status_hint=400)

    def _refuse(self, conn: h11.Connection, sock, remote: str, status: int, message: str,
                headers: tuple[tuple[str, str], ...] = (), *, api_path: str | None = None) -> None:
        """An HTTP error answer, then the connection closes; one throttled log line, never a traceback.

        ``api_path``: the request was one of the server API's, whose errors are JSON (PROTOCOL.md 8).
        """
        if self._request_log is not None:
            self._request_log.warning(f"http {status}: {message}", "%s: %s (%d)", remote, message, status)
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # an answer was already under way: only closing is left
        content_type, body = "text/plain", (message + "\n").encode()
        if api_path is not None:
            content_type = "application/json"
            body = orjson.dumps({"error": {"code": INVALID_REQUEST, "message": message}})
            self._api.count(api_path, status)
        response = h11.Response(
            status_code=status,
            headers=[*headers, ("Content-Type", content_type), ("Content-Length", str(len(body))),
                     ("Connection", "close")],
        )
        try:
            sock.sendall(conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # h11 refuses to answer a request it could not parse as HTTP/1.x
            sock.sendall(f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()
                         + b"Content-Type: text/plain\r\nConnection: close\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        half_close(sock)

    def _api_path(self, request) -> str | None:
        """The path of a server API request; None for anything else."""
        if self._api is None or not isinstance(request, h11.Request):
            return None
        path = _path(request.target)
        return path if is_api_path(path) else None

    # -- the WebSocket upgrade -------------------------------------------------------

    def _check_upgrade(self, request: h11.Request) -> tuple[bytes, str] | None:
        """For a valid upgrade of /ws, its key and the subprotocol to select ("" for none); None if no upgrade asked.

        Raises _Refusal with the answer RFC 6455 4.2.2 asks for when the
        upgrade cannot be accepted.
        """
        headers = _Headers(request.headers)
        upgrade_asked = b"websocket" in headers.tokens(b"upgrade")
        path = _path(request.target)
        if path != WEBSOCKET_PATH:
            if upgrade_asked:
                raise _Refusal(404, f"no WebSocket endpoint at {path}: it is {WEBSOCKET_PATH}")
            return None
        if not upgrade_asked:
            if request.method in (b"GET", b"HEAD"):
                raise _Refusal(426, "a WebSocket upgrade is required on /ws",
                               (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))
            return None  # 405 like any other path
        if request.method != b"GET":
            raise _Refusal(405, "a WebSocket upgrade is a GET", (("Allow", "GET"),))
        if request.http_version < b"1.1":
            raise _Refusal(400, "a WebSocket upgrade needs HTTP/1.1")
        if b"upgrade" not in headers.tokens(b"connection"):
            raise _Refusal(400, "a WebSocket upgrade needs 'Connection: Upgrade'")
        versions = headers.get_all(b"sec-websocket-version")
        if not versions:
            raise _Refusal(400, "Sec-WebSocket-Version is missing")
        if versions != [WEBSOCKET_VERSION]:
            raise _Refusal(426, "unsupported WebSocket version: this server speaks 13",
                           (("Sec-WebSocket-Version", "13"),))
        keys = headers.get_all(b"sec-websocket-key")
        if len(keys) != 1 or not _is_websocket_key(keys[0]):
            raise _Refusal(400, "Sec-WebSocket-Key is missing or not 16 bytes in base64")
        if headers.get_all(b"transfer-encoding") or headers.get_all(b"content-length") not in ([], [b"0"]):
            raise _Refusal(400, "a WebSocket upgrade has no body")
        offered = headers.tokens(b"sec-websocket-protocol", lower=False)
        return keys[0], SUBPROTOCOL if SUBPROTOCOL.encode() in offered else ""

    def _serve_websocket(self, conn: h11.Connection, sock, remote: str, upgrade: tuple[bytes, str]) -> bool:
        """The 101 answer, then the connection's reading handed over; False if it ended here (turned away)."""
        key, subprotocol = upgrade
        headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                   (b"Sec-WebSocket-Accept", generate_accept_token(key))]
        if subprotocol:
            headers.append((b"Sec-WebSocket-Protocol", subprotocol.encode()))
        sock.sendall(conn.send(h11.InformationalResponse(status_code=101, headers=headers)))
        trailing = bytes(conn.trailing_data[0])
        sock.settimeout(min(self._ping_interval, self._read_timeout))  # the writer's, for each send
        session = WebSocketSession(sock)
        reader = None  # the OnDemandReader, once the reading is handed over
        outbound = OutboundQueue(
            write=session.write,
            shut=lambda: reader.shut() if reader is not None else shut_socket(sock),
            half_close=lambda: half_close(sock),
            closing_handshake=session.closing_handshake,
            spawn=self._writers.spawn,
            max_bytes=self._max_outbound_bytes,
            remote=remote,
        )

        def messages(forward) -> WebSocketReader:
            return WebSocketReader(session, forward, outbound, trailing_data=trailing,
                                   max_message_bytes=self._max_frame_bytes, ping_interval=self._ping_interval,
                                   idle_timeout=self._read_timeout)

        opened = self._open(outbound, lambda forward: read_to_end(messages(forward)))
        if opened is None:
            return False  # turned away, and closed
        device, forward = opened
        reader = self._read_on_demand(sock, messages(forward), outbound, device)
        return True


def _next_event(conn: h11.Connection, sock):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(sock.recv(READ_SIZE))


def _path(target: bytes) -> str:
    return target.split(b"?", 1)[0].decode("ascii", "replace")


def _is_websocket_key(value: bytes) -> bool:
    try:
        return len(base64.b64decode(value, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


class _Headers:
    """Header look-ups for the upgrade checks (h11 gives names lower-cased)."""

    def __init__(self, headers):
        self._headers = list(headers)

    def __contains__(self, name: bytes) -> bool:
        return any(key == name for key, _ in self._headers)

    def get_all(self, name: bytes) -> list[bytes]:
        return [value.strip() for key, value in self._headers if key == name]

    def tokens(self, name: bytes, *, lower: bool = True) -> set[bytes]:
        """The comma-separated tokens of every header of that name."""
        tokens = set()
        for value in self.get_all(name):
            for token in value.split(b","):
                token = token.strip()
                if token:
                    tokens.add(token.lower() if lower else token)
        return tokens
