"""One upgraded WebSocket connection (RFC 6455), on wsproto's sans-IO frame protocol.

wsproto parses and checks every frame (masking, reserved bits and opcodes,
control frames, continuations, UTF-8, close codes); this module reads the
socket, joins a text message's frames under the size limit, hands whole
messages to the device actor and writes everything through the connection's
OutboundQueue, so that one greenlet alone writes to the socket.

The server pings a connection that has been quiet for ``ping_interval`` and
closes it (4003) after ``idle_timeout`` without any input; a pong counts as
input.
"""
from __future__ import annotations

import struct
import time
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from ..actors.messages import ProtocolViolation
from ..protocol.errors import TooLarge
from .endpoint import Forward
from .outbound import OutboundQueue
from ..protocol.close_codes import CLOSE_IDLE, CLOSE_TOO_LARGE, CLOSE_UNSUPPORTED_DATA

READ_SIZE = 65536
SUBPROTOCOL = "devastator.v1"

_MAX_CLOSE_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes, 2 of them the code


class ControlFrame(bytes):
    """A frame already encoded (ping, pong, close) among the JSON values of an OutboundQueue."""

    __slots__ = ()


def text_frames(bodies: list[bytes]) -> bytes:
    """JSON values as unmasked, unfragmented text frames (a server's frames), control frames as they are."""
    out = []
    for body in bodies:
        if type(body) is ControlFrame:
            out.append(body)
            continue
        size = len(body)
        if size < 126:
            out.append(bytes((0x81, size)))
        elif size < 65536:
            out.append(struct.pack("!BBH", 0x81, 126, size))
        else:
            out.append(struct.pack("!BBQ", 0x81, 127, size))
        out.append(body)
    return b"".join(out)


class WebSocketSession:
    """The frame side of one connection after the 101 answer: reading, pings, closing."""

    def __init__(self, sock, *, trailing_data: bytes, max_message_bytes: int, ping_interval: float,
                 idle_timeout: float):
        self._sock = sock
        self._ws = Connection(ConnectionType.SERVER)
        self._trailing = trailing_data
        self._max_message_bytes = max_message_bytes
        self._ping_interval = ping_interval
        self._idle_timeout = idle_timeout

    def write(self, bodies: list[bytes]) -> None:
        self._sock.sendall(text_frames(bodies))

    def closing_handshake(self, code: int | None, reason: str) -> None:
        """Our close frame (the writer calls this once, after the queued frames)."""
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._sock.sendall(self._ws.send(CloseConnection(code or CloseReason.NORMAL_CLOSURE,
                                                             _close_reason(reason))))

    def read(self, forward: Forward, outbound: OutboundQueue) -> str:
        """Read messages until the connection ends; say why it ended."""
        sock, ws = self._sock, self._ws
        sock.settimeout(min(self._ping_interval, self._idle_timeout))
        parts: list[str] = []
        size = 0
        last_input = time.monotonic()
        pinged = False
        reason = "closed by server"
        violated = False  # then messages are dropped until the device actor has closed
        data = self._trailing
        while True:
            if data:
                if ws.state is ConnectionState.CLOSED:
                    return reason  # the writer ended the closing handshake meanwhile: nothing is left to read
                ws.receive_data(data)
                messages = []
                violation = None
                for event in ws.events():
                    if isinstance(event, TextMessage):
                        if violated or outbound.closing:
                            continue
                        parts.append(event.data)
                        size += len(event.data) if event.data.isascii() else len(event.data.encode())
                        if size > self._max_message_bytes:
                            error = TooLarge(f"message over {self._max_message_bytes} bytes")
                            violation = ProtocolViolation(CLOSE_TOO_LARGE, "message too large", error)
                        elif event.message_finished:
                            messages.append(parts[0] if len(parts) == 1 else "".join(parts))
                            parts, size = [], 0
                    elif isinstance(event, BytesMessage):
                        if not (violated or outbound.closing):
                            violation = ProtocolViolation(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted")
                    elif isinstance(event, Ping):
                        if ws.state is ConnectionState.OPEN and not outbound.closing:
                            outbound.send([ControlFrame(ws.send(event.response()))])
                    elif isinstance(event, CloseConnection):
                        if ws.state is ConnectionState.REMOTE_CLOSING:  # the peer closes: echo its code
                            if not outbound.closing:
                                reason = "closed by peer"
                            outbound.close(event.code, notify=False)
                        elif ws.state is ConnectionState.OPEN and not violated:  # wsproto found a violation
                            violation = ProtocolViolation(event.code, event.reason or "protocol error")
                        # CLOSED: the peer answered our close.
                    if violation is not None:
                        forward(tuple(messages), violation)
                        messages, violated = [], True
                        reason = f"protocol violation: {violation.reason}"
                        violation = None
                if messages:
                    forward(tuple(messages))
                if ws.state is ConnectionState.CLOSED:
                    return reason
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                data = b""
                if outbound.closing:
                    return reason
                if time.monotonic() - last_input >= self._idle_timeout:
                    outbound.close(CLOSE_IDLE, "idle timeout")
                    reason = "idle timeout"
                elif not pinged and ws.state is ConnectionState.OPEN:
                    outbound.send([ControlFrame(ws.send(Ping(b"")))])
                    pinged = True
                continue
            except (OSError, ValueError) as error:  # ValueError: ssl, once the socket was shut under us
                return reason if outbound.closing or violated else f"read failed: {error}"
            if not data:
                return reason if outbound.closing or violated else "closed by peer without a close frame"
            if outbound.closing and not outbound.drop_input(len(data)):
                return reason
            last_input = time.monotonic()
            pinged = False


def _close_reason(reason: str) -> str:
    encoded = reason.encode()[:_MAX_CLOSE_REASON_BYTES]
    return encoded.decode(errors="ignore")
