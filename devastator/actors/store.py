"""The store actor: the one writer, committing many requests at once.

Every request that reaches the store actor waits in a queue until its inbox is
empty (or the queue is long); then the whole queue runs in one transaction with
one fsync, and only after the commit are the answers told. A queue of nothing
but requests that answer nobody (ACKs: ``Route.may_wait``) waits up to
``hold`` for company: one message at a time, a device's ACK comes just before
its sender's next msg.send, and the two then share a commit instead of the
send waiting behind the ACK's (a commit costs ~100 µs of CPU and an fsync). That is how
``msg.send`` answers after its message is durable without an fsync per message.
SQLite's statements run in this actor's greenlet (in a worker thread every
statement would wait for the GIL); only the COMMIT, its fsync, runs in a worker
thread (SqliteStore), so that the event loop is not stalled while the disk syncs.

One table, ``ROUTES``, says how each type of request is served: its handler
(the store call, whose result is the request's outcome), its failure answer
(the outcome of a request whose call failed, was not tried, or whose group
rolled back) and its reply (how the outcome is told, and to whom, after the
commit). Adding a request is one entry. Consecutive requests of a ``grouped``
type go to the store in one call (``Append``: ``Store.append_many``).

Failures are answered truthfully, request by request. On a store whose batch
is all or nothing (SQLite), a failure rolls the whole group back and every
request of it is answered -32603. On one where each call stands on its own
(Redis), each request gets its own outcome: what landed is answered and told
to the router as committed, what did not is answered -32603, and a send that
may have landed without the store being able to tell names its recipients in
``Committed.recheck``, so that their user actors read their mailboxes again
(a retry with the same ``cid`` then completes exactly once). When the store
does not answer, the rest of the group is not tried, nor are the groups of
the next ``retry_interval``: they are answered at once, not after another
timeout. An outage is logged when it starts and when it ends (outage_log.py);
a bug is logged with its traceback, once per cause a minute.

Questions (``HealthQuery``, ``StoreStatsQuery``, ...: messages.py) are answered
at once, never queued behind the group.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable

import gevent
import gevent.event
import pykka
from gevent.pool import Group

from ..outage_log import OutageLog
from ..protocol.errors import Forbidden, InternalError, UnknownRecipient
from ..store import (
    COPY,
    receipt_type,
    PushTarget,
    Receipts,
    Send,
    Store,
    StoredMessage,
    StoreError,
    StoreUnavailableError,
    UnknownDeviceError,
    UnknownUserError,
)
from ..telemetry import Telemetry
from ..throttled_log import ThrottledLog
from .messages import (
    Ack,
    AddUser,
    Append,
    AttachDevice,
    CommitCountsQuery,
    Committed,
    DeviceAttached,
    DeviceRemovalDone,
    DevicesRemoved,
    ExpireUser,
    FindPushDevice,
    HealthQuery,
    HistoryLoaded,
    LoadHistory,
    LoadPending,
    LoadUser,
    MarkRead,
    PendingLoaded,
    PendingQuery,
    PollRemovals,
    PurgeExpired,
    PushDeviceFound,
    PushTokenSet,
    ReadMarked,
    Register,
    Registered,
    RemoveDevice,
    RemovePushToken,
    SendResult,
    SendResults,
    SetPushToken,
    StoredUserQuery,
    StoreStatsQuery,
    UserExpired,
    UserLoaded,
    tell_if_alive,
    tell_later,
)

log = logging.getLogger(__name__)

# Seconds after the store did not answer during which new groups are not tried.
RETRY_INTERVAL = 0.5
NOT_STORED = "the message store failed and the message was not stored; retry later"
MAYBE_STORED = (
    "the message store failed and the message may have been stored for some recipients;"
    " send it again with the same cid to have it stored once"
)
STORE_FAILED = "the message store failed; retry later"

# Seconds a queue of requests that answer nobody (ACKs) may wait for one that does.
HOLD = 0.005

# The questions the store actor answers at once.
QUERIES = (HealthQuery, CommitCountsQuery, StoreStatsQuery, StoredUserQuery, PendingQuery)


class StoreActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        store: Store,
        max_group: int = 2000,
        checkpoint_interval: float = 1.0,
        retry_interval: float = RETRY_INTERVAL,
        hold: float = HOLD,
        telemetry: Telemetry | None = None,
    ):
        super().__init__()
        self._store = store
        self._telemetry = telemetry or Telemetry()
        self._max_group = max_group
        self._queued: list = []
        self._hold = hold
        self._queue_may_wait = True  # every queued request may wait (Route.may_wait)
        self._holding = False  # the queue waits for company; _CommitDue ends the wait
        self._timers = Group()  # the hold's timer
        self.commits = 0
        self.committed_requests = 0
        self._checkpoint_interval = checkpoint_interval
        self._next_checkpoint = 0.0
        self._checkpointing: gevent.event.AsyncResult | None = None
        self._outage = OutageLog(log, "the message store")
        self._bugs = ThrottledLog(log)
        self._retry_interval = retry_interval
        self._retry_at = 0.0
        # The store did not answer, in this group or in one less than retry_interval ago.
        self._unanswered: StoreUnavailableError | None = None
        # The group being run: how many of its requests failed, and the first store failure.
        self._failed_requests = 0
        self._store_failure: StoreError | None = None

    def on_start(self) -> None:
        self._store.open()

    def on_stop(self) -> None:
        self._timers.kill()
        self._commit_queued()
        self._wait_checkpoint()
        self._store.close()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._timers.kill()
        self._wait_checkpoint()
        self._store.close()

    def on_receive(self, message):
        if type(message) is _CommitDue:
            self._holding = False
            self._commit_queued()
            return None
        query = isinstance(message, QUERIES)
        if not query:
            route = ROUTES.get(type(message))
            if route is not None:
                self._queued.append(message)
                self._queue_may_wait = self._queue_may_wait and route.may_wait
            else:  # a sender's bug: it would fail the whole group it joined
                self._bugs.warning(f"unknown {type(message).__name__}",
                                   "the store actor does not handle %r (dropped)", message)
        if len(self._queued) >= self._max_group:
            self._commit_queued()
        elif self._queued and self.actor_inbox.empty():
            if query or not self._hold or not self._queue_may_wait:  # a question sees what came before it
                self._commit_queued()
            elif not self._holding:
                self._holding = True
                tell_later(self._timers, self.actor_ref, _CommitDue(), self._hold)
        return self._answer_query(message) if query else None

    def _answer_query(self, query):
        if isinstance(query, HealthQuery):  # /healthz: answered even while the store fails
            if not self._outage.down:
                return {"failing": None}
            return {"failing": f"the message store has been failing for {self._outage.seconds():.1f} s:"
                               f" {self._outage.first_error}"}
        counts = {"commits": self.commits, "committed_requests": self.committed_requests}
        if isinstance(query, CommitCountsQuery):
            return counts
        if self._unanswered is not None and time.monotonic() < self._retry_at:
            raise self._unanswered  # not asked again while it does not answer
        store = self._store
        now_ms = int(time.time() * 1000)
        if isinstance(query, StoredUserQuery):
            return {
                "exists": store.has_user(query.user),
                "devices": store.list_devices(query.user),
                "backlog": store.backlog(query.user, now_ms),
            }
        if isinstance(query, PendingQuery):
            return {"messages": store.load_pending(query.user, query.device, 0, query.limit, now_ms)}
        return {**counts, **store.stats()}  # StoreStatsQuery

    def _commit_queued(self) -> None:
        if not self._queued:
            return
        requests, self._queued = self._queued, []
        self._queue_may_wait = True
        now_ms = int(time.time() * 1000)
        telemetry = self._telemetry
        started = time.perf_counter()
        self._failed_requests = 0
        self._store_failure = None
        if self._unanswered is not None and time.monotonic() >= self._retry_at:
            self._unanswered = None  # time to try the store again
        store = self._store
        try:
            with store.batch():
                outcomes = self._apply_all(requests, now_ms)
        except Exception as error:  # an all-or-nothing batch rolled back, or a bug (logged by _failure)
            self._failed_requests = 0
            self._failure(error, len(requests))
            may_have_landed = not store.all_or_nothing
            outcomes = [ROUTES[type(request)].failed(request, may_have_landed) for request in requests]
        if self._failed_requests:
            telemetry.commit_failures += 1
            failure = self._store_failure or self._unanswered  # a bug alone is no outage
            if failure is not None:
                self._outage.failed(failure, commits=1, requests=self._failed_requests)
            if self._unanswered is not None and time.monotonic() >= self._retry_at:
                self._retry_at = time.monotonic() + self._retry_interval
        else:
            self._outage.answered()
            self.commits += 1
            self.committed_requests += len(requests)
            telemetry.commits += 1
            telemetry.commit_size.observe(len(requests))
            telemetry.commit_seconds.observe(time.perf_counter() - started)
        replies = _Replies(telemetry)
        for request, outcome in zip(requests, outcomes, strict=True):
            ROUTES[type(request)].reply(request, outcome, replies)
        replies.tell_gathered()
        self._checkpoint_if_due()

    def _failure(self, error: Exception, requests: int = 1) -> None:
        """``requests`` of the group failed with ``error``: a store's failure, or a bug (logged here)."""
        self._failed_requests += requests
        if isinstance(error, StoreError):
            self._store_failure = self._store_failure or error
            if isinstance(error, StoreUnavailableError):
                self._unanswered = error
            return
        self._bugs.warning(
            f"{type(error).__name__}: {error}", "store request failed by a bug (answered -32603): %r", error,
            exc_info=error,
        )

    def _checkpoint_if_due(self) -> None:
        # In gevent's thread pool, one at a time: the event loop keeps serving.
        now = time.monotonic()
        running = self._checkpointing
        if now < self._next_checkpoint or (running is not None and not running.ready()):
            return
        if running is not None and not running.successful():
            log.error("store checkpoint failed: %r", running.exception)
        self._next_checkpoint = now + self._checkpoint_interval
        self._checkpointing = gevent.get_hub().threadpool.spawn(self._store.checkpoint)

    def _wait_checkpoint(self) -> None:
        if self._checkpointing is not None:
            self._checkpointing.wait(timeout=30)

    def _apply_all(self, requests: list, now_ms: int) -> list:
        """The outcome of each request, in order; consecutive requests of a grouped type go to the store together.

        On an all-or-nothing store a failure raises (the batch rolls back);
        on another each request gets its own, and once the store did not
        answer, the requests left are failed without a try.
        """
        outcomes: list = []
        for kind, run in groupby(requests, key=type):
            route = ROUTES[kind]
            if route.grouped:
                outcomes.extend(self._run(route, list(run), now_ms))
            else:
                for request in run:
                    outcomes.extend(self._run(route, [request], now_ms))
        return outcomes

    def _run(self, route: Route, requests: list, now_ms: int) -> list:
        """The outcomes of one request, or of a run of a grouped type's, through its route."""
        if self._unanswered is not None:
            self._failed_requests += len(requests)
            return [route.failed(request, False) for request in requests]
        store = self._store
        try:
            if route.grouped:
                outcomes = route.handle(store, requests, now_ms)
            else:
                outcomes = [route.handle(store, requests[0], now_ms)]
        except Exception as error:  # its own outcome; a bug is logged with its traceback
            if store.all_or_nothing:
                raise
            self._failure(error, len(requests))
            if not route.grouped and isinstance(error, StoreError):
                return [route.failed_on_its_own(requests[0], error)]
            # Not told what landed of a group: each may have, for all its recipients.
            return [route.failed(request, True) for request in requests]
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, StoreError):  # one of a group that failed on its own
                self._failure(outcome)
                outcomes[index] = route.failed_on_its_own(requests[index], outcome)
        return outcomes


