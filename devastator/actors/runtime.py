"""Actors that have a greenlet only while they have messages: the device and user actors.

pykka's ThreadingActor gives every actor a (gevent-patched) thread for its
whole life: a greenlet blocked in ``inbox.get()`` with its saved C stack, its
interpreter frame stack page, a ``Thread`` and a ``queue.Queue`` of three
Conditions. An idle device or user actor needs none of that. Here the inbox
is a deque, and a put into an inbox with no greenlet hands the actor's run to
a greenlet of ``runners`` (runners.py: parked greenlets, reused), which
handles messages until the inbox is empty and then goes back. Measured with
bench/run.py --mode idle --connections 2000: 23.8 KiB less per idle TLS
connection (61.9 -> 38.1 KiB: its device and user actors).

Semantics kept from pykka's loop: ``on_start`` runs before the first message;
one message at a time, in order; an exception in ``on_receive`` without a
reply goes to ``_handle_failure`` and ``on_failure``; a BaseException stops
every actor; after the stop, what is left in the inbox is answered
ActorDeadError (``_actor_loop_teardown``). Futures stay ThreadingFuture (their
Condition is gevent's once threading is patched).
"""
from __future__ import annotations

import collections
import sys
from typing import Any, ClassVar

import pykka
from pykka import ThreadingFuture

from ..runners import Runners


class _Inbox:
    """pykka's inbox interface (put, get, empty, qsize); a put wakes the actor.

    The deque exists only while messages wait: an empty one is 760 bytes
    (its first block), and most actors are idle most of the time.
    """

    __slots__ = ("_items", "_actor")

    def __init__(self) -> None:
        self._items: collections.deque | None = None
        self._actor: GreenletActor | None = None  # set when the actor starts

    def put(self, envelope: Any, block: bool = True, timeout: float | None = None) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(envelope)
        if self._actor is not None:
            self._actor._wake()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        items = self._items
        envelope = items.popleft()  # only called when not empty()
        if not items:
            self._items = None
        return envelope

    def empty(self) -> bool:
        return self._items is None

    def qsize(self) -> int:
        return 0 if self._items is None else len(self._items)


class GreenletActor(pykka.Actor):
    """A pykka actor run on demand by a greenlet of ``runners``."""

    runners: ClassVar[Runners] = Runners("actor")  # the server waits for them after stopping the actors
    _running = False

    @staticmethod
    def _create_actor_inbox() -> _Inbox:
        return _Inbox()

    @staticmethod
    def _create_future() -> ThreadingFuture:
        return ThreadingFuture()

    def _start_actor_loop(self) -> None:
        self.actor_inbox._actor = self
        self._running = True
        self.runners.spawn(self._run, True)

    def _wake(self) -> None:
        if not self._running:
            self._running = True
            self.runners.spawn(self._run, False)

    def _run(self, starting: bool) -> None:
        inbox = self.actor_inbox
        try:
            if starting:
                self._actor_loop_setup()
            while not inbox.empty() and not self.actor_stopped.is_set():
                self._handle_one(inbox.get())
            if self.actor_stopped.is_set():
                self._actor_loop_teardown()
        finally:
            self._running = False
            if not inbox.empty() and not self.actor_stopped.is_set():
                self._wake()  # put while this run was ending

    def _handle_one(self, envelope) -> None:
        # The body of pykka's Actor._actor_loop_running, for one envelope.
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:  # noqa: BLE001
                    self._handle_failure(*sys.exc_info())
        except BaseException:  # noqa: BLE001
            self._stop()
            pykka.ActorRegistry.stop_all()
