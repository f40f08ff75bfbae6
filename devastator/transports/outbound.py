"""The outbound side of one connection: a bounded queue and its writer greenlet.

Actors never block on a socket: they queue JSON values here, and a writer
greenlet sends whatever has gathered in one write. The writer lives only while
there is something to write, so an idle connection costs no greenlet for it.
A peer that reads slower than it is sent to fills the queue past its bound and
is disconnected; what it had not ACKed stays pending in the store.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence

import gevent
import gevent.event

from ..identity import DeviceIdentity

log = logging.getLogger(__name__)


class OutboundQueue:
    def __init__(
        self,
        *,
        write: Callable[[list[bytes]], None],
        shut: Callable[[], None],
        spawn: Callable[[Callable[[], None]], gevent.Greenlet],
        max_bytes: int,
        remote: str,
        peer_identity: DeviceIdentity | None = None,
    ):
        self._write = write
        self._shut = shut
        self._spawn = spawn
        self._max_bytes = max_bytes
        self.remote = remote
        self.peer_identity = peer_identity
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._writer: gevent.Greenlet | None = None
        self._closing = False
        self._final: Callable[[], None] | None = None
        self._shut_done = gevent.event.Event()
        self.slow_consumer = False  # closed because it would not read what it was sent

    @property
    def closing(self) -> bool:
        return self._closing

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
            self._closing = True
        self._start_writer()

    def close(self, final: Callable[[], None] | None = None) -> None:
        """Write what is queued, run ``final`` (a closing handshake), then shut the socket."""
        if not self._closing:
            self._closing = True
            self._final = final
        self._start_writer()

    def wait_closed(self, timeout: float) -> bool:
        return self._shut_done.wait(timeout)

    def _start_writer(self) -> None:
        if self._writer is None and not self._shut_done.is_set():
            self._writer = self._spawn(self._run)

    def _run(self) -> None:
        try:
            # A write failing means the peer went away; the reader sees it too.
            with contextlib.suppress(OSError):
                while self._queued:
                    queued, self._queued = self._queued, []
                    self._queued_bytes = 0
                    self._write(queued)
                if self._closing and self._final is not None:
                    self._final()
                return
            self._closing = True  # the write failed
        finally:
            self._writer = None
            if self._closing:
                self._shut_done.set()
                self._shut()
