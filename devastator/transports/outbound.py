"""The outbound side of one connection: a bounded queue and its writer greenlet.

Actors never block on a socket: they queue JSON values here, and one writer
greenlet per connection sends whatever has gathered in one write. A peer that
reads slower than it is sent to fills the queue past its bound and is
disconnected; what it had not ACKed stays pending in the store.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence

import gevent.event

log = logging.getLogger(__name__)


class OutboundQueue:
    def __init__(
        self,
        *,
        write: Callable[[list[bytes]], None],
        shut: Callable[[], None],
        max_bytes: int,
        remote: str,
        peer_identity: tuple[str, str] | None = None,
    ):
        self._write = write
        self._shut = shut
        self._max_bytes = max_bytes
        self.remote = remote
        self.peer_identity = peer_identity
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._wakeup = gevent.event.Event()
        self._closing = False
        self.final: Callable[[], None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, bodies: Sequence[bytes]) -> None:
        if self._closing:
            return
        self._queued.extend(bodies)
        self._queued_bytes += sum(map(len, bodies))
        if self._queued_bytes > self._max_bytes:
            log.warning("%s: slow consumer disconnected (%d bytes unsent)", self.remote, self._queued_bytes)
            self._queued.clear()
            self._queued_bytes = 0
            self._closing = True
        self._wakeup.set()

    def close(self, final: Callable[[], None] | None = None) -> None:
        """Write what is queued, run ``final`` (a closing handshake), then shut the socket."""
        if not self._closing:
            self._closing = True
            self.final = final
        self._wakeup.set()

    def run(self) -> None:
        """The writer greenlet's body."""
        try:
            # A write failing means the peer went away; the reader sees it too.
            with contextlib.suppress(OSError):
                self._write_until_closed()
        finally:
            self._closing = True
            self._shut()

    def _write_until_closed(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            if self._queued:
                queued, self._queued = self._queued, []
                self._queued_bytes = 0
                self._write(queued)
            if self._closing and not self._queued:
                if self.final is not None:
                    self.final()
                return
