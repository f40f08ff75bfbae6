"""The admin endpoint: a Unix socket in the data directory, for the console (never a TCP port).

It speaks the TLS endpoint's framing and JSON-RPC, without TLS: the socket
file is mode 0600 in the private data directory, and the peer's credentials
(SO_PEERCRED) must name the server's own Unix user (or root), so that no
other account on the machine can inspect or steer the server even if the
file's mode were loosened.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Callable

import pykka
from gevent.pool import Pool
from gevent.server import StreamServer

from ..protocol import encode_frames
from ..telemetry import Telemetry
from ..unix_socket import usable_path
from .endpoint import Endpoint, half_close, shut_socket
from .outbound import OutboundQueue
from .tls import read_frames

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600
MAX_ADMIN_CONNECTIONS = 16
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AdminTransport(Endpoint):
    name = "admin endpoint"
    transport = "admin"

    def __init__(
        self,
        *,
        path: Path,
        new_device: Callable[[OutboundQueue], pykka.ActorRef],
        max_frame_bytes: int,
        max_outbound_bytes: int,
        telemetry: Telemetry | None = None,
    ):
        super().__init__(new_device=new_device, max_outbound_bytes=max_outbound_bytes, telemetry=telemetry)
        self.path = Path(path)
        self._max_frame_bytes = max_frame_bytes
        self._listener: socket.socket | None = None

    @property
    def address(self) -> str:  # type: ignore[override]
        return str(self.path)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a server that was killed
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The mode is set before bind through the umask, so the socket is never open to others.
        old_umask = os.umask(0o177)
        try:
            with usable_path(self.path) as address:
                listener.bind(address)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)
        listener.listen(MAX_ADMIN_CONNECTIONS)
        self._listener = listener
        self._server = StreamServer(listener, self._handle, spawn=Pool(MAX_ADMIN_CONNECTIONS))
        self._server.start()
        log.info("%s listening on %s", self.name, self.path)

    def stop(self, timeout: float) -> None:
        if self._listener is None:
            return
        super().stop(timeout)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _handle(self, conn: socket.socket, address) -> None:
        pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in (os.geteuid(), 0):
            log.warning("admin connection refused: process %d of uid %d is not the server's user", pid, uid)
            conn.close()
            return
        outbound = OutboundQueue(
            write=lambda bodies: conn.sendall(encode_frames(bodies)),
            shut=lambda: shut_socket(conn),
            half_close=lambda: half_close(conn),
            spawn=self._writers.spawn,
            max_bytes=self._max_outbound_bytes,
            remote=f"admin pid {pid}",
        )
        try:
            self._serve(outbound, lambda forward: read_frames(conn, forward, outbound, self._max_frame_bytes))
        finally:
            conn.close()