# -- the dispatch table -------------------------------------------------------------------


class _CommitDue:
    """The hold is over: commit what waits (told by the actor's own timer)."""


@dataclass(frozen=True, slots=True)
class Route:
    """How the store actor serves one type of request.

    ``handle(store, request, now_ms)`` is the store call; what it returns is
    the request's outcome (a grouped type's gets the run of requests and
    returns an outcome, or the StoreError it failed with, for each).
    ``failed(request, may_have_landed)`` is the outcome when its call failed,
    was not tried or its group rolled back; ``may_have_landed`` when the
    store could not say. ``failed_after(request, error)`` is the outcome of a
    call that failed on its own (not all-or-nothing) with a StoreError that
    says what it stored first. ``reply(request, outcome, replies)`` tells the
    outcome after the commit.
    """

    handle: Callable[[Store, Any, int], Any]
    failed: Callable[[Any, bool], Any]
    reply: Callable[[Any, Any, _Replies], None]
    grouped: bool = False
    failed_after: Callable[[Any, StoreError], Any] | None = None  # None: failed(request, True)
    # It answers nobody, so it may wait (StoreActor's hold) for a request that does.
    may_wait: bool = False

    def failed_on_its_own(self, request, error: StoreError):
        if self.failed_after is None:
            return self.failed(request, True)
        return self.failed_after(request, error)


