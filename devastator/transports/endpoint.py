"""What the endpoints share: their listener, live connections, writer greenlets and on-demand reading.

A connection's life is the same on every endpoint: a bounded outbound queue
(its writer runs in the endpoint's ``Runners``), a device actor, a reader;
when the input ends the device actor is told why, and what was queued is
written before the socket shuts.

On the TLS and WebSocket endpoints (``OnDemandEndpoint``) a connection has
a greenlet only while something happens on it: the handshake, then a read
whenever input arrives (``OnDemandReader``); between reads a libev watcher
waits for input and a timer for the read's deadline. A greenlet blocked in
recv would cost ~10 KiB per connection (its saved C stack, its page of
interpreter frames), and most connections are idle most of the time. The
admin endpoint's few connections read in a loop of their own.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import socket
import time
import ssl
from typing import Callable

import gevent
import gevent.event
import gevent.socket
import pykka
from gevent.baseserver import BaseServer
from gevent.lock import Semaphore
from gevent.pool import Group
from gevent.server import StreamServer

from ..actors.messages import ConnectionLost, ProtocolViolation, Received, tell_if_alive
from ..admission import AdmissionControl
from ..telemetry import Telemetry
from .outbound import OutboundQueue
from ..runners import Runners
from ..protocol.close_codes import CLOSE_GOING_AWAY, CLOSE_OVERLOADED

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024

READ_SIZE = 65536
# A wake-up's reads are handed to the device actor together, up to this many bytes: a client
# writing one frame (or message) per write would otherwise cost one actor message per frame.
GATHER_BYTES = 4 * READ_SIZE
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


# -- reading on demand ---------------------------------------------------------------


class InputReader(abc.ABC):
    """One connection's input, read a wake-up at a time: its state outlives any greenlet.

    The base of tls.py's FrameReader (length-prefixed frames) and
    websocket.py's WebSocketReader (RFC 6455 frames). What the reads bring is
    gathered, whole frames or messages, until flush() hands it to the device
    actor (the on-demand reader's, once input stops), or GATHER_BYTES came.
    """

    __slots__ = ("_conn", "_forward", "_outbound", "_gathered", "_gathered_bytes")

    def __init__(self, conn, forward: Forward, outbound: OutboundQueue):
        self._conn = conn
        self._forward = forward
        self._outbound = outbound
        self._gathered: list = []
        self._gathered_bytes = 0

    def read_available(self) -> str | None | bool:
        """Read and handle what is there, without waiting: False if nothing was, else why the input ended or None.

        What the wake-up finds is handled together (read_ready); the peer's
        end, or a failed read, is told after what came before it.
        """
        data, ended = read_ready(self._conn)
        if data:
            outcome = self._received(data)
            if outcome is not None or ended is None:
                return outcome
        elif ended is None:
            return False
        return self._input_ended(ended)

    @abc.abstractmethod
    def read_once(self) -> str | None:
        """One read, waiting up to next_timeout(), and what it brought, handed on: why the input ended, or None."""

    @abc.abstractmethod
    def next_timeout(self) -> float | None:
        """How long the next wait for input may last (None: as long as it takes)."""

    @abc.abstractmethod
    def timed_out(self) -> str | None:
        """Nothing came within next_timeout(): why the input ended, or None to wait again."""

    def flush(self) -> None:
        """Hand what was gathered since the last flush to the device actor (may wait for it)."""
        if self._gathered:
            self._forward(self._take_gathered())

    @abc.abstractmethod
    def _received(self, data: bytes) -> str | None:
        """Bytes from the peer, handled: why the input ended, or None while it goes on."""

    @abc.abstractmethod
    def _input_ended(self, ended: bytes | Exception) -> str | None:
        """Why the input ended: the peer's end (b"") or the read's error."""

    def _gather(self, items: list, size: int) -> None:
        self._gathered.extend(items)
        self._gathered_bytes += size
        if self._gathered_bytes >= GATHER_BYTES:
            self.flush()

    def _take_gathered(self) -> tuple:
        gathered = tuple(self._gathered)
        self._gathered.clear()
        self._gathered_bytes = 0
        return gathered


def read_ready(conn, limit: int = READ_SIZE) -> tuple[bytes, bytes | Exception | None]:
    """What the socket holds now, up to ``limit`` bytes, without waiting; and its end if that came too.

    The end is b"" (the peer's), the read's error, or None while the input
    goes on, so (b"", None) is "nothing there". Over TLS, OpenSSL hands over
    one record per read and a client writing each frame on its own sends a
    record per frame, so this reads on while input is there, with the
    socket's timeout set once for all the reads. The timeout is restored
    before returning: the writer shares it and must never see 0.
    """
    chunks: list[bytes] = []
    size = 0
    ended = None
    timeout = conn.gettimeout()
    conn.settimeout(0.0)
    try:
        while size < limit:
            try:
                data = conn.recv(limit - size)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break  # nothing more there
            if not data:
                ended = data
                break
            chunks.append(data)
            size += len(data)
    except (OSError, ValueError) as error:  # ValueError: ssl, once the socket was shut under us
        ended = error
    finally:
        with contextlib.suppress(OSError, ValueError):
            conn.settimeout(timeout)
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), ended


def read_to_end(reader: InputReader) -> str:
    """Read in the calling greenlet, one blocking read at a time, until the input ends; why it ended.

    For the few connections read without an OnDemandReader: those turned away
    while overloaded (their handler reads and drops what the peer still sends
    until it closes) and the admin endpoint's.
    """
    while True:
        ended = reader.read_once()
        if ended is not None:
            return ended


class OnDemandReader:
    """Reads a connection when input arrives, in a task that ends when none is left (runners.py).

    Between reads a libev watcher waits for the socket to become readable and
    a timer for the input's next_timeout(). Once woken, the greenlet reads
    without waiting until nothing is left (OpenSSL's "want read", EAGAIN), as
    a blocking reader would read on, hands that on and ends. A TLS read that
    would need a write first (``SSLWantWriteError``: a TLS 1.3 key update)
    waits for the next input like any other.
    """

    __slots__ = ("_conn", "_input", "_spawn", "_ended", "_readable", "_deadline", "_reading", "_done")

    def __init__(self, conn, input_reader: InputReader, *, spawn: Callable[..., None],
                 ended: Callable[[str], None]):
        self._conn = conn
        self._input = input_reader
        self._spawn = spawn
        self._ended = ended  # why the input ended: the connection's end (called once)
        self._readable = gevent.get_hub().loop.io(conn.fileno(), 1)
        self._deadline = None  # the timer while waiting
        self._reading = False  # a greenlet runs _run
        self._done = False

    def start(self) -> None:
        self._reading = True
        self._spawn(self._run, False)  # what came with the handshake, if anything, then the wait

    def shut(self) -> None:
        """End the socket (OutboundQueue's ``shut``); a reader waiting without a greenlet sees it now."""
        shut_socket(self._conn)
        if not self._reading and not self._done:
            self._stop_waiting()
            self._reading = True
            self._spawn(self._run, False)  # its read fails at once: the end

    def _wait(self) -> None:
        timeout = self._input.next_timeout()
        self._readable.start(self._wake, False)
        if timeout is not None:
            self._deadline = gevent.get_hub().loop.timer(timeout)
            self._deadline.start(self._wake, True)

    def _stop_waiting(self) -> None:
        self._readable.stop()
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None

    def _wake(self, timed_out: bool) -> None:
        # In the event loop's callback: nothing here may block, so the work goes to a greenlet.
        self._stop_waiting()
        self._reading = True
        self._spawn(self._run, timed_out)

    def _run(self, timed_out: bool) -> None:
        ended: str | None = None
        reader = self._input
        try:
            try:
                if timed_out:
                    ended = reader.timed_out()
                while ended is None:  # read on while input is there, as a blocking reader would
                    ended = reader.read_available()
                    if ended is False:
                        ended = None
                        break
                reader.flush()  # what this wake-up read, as one Received, before its end if it ended
            except pykka.ActorDeadError:
                ended = "device actor stopped"
        except BaseException:
            self._finish("reader failed")
            raise
        if ended is not None:
            self._finish(ended)
            return
        self._reading = False
        self._wait()

    def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._stop_waiting()
        self._readable.close()
        self._ended(reason)


class OnDemandEndpoint(Endpoint, abc.ABC):
    """An endpoint whose connections are read on demand (OnDemandReader), each counted from accept to close.

    gevent asks ``full()`` before each accept. A Pool would count greenlets,
    and an idle connection has none: the places are counted instead, taken
    at the accept and given back when the connection ends, so that
    ``max_connections`` bounds the connections, idle or not.

    A subclass's ``_accept(raw, address)`` serves a new connection in its
    handler greenlet (the handshake, HTTP requests...) and returns True once
    it handed the reading over with ``_read_on_demand``, which then gives the
    place back at the end.
    """

    def __init__(self, *, max_connections: int, **kwargs):
        super().__init__(**kwargs)
        self._max_connections = max_connections
        self._places_taken = 0  # connections accepted and not yet closed, with a greenlet or without
        self._no_connections = gevent.event.Event()
        self._no_connections.set()
        self._handlers = Group()  # new connections, until their reading is handed over
        self._reading = Runners(f"{self.name} reader")  # readers, while input arrives
        self._readers: set[OnDemandReader] = set()

    def _stream_server(self, address) -> StreamServer:
        server = StreamServer(address, self._handle, spawn=self._spawn_handler)
        server.full = self._full
        return server

    @property
    def greenlet_count(self) -> int:
        return len(self._handlers) + len(self._reading) + len(self._writers)

    def stop(self, timeout: float) -> None:
        self._server.close()  # no new connections
        for outbound in list(self._connections):
            outbound.close(CLOSE_GOING_AWAY, "server shutting down")
        self._no_connections.wait(timeout)  # as a Pool's join would wait for its handlers
        for reader in list(self._readers):
            reader.shut()  # still open: its reader sees the end and tells the device actor
        self._handlers.join(timeout=1)
        self._handlers.kill(timeout=1)
        self._reading.join(timeout=1)
        self._reading.kill(timeout=1)
        self._writers.kill(timeout=timeout)

    @abc.abstractmethod
    def _accept(self, raw: socket.socket, address) -> bool:
        """Serve a new connection; True once its reading was handed over (see _read_on_demand)."""

    def _full(self) -> bool:
        return self._places_taken >= self._max_connections

    def _spawn_handler(self, handle: Callable, *args) -> gevent.Greenlet:
        self._places_taken += 1
        self._no_connections.clear()
        greenlet = self._handlers.spawn(handle, *args)
        greenlet.link_exception(lambda crashed: log.error("%s handler crashed: %r", self.name, crashed.exception))
        return greenlet

    def _handle(self, raw: socket.socket, address) -> None:
        handed_over = False  # to an on-demand reader, which gives the place back at the end
        try:
            handed_over = self._accept(raw, address)
        finally:
            if not handed_over:
                self._release_place()

    def _release_place(self) -> None:
        was_full = self._full()
        self._places_taken -= 1
        if not self._places_taken:
            self._no_connections.set()
        if was_full and self._server.started:
            self._server.start_accepting()  # gevent stopped accepting when the places ran out

    def _read_on_demand(self, conn, reader: InputReader, outbound: OutboundQueue,
                        device: pykka.ActorRef) -> OnDemandReader:
        """Hand a served connection's reading to an OnDemandReader; at its end the connection closes."""

        def ended(reason: str) -> None:
            try:
                self._end(outbound, device, reason)
            finally:
                conn.close()
                self._readers.discard(on_demand)
                self._release_place()

        on_demand = OnDemandReader(conn, reader, spawn=self._reading.spawn, ended=ended)
        self._readers.add(on_demand)
        on_demand.start()
        return on_demand
