"""What both endpoints share: their listener, live connections and writer greenlets.

A connection's life is the same on either endpoint: a bounded outbound queue
(its writer runs in the endpoint's ``Runners``), a device actor, a reader
(a loop in the connection's greenlet, or on TLS reads on demand: tls.py); when
the input ends the device actor is told why, and what was queued is written
before the socket shuts.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Callable

import gevent
import gevent.socket
import pykka
from gevent.baseserver import BaseServer
from gevent.lock import Semaphore

from ..actors.messages import ConnectionLost, ProtocolViolation, Received, tell_if_alive
from ..admission import AdmissionControl
from ..telemetry import Telemetry
from .outbound import OutboundQueue
from ..runners import Runners
from ..protocol.close_codes import CLOSE_GOING_AWAY, CLOSE_OVERLOADED

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024

WRITER_DRAIN_SECONDS = 10.0
READS_IN_FLIGHT = 4  # reads told to a device actor and not yet picked up
CREDIT_WAIT_SECONDS = 1.0


Forward = Callable[..., None]  # forward(bodies: tuple, violation: ProtocolViolation | None = None)


class Endpoint:
    name = "endpoint"
    transport = "?"  # the label of its connections in telemetry

    def __init__(
        self,
        *,
        new_device: Callable[[OutboundQueue], pykka.ActorRef],
        max_outbound_bytes: int,
        telemetry: Telemetry | None = None,
        admission: AdmissionControl | None = None,
    ):
        self._new_device = new_device
        self._max_outbound_bytes = max_outbound_bytes
        self._telemetry = telemetry or Telemetry()
        self._admission = admission  # asked before a connection is served; None: every one is
        self._writers = Runners(f"{self.name} writer")  # each connection's writer, while it has output
        self._connections: set[OutboundQueue] = set()
        self._server: BaseServer  # set by the subclass

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address[:2]

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def greenlet_count(self) -> int:
        """Connection handlers and writers running now."""
        pool = getattr(self._server, "pool", None)
        return (len(pool) if pool is not None else 0) + len(self._writers)

    def start(self) -> None:
        self._server.start()
        log.info("%s listening on %s:%d", self.name, *self.address)

    def stop(self, timeout: float) -> None:
        self._server.close()  # no new connections
        for outbound in list(self._connections):
            outbound.close(CLOSE_GOING_AWAY, "server shutting down")
        self._server.stop(timeout=timeout)
        self._writers.kill(timeout=timeout)

    def _serve(self, outbound: OutboundQueue, read: Callable[[Forward], str]) -> None:
        """Run one connection: ``read(forward)`` loops until the end and says why it ended.

        ``forward(bodies, violation)`` ends with a violation when the reader
        found one: the device actor answers what came before, then closes.

        ``forward(bodies)`` hands what was read to the device actor. It blocks
        while READS_IN_FLIGHT earlier reads still wait in the actor's inbox, so
        a client that sends faster than its requests are handled is slowed
        down to that pace (TCP pushes back on it) instead of filling memory;
        and, after the device actor refused a ``msg.send`` (-32003), until the
        ``retry_after_ms`` it told the client has passed: a client that sends
        on regardless is held back by TCP, not answered request by request.

        While the server is overloaded, a new connection is told so
        (``conn.close`` 1013) and closed: it gets no device actor.
        """
        opened = self._open(outbound, read)
        if opened is None:
            return
        device, forward = opened
        reason = "closed by peer"
        try:
            reason = read(forward)
        except pykka.ActorDeadError:
            reason = "device actor stopped"
        finally:
            self._end(outbound, device, reason)

    def _open(self, outbound: OutboundQueue, read: Callable[[Forward], str]) -> tuple[pykka.ActorRef, Forward] | None:
        """A served connection's device actor and ``forward`` (see _serve); None once turned away."""
        refusal = self._admission.refuse_connection() if self._admission is not None else None
        if refusal is not None:
            self._turn_away(outbound, read, refusal)
            return None
        self._connections.add(outbound)
        self._telemetry.connections_opened[self.transport] += 1
        device = self._new_device(outbound)
        credits = Semaphore(READS_IN_FLIGHT)
        resume_at = 0.0  # the monotonic time before which the reader waits

        def pause(seconds: float) -> None:
            nonlocal resume_at
            resume_at = max(resume_at, time.monotonic() + seconds)

        def forward(bodies: tuple, violation: ProtocolViolation | None = None) -> None:
            wait = resume_at - time.monotonic()
            if wait > 0:
                gevent.sleep(wait)
            while not credits.acquire(timeout=CREDIT_WAIT_SECONDS):
                if not device.is_alive():  # it crashed: nobody will take these
                    raise pykka.ActorDeadError(f"{device} stopped")
            device.tell(Received(bodies, credits.release, violation, pause))

        return device, forward

    def _end(self, outbound: OutboundQueue, device: pykka.ActorRef, reason: str) -> None:
        """The connection's input has ended: tell its device actor why, and write what is queued."""
        outbound.peer_done()
        self._connections.discard(outbound)
        self._telemetry.connections_closed[self.transport] += 1
        if outbound.slow_consumer:
            self._telemetry.slow_consumers += 1
        tell_if_alive(device, ConnectionLost(reason))  # it may have stopped (server stopping)
        outbound.close()
        outbound.wait_closed(timeout=WRITER_DRAIN_SECONDS)

    def _turn_away(self, outbound: OutboundQueue, read: Callable[[Forward], str], overloaded: str) -> None:
        outbound.close(CLOSE_OVERLOADED, f"overloaded ({overloaded}): try again later")
        try:
            read(_drop)  # a closing connection's reader drops what the peer still sends, until it closes
        finally:
            outbound.peer_done()
            outbound.wait_closed(timeout=WRITER_DRAIN_SECONDS)


def _drop(bodies: tuple, violation: ProtocolViolation | None = None) -> None:
    """What a refused connection's reader hands on: nothing, there is no device actor."""


def listener(host: str, port: int, *, reuse_port: bool):
    """The address for a server to bind, or, shared with other processes, a socket bound already.

    With ``reuse_port`` every worker process binds the same port (SO_REUSEPORT)
    and the kernel spreads new connections among them.
    """
    if not reuse_port:
        return (host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def half_close(sock: socket.socket) -> None:
    """Send a FIN: the peer reads what was sent, then sees the end; reading goes on."""
    # The plain socket's shutdown: ssl's own would drop the TLS state under a reader still using it.
    with contextlib.suppress(OSError):
        gevent.socket.socket.shutdown(sock, socket.SHUT_WR)


def shut_socket(sock: socket.socket) -> None:
    """End the connection; a reader blocked on it wakes up with an error."""
    with contextlib.suppress(OSError):
        gevent.socket.socket.shutdown(sock, socket.SHUT_RDWR)
    sock.close()
