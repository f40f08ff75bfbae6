"""Greenlets kept between short tasks, so that a task does not pay for a new one.

The hot path runs a short task per wake-up: a reader per burst of input
(transports/tls.py), an actor per burst of messages (actors/runtime.py), a
writer per burst of output (transports/outbound.py). On CPython 3.11 a new
greenlet's first call maps a fresh 16 KiB block for its interpreter frames
(mmap), and its end unmaps it (munmap, with a TLB shootdown once the process
has threads): 35-45 µs per task on this machine against 4 µs for a parked
greenlet (measured by spawning 50,000 trivial tasks each way). At one message
at a time that was most of a message's CPU.

A parked greenlet keeps its frame block and a little saved stack, so at most
``max_parked`` wait per owner; beyond that a greenlet ends after its task. An
idle connection still has none of its own.
"""
from __future__ import annotations

import logging
from typing import Callable

import gevent
import gevent.event
from gevent.pool import Group

log = logging.getLogger(__name__)

MAX_PARKED = 128


class Runners:
    """Runs ``spawn(run, *args)`` tasks in greenlets of ``group``, each reused once its task ends.

    ``len()`` is the tasks running now (parked greenlets are not counted).
    A task's exception is logged, as a crashed greenlet's would be, and its
    greenlet goes on to the next task.
    """

    def __init__(self, name: str, *, max_parked: int = MAX_PARKED):
        self._name = name  # in the log line of a task that failed
        self._max_parked = max_parked
        self._group = Group()
        self._parked: list[gevent.Greenlet] = []
        self._running = 0
        self._none_running = gevent.event.Event()
        self._none_running.set()
        self._killed = False

    def __len__(self) -> int:
        return self._running

    def spawn(self, run: Callable, *args) -> None:
        self._running += 1
        self._none_running.clear()
        if self._parked:
            # As gevent starts a new greenlet: switched to from the event loop, not from here.
            gevent.get_hub().loop.run_callback(self._parked.pop().switch, run, args)
        else:
            self._group.spawn(self._serve, run, args)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no task runs (parked greenlets wait for work, not for this); False on timeout."""
        return self._none_running.wait(timeout)

    def kill(self, timeout: float | None = None) -> None:
        """Kill the running tasks and the parked greenlets; later tasks get a greenlet each, not kept."""
        self._killed = True
        self._parked.clear()
        self._group.kill(timeout=timeout)

    def _serve(self, run: Callable, args: tuple) -> None:
        hub = gevent.get_hub()
        me = gevent.getcurrent()
        while True:
            try:
                run(*args)
            except Exception as error:  # noqa: BLE001 - the greenlet outlives its task
                log.error("%s task crashed: %r", self._name, error, exc_info=error)
            finally:
                self._running -= 1
                if not self._running:
                    self._none_running.set()
            if self._killed or len(self._parked) >= self._max_parked:
                return
            self._parked.append(me)
            try:
                run, args = hub.switch()  # spawn() switches here with the next task
            except BaseException:  # killed while parked
                if me in self._parked:
                    self._parked.remove(me)
                raise