class _Replies:
    """What one commit tells: answers to their askers at once, in acceptance order;
    Committed and SendResults gathered, one tell per actor, told after them."""

    def __init__(self, telemetry: Telemetry):
        self.telemetry = telemetry
        self._results: dict[pykka.ActorRef, list[SendResult]] = defaultdict(list)
        # notify ref -> (stored messages, push targets to wake, users to recheck)
        self._committed: dict[pykka.ActorRef, tuple[list, list, dict]] = {}

    def send_result(self, reply_to: pykka.ActorRef, result: SendResult) -> None:
        self._results[reply_to].append(result)

    def committed(self, notify: pykka.ActorRef, messages, wake, recheck=()) -> None:
        stored, woken, users = self._committed.setdefault(notify, ([], [], {}))
        stored.extend(messages)
        woken.extend(wake)
        users.update(dict.fromkeys(recheck))

    def tell_gathered(self) -> None:
        for ref, (stored, wake, users) in self._committed.items():
            tell_if_alive(ref, Committed(tuple(stored), tuple(wake), recheck=tuple(users)))
        for ref, batch in self._results.items():
            tell_if_alive(ref, SendResults(tuple(batch)))


@dataclass(frozen=True, slots=True)
class _ReceiptsDespiteFailure:
    """An ACK or msg.read the store failed after it had stored these receipts."""

    receipts: Receipts


