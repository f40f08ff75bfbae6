"""One upgraded WebSocket connection (RFC 6455), on wsproto's sans-IO frame protocol.

wsproto parses and checks every frame (masking, reserved bits and opcodes,
control frames, continuations, UTF-8, close codes); WebSocketReader reads
what each wake-up finds (the connection is read on demand, as on TLS:
endpoint.py's OnDemandReader), joins a text message's frames under the size
limit and hands whole messages to the device actor; everything is written
through the connection's OutboundQueue, so that one greenlet alone writes to
the socket.

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
from .endpoint import READ_SIZE, Forward, InputReader
from .outbound import OutboundQueue
from ..protocol.close_codes import CLOSE_IDLE, CLOSE_TOO_LARGE, CLOSE_UNSUPPORTED_DATA

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
    """The frame side of one connection after the 101 answer: what the writer sends, and wsproto's state."""

    __slots__ = ("sock", "ws")

    def __init__(self, sock):
        self.sock = sock
        self.ws = Connection(ConnectionType.SERVER)

    def write(self, bodies: list[bytes]) -> None:
        self.sock.sendall(text_frames(bodies))

    def closing_handshake(self, code: int | None, reason: str) -> None:
        """Our close frame (the writer calls this once, after the queued frames)."""
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self.sock.sendall(self.ws.send(CloseConnection(code or CloseReason.NORMAL_CLOSURE,
                                                           _close_reason(reason))))


class WebSocketReader(InputReader):
    """One connection's messages, read a wake-up at a time (see endpoint.py's InputReader).

    A protocol violation (wsproto's, a binary message, a message over the
    limit) gets the answers to the messages before it, then the close code.
    Once the server is closing, input is still read, for the peer's close
    frame, and dropped beyond MAX_DRAINED_BYTES (see OutboundQueue).
    """

    __slots__ = ("_session", "_trailing", "_max_message_bytes", "_ping_interval", "_idle_timeout", "_parts",
                 "_size", "_last_input", "_pinged", "_reason", "_violated")

    def __init__(self, session: WebSocketSession, forward: Forward, outbound: OutboundQueue, *,
                 trailing_data: bytes, max_message_bytes: int, ping_interval: float, idle_timeout: float):
        super().__init__(session.sock, forward, outbound)
        self._session = session
        self._trailing = trailing_data  # what came after the upgrade request: the first read's
        self._max_message_bytes = max_message_bytes
        self._ping_interval = ping_interval
        self._idle_timeout = idle_timeout
        self._parts: list[str] = []  # of the text message being received
        self._size = 0  # its bytes so far
        self._last_input = time.monotonic()
        self._pinged = False  # since the last input
        self._reason = "closed by server"
        self._violated = False  # then messages are dropped until the device actor has closed

    def next_timeout(self) -> float:
        """Until the ping is due (once quiet for ping_interval), or the idle close."""
        if self._outbound.closing:
            return min(self._ping_interval, self._idle_timeout)  # then the end, if the peer has not closed
        due = self._last_input + self._idle_timeout
        if not self._pinged:
            due = min(due, self._last_input + self._ping_interval)
        return max(0.0, due - time.monotonic())

    def timed_out(self) -> str | None:
        """Nothing came within next_timeout(): ping, or close an idle connection."""
        outbound = self._outbound
        if outbound.closing:
            return self._reason
        quiet = time.monotonic() - self._last_input
        ws = self._session.ws
        if quiet >= self._idle_timeout:
            outbound.close(CLOSE_IDLE, "idle timeout")
            self._reason = "idle timeout"
        elif quiet >= self._ping_interval and not self._pinged:
            if ws.state is ConnectionState.OPEN:
                outbound.send([ControlFrame(ws.send(Ping(b"")))])
            self._pinged = True  # so the next wait is for the idle close
        return None  # else the timer fired a hair early: wait on

    def read_available(self) -> str | None | bool:
        if self._trailing:  # what came with the upgrade request, first
            data, self._trailing = self._trailing, b""
            ended = self._received(data)
            if ended is not None:
                return ended
        return super().read_available()

    def read_once(self) -> str | None:
        sock = self._conn
        if self._trailing:
            data, self._trailing = self._trailing, b""
        else:
            timeout = self.next_timeout()
            if not timeout:
                return self.timed_out()
            try:
                sock.settimeout(timeout)
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                return self.timed_out()
            except (OSError, ValueError) as error:  # ValueError: ssl, once the socket was shut under us
                return self._input_ended(error)
            if not data:
                return self._input_ended(data)
        ended = self._received(data)
        self.flush()
        return ended

    def _input_ended(self, ended: bytes | Exception) -> str:
        if self._outbound.closing or self._violated:
            return self._reason
        return f"read failed: {ended}" if isinstance(ended, Exception) else "closed by peer without a close frame"

    def _received(self, data: bytes) -> str | None:
        outbound, ws = self._outbound, self._session.ws
        if outbound.closing and not outbound.drop_input(len(data)):
            return self._reason
        self._last_input = time.monotonic()
        self._pinged = False
        if ws.state is ConnectionState.CLOSED:
            return self._reason  # the writer ended the closing handshake meanwhile: nothing is left to read
        ws.receive_data(data)
        for event in ws.events():
            violation = None
            if isinstance(event, TextMessage):
                if self._violated or outbound.closing:
                    continue
                self._parts.append(event.data)
                self._size += len(event.data) if event.data.isascii() else len(event.data.encode())
                if self._size > self._max_message_bytes:
                    error = TooLarge(f"message over {self._max_message_bytes} bytes")
                    violation = ProtocolViolation(CLOSE_TOO_LARGE, "message too large", error)
                elif event.message_finished:
                    parts = self._parts
                    self._gather([parts[0] if len(parts) == 1 else "".join(parts)], self._size)
                    self._parts, self._size = [], 0
            elif isinstance(event, BytesMessage):
                if not (self._violated or outbound.closing):
                    violation = ProtocolViolation(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted")
            elif isinstance(event, Ping):
                if ws.state is ConnectionState.OPEN and not outbound.closing:
                    outbound.send([ControlFrame(ws.send(event.response()))])
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:  # the peer closes: echo its code
                    if not outbound.closing:
                        self._reason = "closed by peer"
                    outbound.close(event.code, notify=False)
                elif ws.state is ConnectionState.OPEN and not self._violated:  # wsproto found a violation
                    violation = ProtocolViolation(event.code, event.reason or "protocol error")
                # CLOSED: the peer answered our close.
            if violation is not None:
                self._forward(self._take_gathered(), violation)
                self._violated = True
                self._reason = f"protocol violation: {violation.reason}"
        if ws.state is ConnectionState.CLOSED:
            return self._reason
        return None


def _close_reason(reason: str) -> str:
    encoded = reason.encode()[:_MAX_CLOSE_REASON_BYTES]
    return encoded.decode(errors="ignore")
