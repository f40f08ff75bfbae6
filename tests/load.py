"""Load for failure tests: a sender that retries with cids, a receiver that keeps everything.

``Sender`` sends numbered messages a window at a time, each with a cid, and
sends a failed one again (same cid) until it is answered, as a careful client
does; when its connection is lost it stops, keeping what is unanswered, and
``resume(client)`` goes on with those first on a new connection.
``Receiver`` records every ``msg.recv`` a client gets, duplicates included.
``check_delivery`` says whether the two agree: every answered message
received once, nothing else, and the order kept.
"""
from __future__ import annotations

import time

import gevent
import gevent.event

from devastator.client import Client, ConnectionClosed
from devastator.protocol.errors import RpcError
from devastator.store import SqliteStore

WAIT = 10.0  # seconds: a bound for a test that fails, never a pause
RETRY_PAUSE = 0.05  # the sender's pause between tries of a failed send, as a client's backoff


class Sender:
    """``answered``: cid -> message id; ``first_try``: cids answered at their first try; ``errors``: by code."""

    def __init__(self, client: Client, to: str, *, window: int = 20):
        self.client = client
        self.to = to
        self.window = window
        self.answered: dict[str, str] = {}
        self.numbers: dict[str, int] = {}
        self.first_try: set[str] = set()
        self.errors: dict[int, int] = {}
        self.slowest_answer = 0.0  # seconds for a window's answers, errors included
        self._unanswered: list[str] = []
        self._stop = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None
        self._next = 0

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def resume(self, client: Client) -> None:
        """Go on over a new connection, the sends the old one left unanswered first."""
        self._greenlet.join(WAIT)
        assert self._greenlet.dead
        self.client = client
        self.start()

    def stop(self) -> None:
        """Take no new message on; returns once every one taken on is answered."""
        self._stop.set()
        self._greenlet.get(timeout=3 * WAIT)
        assert not self._unanswered, f"{len(self._unanswered)} sends left unanswered"

    def wait_answered(self, count: int, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answered) < count:
            assert time.monotonic() < deadline, f"only {len(self.answered)} of {count} sends answered"
            assert not self._greenlet.dead, f"the sender stopped: {self._greenlet.exception!r}"
            gevent.sleep(0.01)

    def _run(self) -> None:
        while self._unanswered or not self._stop.is_set():
            if not self._unanswered:
                for _ in range(self.window):
                    cid = f"m-{self._next}"
                    self.numbers[cid] = self._next
                    self._next += 1
                    self._unanswered.append(cid)
                first = True
            else:
                first = False  # left by a lost connection: they may have landed
            if not self._send_until_answered(first):
                return  # the connection is gone: resume() goes on

    def _send_until_answered(self, first: bool) -> bool:
        tries = 0 if first else 1
        while self._unanswered:
            tries += 1
            started = time.monotonic()
            try:
                waiting = [
                    (cid, self.client.send_async(self.to, {"n": self.numbers[cid]}, cid=cid))
                    for cid in self._unanswered
                ]
            except ConnectionClosed:
                return False
            failed = []
            for cid, pending in waiting:
                try:
                    result = pending.wait(3 * WAIT)
                except RpcError as error:
                    self.errors[error.code] = self.errors.get(error.code, 0) + 1
                    failed.append(cid)
                    continue
                except ConnectionClosed:
                    failed.append(cid)
                    continue
                self.answered[cid] = result["id"]
                if tries == 1:
                    self.first_try.add(cid)
            self.slowest_answer = max(self.slowest_answer, time.monotonic() - started)
            self._unanswered = failed
            if self.client.closed.is_set():
                return False
            if failed:
                gevent.sleep(RETRY_PAUSE)
        return True


class Receiver:
    """Everything a connected client is sent, in order, duplicates included (a client with no dedupe)."""

    def __init__(self, client: Client):
        self.client = client
        self.ids: list[str] = []
        self.numbers: list[int] = []
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            message = self.client.messages.get()
            self.ids.append(message["id"])
            self.numbers.append(message["message"]["n"])

    def wait_for(self, ids, timeout: float = WAIT) -> float:
        """Seconds until every id in ``ids`` was received; the connection must stay open."""
        started = time.monotonic()
        wanted = set(ids)
        while not wanted <= set(self.ids):
            missing = len(wanted - set(self.ids))
            assert time.monotonic() - started < timeout, f"{missing} answered messages not received"
            assert not self.client.closed.is_set(), "the recipient's connection closed"
            gevent.sleep(0.02)
        return time.monotonic() - started

    def close(self) -> None:
        self._greenlet.kill()


def check_delivery(sender: Sender, received_ids: list[str], received_numbers: list[int]) -> None:
    """Each answered message received once and nothing else; first-try answers in the order sent.

    (A message answered only on a retry may have been stored at its first try or
    at a later one: its place among the others is either.)
    """
    assert len(received_ids) == len(set(received_ids)), "a message was delivered twice"
    assert set(received_ids) == set(sender.answered.values()), "received and answered messages differ"
    assert len(set(sender.answered.values())) == len(sender.answered), "two cids answered with one id"
    first_try = {sender.numbers[cid] for cid in sender.first_try}
    in_order = [n for n in received_numbers if n in first_try]
    assert in_order == sorted(in_order), "messages accepted in one order were delivered in another"


class StallingStore(SqliteStore):
    """A SQLite store whose next send blocks the store actor until released: a stuck disk or Redis,
    and an inbox that fills behind it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall = False
        self.stalled = gevent.event.Event()
        self.released = gevent.event.Event()

    def append_many(self, sends, now_ms):
        if self.stall:
            self.stall = False
            self.stalled.set()
            self.released.wait()
        return super().append_many(sends, now_ms)
