"""The outbound side of one connection: a bounded queue and its writer greenlet.

Actors never block on a socket: they queue JSON values here, and a writer
greenlet sends whatever has gathered in one write. The writer lives only while
there is something to write, so an idle connection costs no greenlet for it.
A peer that reads slower than it is sent to fills the queue past its bound and
is disconnected (close code 4004); what it had not ACKed stays pending in the
store.

Closing is the same on every endpoint (PROTOCOL.md 7): when the server closes
for a reason of its own, the peer is sent the ``conn.close`` notification and
the transport's closing handshake (a WebSocket close frame with the code).
Then the socket is half-closed, and fully closed once the peer has closed its
side or LINGER_SECONDS have passed: closing at once with unread input would
reset the connection and could destroy what was just sent before the peer
read it. Meanwhile the reader drops what still arrives, up to
MAX_DRAINED_BYTES; and a close is over within CLOSE_DEADLINE_SECONDS, however
stuck the writer is.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence

import gevent
import gevent.event

from ..identity import DeviceIdentity
from ..protocol import Notification, encode
from ..protocol.close_codes import CLOSE_SLOW_CONSUMER

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
CLOSE_DEADLINE_SECONDS = 5.0  # a close finishes by then, even with a peer that reads nothing
MAX_DRAINED_BYTES = 65536  # input read and dropped while closing, before the reader gives up


class OutboundQueue:
    # One per connection, so no instance dict (a few hundred bytes each over thousands of connections).
    __slots__ = (
        "_write", "_shut", "_half_close", "_closing_handshake", "_spawn", "_max_bytes", "remote", "peer_identity",
        "_queued", "_queued_bytes", "_writing", "_closing", "_close_code", "_close_reason", "_shut_done",
        "_peer_done", "_drained_bytes", "slow_consumer", "close_code", "__weakref__",
    )

    def __init__(
        self,
        *,
        write: Callable[[list[bytes]], None],
        shut: Callable[[], None],
        spawn: Callable[[Callable[[], None]], None],
        max_bytes: int,
        remote: str,
        peer_identity: DeviceIdentity | None = None,
        half_close: Callable[[], None] | None = None,
        closing_handshake: Callable[[int | None, str], None] | None = None,
    ):
        """``write`` sends JSON values; ``shut`` ends the socket (waking its reader);
        ``half_close`` stops sending (a FIN) while the peer may still answer;
        ``closing_handshake(code, reason)`` writes the transport's own close (WebSocket)."""
        self._write = write
        self._shut = shut
        self._half_close = half_close
        self._closing_handshake = closing_handshake
        self._spawn = spawn
        self._max_bytes = max_bytes
        self.remote = remote
        self.peer_identity = peer_identity
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._writing = False  # a writer runs _run
        self._closing = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._shut_done = gevent.event.Event()
        self._peer_done = gevent.event.Event()
        self._drained_bytes = 0
        self.slow_consumer = False  # closed because it would not read what it was sent
        self.close_code: int | None = None  # why the server closed it, once it did (telemetry, tests)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def unsent_bytes(self) -> int:
        """Queued, not yet handed to the socket: what signals give way to (see DeviceActor)."""
        return self._queued_bytes

    def send(self, bodies: Sequence[bytes]) -> None:
        """Queue JSON values to write, without blocking."""
        if self._closing:
            return
        self._queued.extend(bodies)
        self._queued_bytes += sum(map(len, bodies))
        if self._queued_bytes > self._max_bytes:
            log.warning("%s: slow consumer disconnected (%d bytes unsent)", self.remote, self._queued_bytes)
            self.slow_consumer = True
            self._queued.clear()
            self._queued_bytes = 0
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: output was not read")
            return
        self._start_writer()

    def close(self, code: int | None = None, reason: str = "", *, notify: bool = True) -> None:
        """Write what is queued, then close.

        With a ``code`` the server says why: the ``conn.close`` notification
        first (unless ``notify`` is false: a protocol violation or an answer to
        the peer's own close), then the transport's closing handshake with it.
        """
        if not self._closing:
            self._closing = True
            self._spawn(self._enforce_close_deadline)
            if code is not None:
                self.close_code = code
                self._close_code, self._close_reason = code, reason
                if notify:
                    self._queued.append(encode(Notification("conn.close", {"code": code, "reason": reason})))
        self._start_writer()

    def drop_input(self, size: int) -> bool:
        """While closing: input was read and dropped; False once the reader should stop reading."""
        self._drained_bytes += size
        return self._drained_bytes <= MAX_DRAINED_BYTES

    def peer_done(self) -> None:
        """The reader has seen the end of the peer's input: nothing is left to linger for."""
        self._peer_done.set()

    def wait_closed(self, timeout: float) -> bool:
        return self._shut_done.wait(timeout)

    def _enforce_close_deadline(self) -> None:
        # Shutting the socket wakes a writer stuck on a peer that reads nothing.
        if not self._shut_done.wait(CLOSE_DEADLINE_SECONDS):
            self._shut()

    def _start_writer(self) -> None:
        if not self._writing and not self._shut_done.is_set():
            self._writing = True
            self._spawn(self._run)

    def _run(self) -> None:
        try:
            # A write failing means the peer went away; the reader sees it too.
            with contextlib.suppress(OSError):
                while self._queued:
                    queued, self._queued = self._queued, []
                    self._queued_bytes = 0
                    self._write(queued)
                if not self._closing:
                    return
                if self._closing_handshake is not None:
                    self._closing_handshake(self._close_code, self._close_reason)
                if self._half_close is not None and not self._peer_done.is_set():
                    self._half_close()
                    self._peer_done.wait(LINGER_SECONDS)
            self._closing = True  # finished, or the write failed
        finally:
            self._writing = False
            if self._closing:
                self._shut_done.set()
                self._shut()
