"""The TLS endpoint: 4-byte little-endian length frames of JSON (PROTOCOL.md 2).

A connection has a greenlet only while something happens on it: the
handshake, then a read whenever input arrives (the sans-IO FrameDecoder cuts
frames, and the connection's device actor is told them); between reads a
libev watcher waits for input and a timer for the read's deadline. A greenlet
blocked in recv would cost ~10 KiB per connection (its saved C stack, its
page of interpreter frames), and most connections are idle most of the time.
Writing is the OutboundQueue's (its writer also runs only while there is
output). Reads and writes run in greenlets kept between them (runners.py).
A framing violation gets one JSON-RPC error and the connection closes. The
TLS handshake and, once its first byte arrived, each frame must arrive whole
within their deadlines, so that clients sending half a header or half a body
cannot hold connections (and the server's ``max_connections`` places) for the
idle timeout.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from typing import Callable

import gevent
import gevent.event
import pykka
from gevent.pool import Group
from gevent.server import StreamServer

from ..pki import client_identity
from ..protocol import FrameDecoder, encode_frames
from ..protocol.errors import InvalidRequest, RpcError
from ..admission import AdmissionControl
from ..telemetry import Telemetry
from ..actors.messages import ProtocolViolation
from ..protocol.close_codes import CLOSE_IDLE, CLOSE_PROTOCOL_ERROR  # on TLS the code is told, not sent
from .endpoint import CLOSE_GOING_AWAY, Endpoint, Forward, half_close, listener, shut_socket
from .outbound import OutboundQueue
from ..runners import Runners

log = logging.getLogger(__name__)

READ_SIZE = 65536
# A wake-up's reads are handed to the device actor together, up to this many bytes of frames:
# a client writing one frame per TLS record would otherwise cost one actor message per frame.
GATHER_BYTES = 4 * READ_SIZE


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
        self._max_connections = max_connections
        self._places_taken = 0  # connections accepted and not yet closed, with a greenlet or without
        self._no_connections = gevent.event.Event()
        self._no_connections.set()
        self._handlers = Group()  # handshakes
        self._reading = Runners(f"{self.name} reader")  # readers, while input arrives
        self._readers: set[_OnDemandReader] = set()
        self._server = StreamServer(listener(host, port, reuse_port=reuse_port), self._handle,
                                    spawn=self._spawn_handler)
        # gevent asks this before each accept. A Pool would count greenlets, and an idle
        # connection has none: the places are counted from accept to close instead.
        self._server.full = self._full

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

    def _full(self) -> bool:
        return self._places_taken >= self._max_connections

    def _spawn_handler(self, handle: Callable, *args) -> gevent.Greenlet:
        self._places_taken += 1
        self._no_connections.clear()
        greenlet = self._handlers.spawn(handle, *args)
        greenlet.link_exception(lambda crashed: log.error("%s handshake crashed: %r", self.name, crashed.exception))
        return greenlet

    def _release_place(self) -> None:
        was_full = self._full()
        self._places_taken -= 1
        if not self._places_taken:
            self._no_connections.set()
        if was_full and self._server.started:
            self._server.start_accepting()  # gevent stopped accepting when the places ran out

    def _handle(self, raw: socket.socket, address) -> None:
        handed_over = False  # to an on-demand reader, which gives the place back at the end
        try:
            handed_over = self._handshake_and_serve(raw, address)
        finally:
            if not handed_over:
                self._release_place()

    def _handshake_and_serve(self, raw: socket.socket, address) -> bool:
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
        reader: _OnDemandReader | None = None
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

            def ended(reason: str) -> None:
                try:
                    self._end(outbound, device, reason)
                finally:
                    conn.close()
                    self._readers.discard(reader)
                    self._release_place()

            frames = FrameReader(conn, forward, outbound, self._max_frame_bytes, frame_timeout=self._frame_timeout,
                                 gather=True)
            reader = _OnDemandReader(conn, frames, spawn=self._reading.spawn, ended=ended)
            self._readers.add(reader)
            reader.start()
            return True
        finally:
            if reader is None:
                conn.close()


def read_frames(
    conn, forward: Forward, outbound: OutboundQueue, max_frame_bytes: int, *, frame_timeout: float | None = None
) -> str:
    """Read length-prefixed frames until the connection ends; say why it ended (see FrameReader)."""
    reader = FrameReader(conn, forward, outbound, max_frame_bytes, frame_timeout=frame_timeout)
    while True:
        ended = reader.read_once()
        if ended is not None:
            return ended


class FrameReader:
    """One connection's reading, one read at a time: its state outlives any greenlet.

    A framing violation gets one JSON-RPC error, after the answers to the
    frames before it, then the connection closes. So does a frame that is
    not whole ``frame_timeout`` seconds after its first byte arrived (-32600).
    A connection silent for its read timeout (the socket's) is closed with
    ``conn.close`` 4003. Once the server is closing, input is read and
    dropped until the peer closes its side (see OutboundQueue).
    """

    __slots__ = ("_conn", "_forward", "_outbound", "_frame_timeout", "_decoder", "_idle_timeout",
                 "_frame_deadline", "_reason", "_violated", "_gather", "_gathered", "_gathered_bytes")

    def __init__(
        self, conn, forward: Forward, outbound: OutboundQueue, max_frame_bytes: int, *,
        frame_timeout: float | None = None, gather: bool = False,
    ):
        self._conn = conn
        self._forward = forward
        # gather: frames wait in _gathered until flush() (the on-demand reader's, once input
        # stops or GATHER_BYTES came); else each read's frames are handed on at once.
        self._gather = gather
        self._gathered: list[bytes] = []
        self._gathered_bytes = 0
        self._outbound = outbound
        self._frame_timeout = frame_timeout
        self._decoder = FrameDecoder(max_frame_bytes)
        self._idle_timeout = conn.gettimeout()
        self._frame_deadline: float | None = None  # while a frame is partly read
        self._reason = "closed by server"
        self._violated = False  # then input is dropped until the device actor has closed

    @property
    def idle_timeout(self) -> float | None:
        return self._idle_timeout

    def next_timeout(self) -> float | None:
        """How long the next read may wait: the idle timeout, or what is left of a frame's deadline."""
        if self._frame_deadline is None:
            return self._idle_timeout
        left = max(0.0, self._frame_deadline - time.monotonic())
        return left if self._idle_timeout is None else min(left, self._idle_timeout)

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
            return self._reason if self._outbound.closing else f"read failed: {error}"
        return self._received(data)

    def read_available(self) -> str | None | bool:
        """Like read_once, but False at once when no input is there (the deadlines are the caller's).

        It reads on while input is there, up to READ_SIZE bytes: a client that
        writes each frame on its own sends a TLS record per frame, and OpenSSL
        hands over one record per read, so the frames of several reads are
        decoded together, and the socket's timeout is set once for them all.
        """
        conn = self._conn
        chunks: list[bytes] = []
        size = 0
        ended = None  # b"" (the peer's end) or the read's error, after what came before it
        timeout = conn.gettimeout()
        conn.settimeout(0.0)  # no wait, so the writer (which shares the timeout) cannot see it
        try:
            while size < READ_SIZE:
                data = conn.recv(READ_SIZE - size)
                if not data:
                    ended = data
                    break
                chunks.append(data)
                size += len(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            if not chunks:
                return False
        except (OSError, ValueError) as error:  # ValueError: ssl, once the socket was shut under us
            ended = error
        finally:
            with contextlib.suppress(OSError, ValueError):
                conn.settimeout(timeout)
        if chunks:
            outcome = self._received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if outcome is not None or ended is None:
                return outcome
        if isinstance(ended, Exception):
            return self._reason if self._outbound.closing else f"read failed: {ended}"
        return self._received(b"")

    def timed_out(self) -> str | None:
        """Nothing came within next_timeout()."""
        outbound = self._outbound
        if outbound.closing:
            return self._reason
        if self._frame_deadline is not None and time.monotonic() >= self._frame_deadline:
            self._frame_deadline = None
            self._conn.settimeout(self._idle_timeout)
            error = InvalidRequest(f"frame not complete within {self._frame_timeout:g} s")
            self._forward(self._take_gathered(), ProtocolViolation(CLOSE_PROTOCOL_ERROR, error.message, error))
            self._violated, self._reason = True, f"framing violation: {error.message}"
            return None
        outbound.close(CLOSE_IDLE, "idle timeout")
        self._reason = "idle timeout"
        return None

    def flush(self) -> None:
        """Hand the frames gathered since the last flush to the device actor (may wait for it)."""
        if self._gathered:
            self._forward(self._take_gathered())

    def _take_gathered(self) -> tuple:
        gathered = tuple(self._gathered)
        self._gathered.clear()
        self._gathered_bytes = 0
        return gathered

    def before_frame_deadline(self) -> bool:
        """A frame is partly read and its deadline has not passed (a timer may fire a little early)."""
        return self._frame_deadline is not None and time.monotonic() < self._frame_deadline

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
            if self._gather:
                self._gathered.extend(bodies)
                self._gathered_bytes += sum(map(len, bodies))
                if self._gathered_bytes >= GATHER_BYTES:
                    self.flush()
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


class _OnDemandReader:
    """Reads a connection when input arrives, in a task that ends when none is left (runners.py).

    Between reads a libev watcher waits for the socket to become readable and
    a timer for the read's deadline (FrameReader.next_timeout). Once woken,
    the greenlet reads without waiting until nothing is left (OpenSSL's
    "want read"), as a blocking reader would read on, and then ends. A read
    that would need a write first (``SSLWantWriteError``: a TLS 1.3 key
    update) waits for the next input like any other.
    """

    __slots__ = ("_conn", "_frames", "_spawn", "_ended", "_readable", "_deadline", "_deadline_is_frames",
                 "_reading", "_shut", "_done")

    def __init__(self, conn, frames: FrameReader, *, spawn: Callable[..., None],
                 ended: Callable[[str], None]):
        self._conn = conn
        self._frames = frames
        self._spawn = spawn
        self._ended = ended  # why the input ended: the connection's end (called once)
        self._readable = gevent.get_hub().loop.io(conn.fileno(), 1)
        self._deadline = None  # the timer while waiting
        self._deadline_is_frames = False  # that timer is a frame's deadline, not the idle timeout
        self._reading = False  # a greenlet runs _run
        self._shut = False
        self._done = False

    def start(self) -> None:
        self._reading = True
        self._spawn(self._run, False)  # what came with the handshake, if anything, then the wait

    def shut(self) -> None:
        """End the socket (OutboundQueue's ``shut``); a reader waiting without a greenlet sees it now."""
        self._shut = True
        shut_socket(self._conn)
        if not self._reading and not self._done:
            self._stop_waiting()
            self._reading = True
            self._spawn(self._run, False)  # its read fails at once: the end

    def _wait(self) -> None:
        timeout = self._frames.next_timeout()
        self._readable.start(self._wake, False)
        if timeout is not None:
            self._deadline_is_frames = timeout != self._frames.idle_timeout
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
        try:
            try:
                if timed_out and not (self._deadline_is_frames and self._frames.before_frame_deadline()):
                    ended = self._frames.timed_out()  # else the timer fired a hair early: wait on
                while ended is None:  # read on while input is there, as a blocking reader would
                    ended = self._frames.read_available()
                    if ended is False:
                        ended = None
                        break
                self._frames.flush()  # what this wake-up read, as one Received, before its end if it ended
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