def _wake(messages: tuple[StoredMessage, ...], push_targets: tuple[PushTarget, ...]) -> tuple:
    """(push target, the newest entry stored for its user) for each target."""
    if not push_targets:
        return ()
    by_recipient = {message.recipient: message for message in messages}
    return tuple((target, by_recipient[target.user]) for target in push_targets)


def _store_failed() -> InternalError:
    return InternalError(STORE_FAILED)


# -- replies --


def _tell_asker(request, outcome, replies: _Replies) -> None:
    tell_if_alive(request.reply_to, outcome)


def _no_reply(request, outcome, replies: _Replies) -> None:
    return None


# -- msg.send: Append, grouped --


def _append_many(store: Store, sends: list[Append], now_ms: int) -> list:
    """(SendResult, stored messages, push targets to wake, recipients to recheck) for each send, or its StoreError."""
    accepted_all = store.append_many(
        [
            Send(send.sender, send.recipients, send.message_json, send.cid, send.ttl, send.receipt,
                 send.to_json, send.origin_device)
            for send in sends
        ],
        now_ms,
    )
    outcomes: list = []
    for send, accepted in zip(sends, accepted_all, strict=True):
        if isinstance(accepted, UnknownUserError):
            error = UnknownRecipient(data={"unknown": list(accepted.args[0])})
            outcomes.append((SendResult(send.request_key, error=error), (), (), ()))
        elif isinstance(accepted, StoreError):
            outcomes.append(accepted)
        else:
            result = SendResult(send.request_key, id=accepted.id, ts=accepted.ts)
            outcomes.append((result, accepted.messages, _wake(accepted.messages, accepted.push_targets),
                             accepted.recheck))
    return outcomes


def _send_failed(send: Append, may_have_landed: bool):
    result = SendResult(send.request_key, error=InternalError(MAYBE_STORED if may_have_landed else NOT_STORED))
    return result, (), (), send.recipients if may_have_landed else ()


def _send_failed_after(send: Append, error: StoreError):
    # What it stored for some recipients is told; those it may have reached are rechecked.
    result = SendResult(send.request_key, error=InternalError(MAYBE_STORED if error.recheck else NOT_STORED))
    return result, error.messages, _wake(error.messages, error.push_targets), error.recheck


def _reply_send(send: Append, outcome, replies: _Replies) -> None:
    result, messages, wake, recheck = outcome
    replies.send_result(send.reply_to, result)
    if messages and result.error is None:
        replies.telemetry.messages_accepted += 1  # a retried cid that stored nothing is not counted
    if messages and messages[-1].kind == COPY:  # a copy comes last (Store.append)
        replies.telemetry.copies_stored += 1
    if messages or recheck:
        replies.committed(send.notify, messages, wake, recheck)


# -- ACKs and msg.read: receipts, told like a send's entries --


