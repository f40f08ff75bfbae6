"""The TLS endpoint: 4-byte little-endian length frames of JSON (PROTOCOL.md 2).

One greenlet per connection reads, lets the sans-IO FrameDecoder cut frames,
and tells the connection's device actor; a second one writes (OutboundQueue).
A framing violation gets one JSON-RPC error and the connection closes.
"""
from __future__ import annotations

import logging
import socket
import ssl
from typing import Callable

import pykka
from gevent.pool import Pool
from gevent.server import StreamServer

from ..pki import client_identity
from ..protocol import ErrorResponse, FrameDecoder, encode, encode_frames
from ..protocol.errors import RpcError
from ..telemetry import Telemetry
from .endpoint import Endpoint, listener
from .outbound import OutboundQueue

log = logging.getLogger(__name__)

READ_SIZE = 65536


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
        handshake_timeout: float = 10.0,
        telemetry: Telemetry | None = None,
        reuse_port: bool = False,
    ):
        super().__init__(new_device=new_device, max_outbound_bytes=max_outbound_bytes, telemetry=telemetry)
        self._ssl_context = ssl_context
        self._max_frame_bytes = max_frame_bytes
        self._read_timeout = read_timeout
        self._handshake_timeout = handshake_timeout
        self._auth_log = auth_log  # a ThrottledLog: refused client certificates
        self._server = StreamServer(
            listener(host, port, reuse_port=reuse_port), self._handle, spawn=Pool(max_connections)
        )

    def _handle(self, raw: socket.socket, address) -> None:
        remote = f"{address[0]}:{address[1]}"
        raw.settimeout(self._handshake_timeout)
        try:
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
        except (OSError, ValueError) as error:
            log.debug("%s: TLS handshake failed: %s", remote, error)
            raw.close()
            return
        conn.settimeout(self._read_timeout)
        outbound = OutboundQueue(
            write=lambda bodies: conn.sendall(encode_frames(bodies)),
            shut=lambda: shut_socket(conn),
            spawn=self._spawn_writer,
            max_bytes=self._max_outbound_bytes,
            remote=remote,
            peer_identity=client_identity(conn.getpeercert(binary_form=True)),
        )
        try:
            self._serve(outbound, lambda forward: read_frames(conn, forward, outbound, self._max_frame_bytes))
        finally:
            conn.close()


def read_frames(conn, forward: Callable[[tuple], None], outbound: OutboundQueue, max_frame_bytes: int) -> str:
    """Read length-prefixed frames until the connection ends; say why it ended.

    A framing violation gets one JSON-RPC error before the connection closes.
    """
    decoder = FrameDecoder(max_frame_bytes)
    while not outbound.closing:
        try:
            data = conn.recv(READ_SIZE)
        except TimeoutError:
            return "read timeout"
        except OSError as error:
            return f"read failed: {error}"
        if not data:
            return "closed by peer"
        try:
            bodies = decoder.feed(data)
        except RpcError as violation:
            outbound.send([encode(ErrorResponse.from_error(violation))])
            return f"framing violation: {violation.message}"
        if bodies:
            forward(tuple(bodies))
    return "closed by server"


def shut_socket(conn) -> None:
    # Closing the socket wakes the reader greenlet blocked on it.
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
