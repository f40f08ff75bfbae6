"""Fakes shared by the actor tests: a recorder that stands in for any actor.

Not a conftest.py: other test modules import the top-level ``conftest`` by name.

A ``Recorder`` is a started actor whose ref can be handed to the actor under
test; it keeps every message it is told, in order. Tests wait for "the next
message" with a timeout, and check that nothing else arrived by draining the
recorder after a round trip (an ``ask`` queues behind every earlier ``tell``),
so no test ever sleeps.
"""
from __future__ import annotations

import queue

import pykka
import pytest

WAIT = 2.0  # seconds: a bound for a test that fails, never a pause


class _Sync:
    """Asked of a recorder to know that it has handled every earlier message."""


_SYNC = _Sync()


class _RecorderActor(pykka.ThreadingActor):
    def __init__(self, inbox: queue.Queue):
        super().__init__()
        self._inbox = inbox

    def on_receive(self, message):
        if message is not _SYNC:
            self._inbox.put(message)


class Recorder:
    """A started recorder actor and what it has been told."""

    def __init__(self, name: str):
        self.name = name
        self._inbox: queue.Queue = queue.Queue()
        self.ref = _RecorderActor.start(self._inbox)

    def next(self, kind: type = object, timeout: float = WAIT):
        """The next message told, which must be a ``kind``."""
        try:
            message = self._inbox.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"{self.name} was told nothing within {timeout} s (waiting for {kind.__name__})")
        assert isinstance(message, kind), f"{self.name}: expected a {kind.__name__}, was told {message!r}"
        return message

    def drain(self) -> list:
        """Every message told so far and not yet taken."""
        if self.ref.is_alive():
            self.ref.ask(_SYNC, timeout=WAIT)
        messages = []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def __repr__(self) -> str:
        return f"Recorder({self.name!r})"