def _ack(store: Store, request: Ack, now_ms: int) -> Receipts:
    return store.ack(request.user, request.device, request.seqs, now_ms)


def _mark_read(store: Store, request: MarkRead, now_ms: int) -> Receipts:
    return store.mark_read(request.user, request.ids, now_ms)


def _receipts_failed(request, may_have_landed: bool) -> None:
    return None


def _receipts_failed_after(request, error: StoreError) -> _ReceiptsDespiteFailure | None:
    # Receipts it stored before failing: told all the same (retrying stores them once).
    return _ReceiptsDespiteFailure(Receipts(error.messages, error.push_targets)) if error.messages else None


def _reply_receipts(request: Ack | MarkRead, outcome, replies: _Replies) -> None:
    receipts = outcome.receipts if isinstance(outcome, _ReceiptsDespiteFailure) else outcome
    if isinstance(receipts, Receipts) and receipts.messages and request.notify is not None:
        for receipt in receipts.messages:
            replies.telemetry.receipts_stored[receipt_type(receipt.id)] += 1
        replies.committed(request.notify, receipts.messages, _wake(receipts.messages, receipts.push_targets))


def _reply_read(request: MarkRead, outcome, replies: _Replies) -> None:
    _reply_receipts(request, outcome, replies)
    error = None if isinstance(outcome, Receipts) else _store_failed()
    tell_if_alive(request.reply_to, ReadMarked(request.request_key, error))


# -- deliveries and devices --


def _load_pending(store: Store, request: LoadPending, now_ms: int) -> PendingLoaded:
    messages = store.load_pending(request.user, request.device, request.after_seq, request.limit, now_ms)
    return PendingLoaded(request.device, request.after_seq, tuple(messages), complete=len(messages) < request.limit)


def _pending_failed(request: LoadPending, may_have_landed: bool) -> PendingLoaded:
    return PendingLoaded(request.device, request.after_seq, (), complete=False, failed=True)


def _attach_device(store: Store, request: AttachDevice, now_ms: int) -> DeviceAttached:
    try:
        attachment = store.attach_device(request.user, request.device, request.registration, now_ms)
    except UnknownUserError:
        error = Forbidden("the user of these credentials does not exist")
    except UnknownDeviceError:
        error = Forbidden("these credentials were revoked: the device was removed")
    else:
        return DeviceAttached(request.device, request.device_ref, request.request_key, pending=attachment.pending)
    return DeviceAttached(request.device, request.device_ref, request.request_key, error=error)


def _attach_failed(request: AttachDevice, may_have_landed: bool) -> DeviceAttached:
    return DeviceAttached(request.device, request.device_ref, request.request_key, error=_store_failed())


def _register(store: Store, request: Register, now_ms: int) -> Registered:
    store.add_user(request.user, now_ms)
    registration = store.add_device(request.user, request.device, now_ms)
    return Registered(request.request_key, request.user, request.device, registration)


def _register_failed(request: Register, may_have_landed: bool) -> Registered:
    return Registered(request.request_key, request.user, request.device, error=_store_failed())


def _poll_removals(store: Store, request: PollRemovals, now_ms: int) -> DevicesRemoved:
    removed = store.removed_devices(request.after)
    return DevicesRemoved(removed.cursor, removed.devices)


def _poll_failed(request: PollRemovals, may_have_landed: bool) -> DevicesRemoved:
    return DevicesRemoved(request.after, ())  # polled again from the same cursor


# -- push tokens --


def _set_push_token(store: Store, request: SetPushToken, now_ms: int) -> PushTokenSet:
    if store.set_push_token(request.user, request.device, request.platform, request.token):
        return PushTokenSet(request.request_key)
    return PushTokenSet(request.request_key, error=Forbidden("this device was removed"))


def _push_token_failed(request: SetPushToken, may_have_landed: bool) -> PushTokenSet:
    return PushTokenSet(request.request_key, error=_store_failed())


def _find_push_device(store: Store, request: FindPushDevice, now_ms: int) -> PushDeviceFound:
    found = store.device_for_push_token(request.platform, request.token)
    return PushDeviceFound(request.request_key, *(found or (None, None)))


def _push_device_failed(request: FindPushDevice, may_have_landed: bool) -> PushDeviceFound:
    return PushDeviceFound(request.request_key, None, None)


def _remove_push_token(store: Store, request: RemovePushToken, now_ms: int) -> None:
    target = request.target
    store.remove_push_token(target.user, target.device, target.platform, target.token)


