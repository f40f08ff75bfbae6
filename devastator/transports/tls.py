"""The TLS endpoint: 4-byte little-endian length frames of JSON (PROTOCOL.md 2).

After the handshake a connection is read on demand (endpoint.py's
OnDemandReader): FrameReader, the sans-IO FrameDecoder's reader, cuts what
each wake-up finds into frames and the connection's device actor is told
them. Writing is the OutboundQueue's (its writer also runs only while there
is output). A framing violation gets one JSON-RPC error and the connection
closes. The TLS handshake and, once its first byte arrived, each frame must
arrive whole within their deadlines, so that clients sending half a header
or half a body cannot hold connections (and the server's
``max_connections`` places) for the idle timeout.
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Callable

import gevent
import pykka

from ..pki import client_identity
from ..protocol import FrameDecoder, encode_frames
from ..protocol.errors import InvalidRequest, RpcError
from ..admission import AdmissionControl
from ..telemetry import Telemetry
from ..actors.messages import ProtocolViolation
from ..protocol.close_codes import CLOSE_IDLE, CLOSE_PROTOCOL_ERROR  # on TLS the code is told, not sent
from .endpoint import (
    READ_SIZE, Forward, InputReader, OnDemandEndpoint, half_close, listener, read_to_end, shut_socket,
)
from .outbound import OutboundQueue

log = logging.getLogger(__name__)


class _HandshakeTimeout(Exception):
    """The TLS handshake did not finish in time."""


class TlsTransport(OnDemandEndpoint):
    name = "TLS endpoint"
    transport = "tls"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        new_device: Callable[[OutboundQueue], pykka.ActorRef],
        max_connections: int,
        max_frame_bytes: int,
        max_outbound_bytes: int,
        read_timeout: float,
        auth_log,
        frame_timeout: float | None = None,
        handshake_timeout: float = 10.0,
        telemetry: Telemetry | None = None,
        reuse_port: bool = False,
        admission: AdmissionControl | None = None,
    ):
        super().__init__(new_device=new_device, max_outbound_bytes=max_outbound_bytes, telemetry=telemetry,
                         admission=admission, max_connections=max_connections)
        self._ssl_context = ssl_context
        self._max_frame_bytes = max_frame_bytes
        self._read_timeout = read_timeout
        self._frame_timeout = frame_timeout
        self._handshake_timeout = handshake_timeout
        self._auth_log = auth_log  # a ThrottledLog: refused client certificates
        self._server = self._stream_server(listener(host, port, reuse_port=reuse_port))

    def _accept(self, raw: socket.socket, address) -> bool:
        """The handshake, then the connection's reading handed over; False if it ended here."""
        remote = f"{address[0]}:{address[1]}"
        try:
            # A deadline for the whole handshake: a timeout per read would let a client
            # that sends a byte now and then hold the connection for as long as it likes.
            with gevent.Timeout(self._handshake_timeout, _HandshakeTimeout):
                conn = self._ssl_context.wrap_socket(raw, server_side=True)
        except ssl.SSLCertVerificationError as error:
            # A client certificate that does not chain to our CA: an authentication failure.
            reason = error.verify_message or error.reason or "verification failed"
            self._telemetry.auth_failures += 1
            self._auth_log.warning(
                f"client certificate: {reason}", "client certificate refused for %s: %s", remote, reason
            )
            raw.close()
            return False
        except (OSError, ValueError, _HandshakeTimeout) as error:
            log.debug("%s: TLS handshake failed: %s", remote, str(error) or "not finished in time")
            raw.close()
            return False
        conn.settimeout(self._read_timeout)
        reader = None  # the OnDemandReader, once the reading is handed over
        outbound = OutboundQueue(
            write=lambda bodies: conn.sendall(encode_frames(bodies)),
            shut=lambda: reader.shut() if reader is not None else shut_socket(conn),
            half_close=lambda: half_close(conn),
            spawn=self._writers.spawn,
            max_bytes=self._max_outbound_bytes,
            remote=remote,
            peer_identity=client_identity(conn.getpeercert(binary_form=True)),
        )
        try:
            opened = self._open(outbound, lambda forward: read_frames(
                conn, forward, outbound, self._max_frame_bytes, frame_timeout=self._frame_timeout))
            if opened is None:
                return False  # turned away, and closed
            device, forward = opened
            frames = FrameReader(conn, forward, outbound, self._max_frame_bytes, frame_timeout=self._frame_timeout,
                                 gather=True)
            reader = self._read_on_demand(conn, frames, outbound, device)
            return True
        finally:
            if reader is None:
                conn.close()


