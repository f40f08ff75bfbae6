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
from .endpoint import GATHER_BYTES, READ_SIZE, Forward, read_ready
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


class WebSocketReader:
    """One connection's messages, read a wake-up at a time (endpoint.py's InputReader).

    A protocol violation (wsproto's, a binary message, a message over the
    limit) gets the answers to the messages before it, then the close code.
    Once the server is closing, input is still read, for the peer's close
    frame, and dropped beyond MAX_DRAINED_BYTES (see OutboundQueue).
    """

    __slots__ = ("_session", "_forward", "_outbound", "_trailing", "_max_message_bytes", "_ping_interval",
                 "_idle_timeout", "_parts", "_size", "_last_input", "_pinged", "_reason", "_violated",
                 "_gathered", "_gathered_bytes")

    def __init__(self, session: WebSocketSession, forward: Forward, outbound: OutboundQueue, *,
                 trailing_data: bytes, max_message_bytes: int, ping_interval: float, idle_timeout: float):
        self._session = session
        self._forward = forward
        self._outbound = outbound
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
        self._gathered: list[str] = []  # whole messages, until flush()
        self._gathered_bytes = 0

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
        """What is there without waiting (endpoint.read_ready), handled: False if nothing was."""
        if self._trailing:
            data, self._trailing = self._trailing, b""
            ended = self._received(data)
            if ended is not None:
                return ended
        data, ended = read_ready(self._session.sock)
        if data:
            outcome = self._received(data)
            if outcome is not None or ended is None:
                return outcome
        elif ended is None:
            return False
        if isinstance(ended, Exception):
            return self._reason if self._outbound.closing or self._violated else f"read failed: {ended}"
        return self._reason if self._outbound.closing or self._violated else "closed by peer without a close frame"

    def read_once(self) -> str | None:
        """One read, waiting up to next_timeout(), and what it brought, handed on."""
        sock = self._session.sock
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
                return self._reason if self._outbound.closing or self._violated else f"read failed: {error}"
            if not data:
                return (self._reason if self._outbound.closing or self._violated
                        else "closed by peer without a close frame")
        ended = self._received(data)
        self.flush()
        return ended

    def flush(self) -> None:
        """Hand the messages gathered since the last flush to the device actor (may wait for it)."""
        if self._gathered:
            self._forward(self._take_gathered())

    def _take_gathered(self) -> tuple:
        gathered = tuple(self._gathered)
        self._gathered.clear()
        self._gathered_bytes = 0
        return gathered

    def _received(self, data: bytes) -> str | None:
        """Bytes from the peer, handled: why the input ended, or None while it goes on."""
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
                    self._gathered.append(parts[0] if len(parts) == 1 else "".join(parts))
                    self._gathered_bytes += self._size
                    self._parts, self._size = [], 0
                    if self._gathered_bytes >= GATHER_BYTES:
                        self.flush()
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