# -- expiry and history --


def _expire_user(store: Store, request: ExpireUser, now_ms: int) -> UserExpired:
    return UserExpired(request.request_key, store.expire_user(request.user, now_ms))


def _expire_failed(request: ExpireUser, may_have_landed: bool) -> UserExpired:
    return UserExpired(request.request_key, 0)


def _reply_expired(request: ExpireUser, outcome: UserExpired, replies: _Replies) -> None:
    replies.telemetry.messages_expired += outcome.count
    tell_if_alive(request.reply_to, outcome)


def _purge_expired(store: Store, request: PurgeExpired, now_ms: int) -> int:
    return store.purge_expired(now_ms)


def _reply_purged(request: PurgeExpired, purged: int | None, replies: _Replies) -> None:
    if purged:  # None: the purge failed
        replies.telemetry.messages_expired += purged
        log.debug("expired %d messages", purged)


def _load_history(store: Store, request: LoadHistory, now_ms: int) -> HistoryLoaded:
    try:
        page = store.history(request.user, request.peer, request.before, request.limit, now_ms)
    except UnknownUserError as unknown:
        return HistoryLoaded(request.request_key, error=UnknownRecipient(
            f"no user {request.peer!r}", data={"unknown": list(unknown.args[0])}))
    return HistoryLoaded(request.request_key, page.messages, page.more)


def _history_failed(request: LoadHistory, may_have_landed: bool) -> HistoryLoaded:
    return HistoryLoaded(request.request_key, error=_store_failed())


# -- the server API's own (actors/api.py) --


def _add_user(store: Store, request: AddUser, now_ms: int) -> None:
    store.add_user(request.user, now_ms)


def _load_user(store: Store, request: LoadUser, now_ms: int) -> UserLoaded:
    if not store.has_user(request.user):
        return UserLoaded(request.request_key)
    devices = tuple(record.device for record in store.list_devices(request.user))
    backlog = store.backlog(request.user, now_ms)
    return UserLoaded(request.request_key, True, devices,
                      tuple((device, count) for device, (count, _) in backlog.items()))


def _user_failed(request: LoadUser, may_have_landed: bool) -> UserLoaded:
    return UserLoaded(request.request_key, error=_store_failed())


def _remove_device(store: Store, request: RemoveDevice, now_ms: int) -> DeviceRemovalDone:
    if not store.has_user(request.user):
        return DeviceRemovalDone(request.request_key, unknown_user=True)
    return DeviceRemovalDone(request.request_key, removed=store.remove_device(request.user, request.device, now_ms))


def _removal_failed(request: RemoveDevice, may_have_landed: bool) -> DeviceRemovalDone:
    return DeviceRemovalDone(request.request_key, error=_store_failed())


def _nothing_failed(request, may_have_landed: bool) -> None:
    return None  # a request nobody waits on: its failure is logged and counted, not answered


ROUTES: dict[type, Route] = {
    Append: Route(_append_many, _send_failed, _reply_send, grouped=True, failed_after=_send_failed_after),
    Ack: Route(_ack, _receipts_failed, _reply_receipts, failed_after=_receipts_failed_after, may_wait=True),
    MarkRead: Route(_mark_read, _receipts_failed, _reply_read, failed_after=_receipts_failed_after),
    LoadPending: Route(_load_pending, _pending_failed, _tell_asker),
    AttachDevice: Route(_attach_device, _attach_failed, _tell_asker),
    Register: Route(_register, _register_failed, _tell_asker),
    PollRemovals: Route(_poll_removals, _poll_failed, _tell_asker),
    SetPushToken: Route(_set_push_token, _push_token_failed, _tell_asker),
    FindPushDevice: Route(_find_push_device, _push_device_failed, _tell_asker),
    RemovePushToken: Route(_remove_push_token, _nothing_failed, _no_reply),
    ExpireUser: Route(_expire_user, _expire_failed, _reply_expired),
    PurgeExpired: Route(_purge_expired, _nothing_failed, _reply_purged),
    LoadHistory: Route(_load_history, _history_failed, _tell_asker),
    AddUser: Route(_add_user, _nothing_failed, _no_reply),
    LoadUser: Route(_load_user, _user_failed, _tell_asker),
    RemoveDevice: Route(_remove_device, _removal_failed, _tell_asker),
}