def read_frames(
    conn, forward: Forward, outbound: OutboundQueue, max_frame_bytes: int, *, frame_timeout: float | None = None
) -> str:
    """Read length-prefixed frames until the connection ends; say why it ended (see FrameReader)."""
    return read_to_end(FrameReader(conn, forward, outbound, max_frame_bytes, frame_timeout=frame_timeout))


class FrameReader(InputReader):
    """One connection's frames, read a wake-up at a time (see endpoint.py's InputReader).

    A framing violation gets one JSON-RPC error, after the answers to the
    frames before it, then the connection closes. So does a frame that is
    not whole ``frame_timeout`` seconds after its first byte arrived (-32600).
    A connection silent for its read timeout (the socket's) is closed with
    ``conn.close`` 4003. Once the server is closing, input is read and
    dropped until the peer closes its side (see OutboundQueue).
    """

    __slots__ = ("_frame_timeout", "_decoder", "_idle_timeout", "_frame_deadline", "_waited_for_frame", "_reason",
                 "_violated", "_gathering")

    def __init__(
        self, conn, forward: Forward, outbound: OutboundQueue, max_frame_bytes: int, *,
        frame_timeout: float | None = None, gather: bool = False,
    ):
        super().__init__(conn, forward, outbound)
        # gather: frames wait until flush() (see InputReader); else each read's are handed on at once.
        self._gathering = gather
        self._frame_timeout = frame_timeout
        self._decoder = FrameDecoder(max_frame_bytes)
        self._idle_timeout = conn.gettimeout()
        self._frame_deadline: float | None = None  # while a frame is partly read
        self._waited_for_frame = False  # the last next_timeout() was what is left of the frame's deadline
        self._reason = "closed by server"
        self._violated = False  # then input is dropped until the device actor has closed

    def next_timeout(self) -> float | None:
        """How long the next read may wait: the idle timeout, or what is left of a frame's deadline."""
        if self._frame_deadline is None:
            self._waited_for_frame = False
            return self._idle_timeout
        left = max(0.0, self._frame_deadline - time.monotonic())
        self._waited_for_frame = self._idle_timeout is None or left < self._idle_timeout
        return left if self._waited_for_frame else self._idle_timeout

    def read_once(self) -> str | None:
        """One read and what it brought; why the connection ended, or None while it goes on."""
        conn = self._conn
        try:
            if self._frame_deadline is not None:
                left = self.next_timeout()
                if not left:
                    raise TimeoutError
                conn.settimeout(left)
            data = conn.recv(READ_SIZE)
        except TimeoutError:
            return self.timed_out()
        except (OSError, ValueError) as error:  # ValueError: ssl, once the socket was shut under us
            return self._input_ended(error)
        return self._received(data)

    def _input_ended(self, ended: bytes | Exception) -> str | None:
        if isinstance(ended, Exception):
            return self._reason if self._outbound.closing else f"read failed: {ended}"
        return self._received(b"")

    def timed_out(self) -> str | None:
        """Nothing came within next_timeout()."""
        outbound = self._outbound
        if outbound.closing:
            return self._reason
        if self._frame_deadline is not None:
            if time.monotonic() >= self._frame_deadline:
                self._frame_deadline = None
                self._conn.settimeout(self._idle_timeout)
                error = InvalidRequest(f"frame not complete within {self._frame_timeout:g} s")
                self._forward(self._take_gathered(), ProtocolViolation(CLOSE_PROTOCOL_ERROR, error.message, error))
                self._violated, self._reason = True, f"framing violation: {error.message}"
                return None
            if self._waited_for_frame:
                return None  # the frame's timer fired a hair early: wait on
        outbound.close(CLOSE_IDLE, "idle timeout")
        self._reason = "idle timeout"
        return None

    def _received(self, data: bytes) -> str | None:
        outbound = self._outbound
        if not data:
            return self._reason if outbound.closing else "closed by peer"
        if outbound.closing:
            if not outbound.drop_input(len(data)):
                return self._reason
            return None
        if self._violated:
            return None
        try:
            bodies = self._decoder.feed(data)
        except RpcError as error:
            self._forward(self._take_gathered(), ProtocolViolation(CLOSE_PROTOCOL_ERROR, error.message, error))
            self._violated, self._reason = True, f"framing violation: {error.message}"
            return None
        if bodies:
            if self._gathering:
                self._gather(bodies, sum(map(len, bodies)))
            else:
                self._forward(tuple(bodies))  # may wait for the device actor: that time is not the client's
        if self._frame_timeout is not None:
            if not self._decoder.buffered_bytes:
                if self._frame_deadline is not None:
                    self._frame_deadline = None
                    self._conn.settimeout(self._idle_timeout)
            elif self._frame_deadline is None or bodies:  # a frame began in this read
                self._frame_deadline = time.monotonic() + self._frame_timeout
        return None
