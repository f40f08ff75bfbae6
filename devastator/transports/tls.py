"""The TLS endpoint: 4-byte little-endian length frames of JSON (PROTOCOL.md 2).

One greenlet per connection reads, lets the sans-IO FrameDecoder cut frames,
and tells the connection's device actor; a second one writes (OutboundQueue).
A framing violation gets one JSON-RPC error and the connection closes. The
TLS handshake and, once its first byte arrived, each frame must arrive whole
within their deadlines, so that clients sending half a header or half a body
cannot hold connections (and the pool's places) for the idle timeout.
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Callable

import gevent
import pykka
from gevent.pool import Pool
from gevent.server import StreamServer

from ..pki import client_identity
from ..protocol import FrameDecoder, encode_frames
from ..protocol.errors import InvalidRequest, RpcError
from ..admission import AdmissionControl
from ..telemetry import Telemetry
from ..actors.messages import ProtocolViolation
from .endpoint import Endpoint, Forward, half_close, listener, shut_socket
from .outbound import OutboundQueue

log = logging.getLogger(__name__)

READ_SIZE = 65536
CLOSE_IDLE = 4003
CLOSE_FRAMING = 1002  # told to the device actor; on TLS the code is not sent


class _HandshakeTimeout(Exception):
    """The TLS handshake did not finish in time."""


class TlsTransport(Endpoint):
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
                         admission=admission)
        self._ssl_context = ssl_context
        self._max_frame_bytes = max_frame_bytes
        self._read_timeout = read_timeout
        self._frame_timeout = frame_timeout
        self._handshake_timeout = handshake_timeout
        self._auth_log = auth_log  # a ThrottledLog: refused client certificates
        self._server = StreamServer(
            listener(host, port, reuse_port=reuse_port), self._handle, spawn=Pool(max_connections)
        )

    def _handle(self, raw: socket.socket, address) -> None:
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
            return
        except (OSError, ValueError, _HandshakeTimeout) as error:
            log.debug("%s: TLS handshake failed: %s", remote, str(error) or "not finished in time")
            raw.close()
            return
        conn.settimeout(self._read_timeout)
        outbound = OutboundQueue(
            write=lambda bodies: conn.sendall(encode_frames(bodies)),
            shut=lambda: shut_socket(conn),
            half_close=lambda: half_close(conn),
            spawn=self._spawn_writer,
            max_bytes=self._max_outbound_bytes,
            remote=remote,
            peer_identity=client_identity(conn.getpeercert(binary_form=True)),
        )
        try:
            self._serve(outbound, lambda forward: read_frames(
                conn, forward, outbound, self._max_frame_bytes, frame_timeout=self._frame_timeout))
        finally:
            conn.close()


def read_frames(
    conn, forward: Forward, outbound: OutboundQueue, max_frame_bytes: int, *, frame_timeout: float | None = None
) -> str:
    """Read length-prefixed frames until the connection ends; say why it ended.

    A framing violation gets one JSON-RPC error, after the answers to the
    frames before it, then the connection closes. So does a frame that is
    not whole ``frame_timeout`` seconds after its first byte arrived (-32600).
    A connection silent for its read timeout (the socket's) is closed with
    ``conn.close`` 4003. Once the server is closing, input is read and
    dropped until the peer closes its side (see OutboundQueue).
    """
    decoder = FrameDecoder(max_frame_bytes)
    idle_timeout = conn.gettimeout()
    frame_deadline: float | None = None  # while a frame is partly read
    reason = "closed by server"
    violated = False  # then input is dropped until the device actor has closed
    while True:
        try:
            if frame_deadline is not None:
                left = frame_deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                conn.settimeout(left if idle_timeout is None else min(left, idle_timeout))
            data = conn.recv(READ_SIZE)
        except TimeoutError:
            if outbound.closing:
                return reason
            if frame_deadline is not None and time.monotonic() >= frame_deadline:
                frame_deadline = None
                conn.settimeout(idle_timeout)
                error = InvalidRequest(f"frame not complete within {frame_timeout:g} s")
                forward((), ProtocolViolation(CLOSE_FRAMING, error.message, error))
                violated, reason = True, f"framing violation: {error.message}"
                continue
            outbound.close(CLOSE_IDLE, "idle timeout")
            reason = "idle timeout"
            continue
        except (OSError, ValueError) as error:  # ValueError: ssl, once the socket was shut under us
            return reason if outbound.closing else f"read failed: {error}"
        if not data:
            return reason if outbound.closing else "closed by peer"
        if outbound.closing:
            if not outbound.drop_input(len(data)):
                return reason
            continue
        if violated:
            continue
        try:
            bodies = decoder.feed(data)
        except RpcError as error:
            forward((), ProtocolViolation(CLOSE_FRAMING, error.message, error))
            violated, reason = True, f"framing violation: {error.message}"
            continue
        if bodies:
            forward(tuple(bodies))  # may wait for the device actor: that time is not the client's
        if frame_timeout is not None:
            if not decoder.buffered_bytes:
                if frame_deadline is not None:
                    frame_deadline = None
                    conn.settimeout(idle_timeout)
            elif frame_deadline is None or bodies:  # a frame began in this read
                frame_deadline = time.monotonic() + frame_timeout
