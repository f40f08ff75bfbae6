"""The store actor: the one writer, committing many requests at once.

Every request that reaches the store actor waits in a queue until its inbox is
empty (or the queue is long); then the whole queue runs in one transaction with
one fsync, and only after the commit are the answers told. That is how
``msg.send`` answers after its message is durable without an fsync per message.
SQLite's statements run in this actor's greenlet (in a worker thread every
statement would wait for the GIL); only the COMMIT, its fsync, runs in a worker
thread (SqliteStore), so that the event loop is not stalled while the disk syncs.

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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import time
from collections import defaultdict

import gevent
import gevent.event
import pykka

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
    Append,
    AttachDevice,
    Committed,
    DeviceAttached,
    DevicesRemoved,
    ExpireUser,
    FindPushDevice,
    HistoryLoaded,
    Inspect,
    LoadHistory,
    MarkRead,
    ReadMarked,
    LoadPending,
    PendingLoaded,
    PollRemovals,
    PurgeExpired,
    PushDeviceFound,
    PushTokenSet,
    Register,
    Registered,
    RemovePushToken,
    SendResult,
    SendResults,
    SetPushToken,
    UserExpired,
    tell_if_alive,
)
from .messages import AddUser, DeviceRemovalDone, LoadUser, RemoveDevice, UserLoaded  # the server API

log = logging.getLogger(__name__)

# Seconds after the store did not answer during which new groups are not tried.
RETRY_INTERVAL = 0.5
NOT_STORED = "the message store failed and the message was not stored; retry later"
MAYBE_STORED = (
    "the message store failed and the message may have been stored for some recipients;"
    " send it again with the same cid to have it stored once"
)


class StoreActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        store: Store,
        max_group: int = 2000,
        checkpoint_interval: float = 1.0,
        retry_interval: float = RETRY_INTERVAL,
        telemetry: Telemetry | None = None,
    ):
        super().__init__()
        self._store = store
        self._telemetry = telemetry or Telemetry()
        self._max_group = max_group
        self._queued: list = []
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
        self._commit_queued()
        self._wait_checkpoint()
        self._store.close()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._wait_checkpoint()
        self._store.close()

    def on_receive(self, message):
        if not isinstance(message, Inspect):
            self._queued.append(message)
        if len(self._queued) >= self._max_group or self.actor_inbox.empty():
            self._commit_queued()
        if isinstance(message, Inspect):
            return self._inspect(message.detail)
        return None

    def _inspect(self, detail) -> dict:
        """Operators' reads; a tuple detail names what: ("user", id) or ("pending", user, device, limit).

        "health" (/healthz) answers {"failing": since when and why} while the store is failing.
        """
        if detail == "health":
            if not self._outage.down:
                return {"failing": None}
            return {"failing": f"the message store has been failing for {self._outage.seconds():.1f} s:"
                               f" {self._outage.first_error}"}
        if detail is not None and self._unanswered is not None and time.monotonic() < self._retry_at:
            raise self._unanswered
        store = self._store
        now_ms = int(time.time() * 1000)
        if isinstance(detail, tuple) and detail[0] == "user":
            user = detail[1]
            return {
                "exists": store.has_user(user),
                "devices": store.list_devices(user),
                "backlog": store.backlog(user, now_ms),
            }
        if isinstance(detail, tuple) and detail[0] == "pending":
            _, user, device, limit = detail
            return {"messages": store.load_pending(user, device, 0, limit, now_ms)}
        inspected = {"commits": self.commits, "committed_requests": self.committed_requests}
        if detail == "stats":
            inspected.update(store.stats())
        return inspected

    def _commit_queued(self) -> None:
        if not self._queued:
            return
        requests, self._queued = self._queued, []
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
            outcomes = [_failed(request, recheck=not store.all_or_nothing) for request in requests]
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
        self._answer(requests, outcomes)
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
        """The outcome of each request, in order; consecutive sends go to the store together.

        On an all-or-nothing store a failure raises (the batch rolls back);
        on another each request gets its own, and once the store did not
        answer, the requests left are failed without a try.
        """
        outcomes: list = []
        sends: list[Append] = []
        for request in requests:
            if isinstance(request, Append):
                sends.append(request)
                continue
            if sends:
                outcomes.extend(self._append_all(sends, now_ms))
                sends = []
            outcomes.append(self._apply_one(request, now_ms))
        if sends:
            outcomes.extend(self._append_all(sends, now_ms))
        return outcomes

    def _apply_one(self, request, now_ms: int):
        if self._unanswered is not None:
            self._failed_requests += 1
            return _failed(request)
        if self._store.all_or_nothing:
            return self._apply(request, now_ms)
        try:
            return self._apply(request, now_ms)
        except Exception as error:  # its own outcome; a bug is logged with its traceback
            self._failure(error)
            if isinstance(request, (Ack, MarkRead)) and isinstance(error, StoreError) and error.messages:
                # Receipts it stored before failing: told all the same (retrying stores them once).
                return _ReceiptsDespiteFailure(Receipts(error.messages, error.push_targets))
            return _failed(request)

    def _append_all(self, sends: list[Append], now_ms: int) -> list:
        """(SendResult, stored messages, push targets, recipients to recheck) for each send."""
        if self._unanswered is not None:
            self._failed_requests += len(sends)
            return [_failed(send) for send in sends]
        store = self._store
        try:
            accepted_all = store.append_many(
                [
                    Send(send.sender, send.recipients, send.message_json, send.cid, send.ttl, send.receipt,
                         send.to_json, send.origin_device)
                    for send in sends
                ],
                now_ms,
            )
        except Exception as error:
            if store.all_or_nothing:
                raise
            # Not told what landed: every send is failed, its recipients rechecked.
            accepted_all = [StoreError(str(error), recheck=send.recipients) for send in sends]
            self._failure(error, len(sends))
        else:
            for accepted in accepted_all:
                if isinstance(accepted, StoreError):
                    self._failure(accepted)
        outcomes = []
        for send, accepted in zip(sends, accepted_all, strict=True):
            if isinstance(accepted, UnknownUserError):
                error = UnknownRecipient(data={"unknown": list(accepted.args[0])})
                outcomes.append((SendResult(send.request_key, error=error), (), (), ()))
            elif isinstance(accepted, StoreError):
                error = InternalError(MAYBE_STORED if accepted.recheck else NOT_STORED)
                wake = _wake(accepted.messages, accepted.push_targets)
                outcomes.append((SendResult(send.request_key, error=error), accepted.messages, wake, accepted.recheck))
            else:
                result = SendResult(send.request_key, id=accepted.id, ts=accepted.ts)
                wake = _wake(accepted.messages, accepted.push_targets)
                outcomes.append((result, accepted.messages, wake, accepted.recheck))
        return outcomes

    def _apply(self, request, now_ms: int):
        store = self._store
        if isinstance(request, Ack):
            return store.ack(request.user, request.device, request.seqs, now_ms)
        if isinstance(request, MarkRead):
            return store.mark_read(request.user, request.ids, now_ms)
        if isinstance(request, LoadHistory):
            try:
                page = store.history(request.user, request.peer, request.before, request.limit, now_ms)
            except UnknownUserError as unknown:
                return HistoryLoaded(request.request_key, error=UnknownRecipient(
                    f"no user {request.peer!r}", data={"unknown": list(unknown.args[0])}))
            return HistoryLoaded(request.request_key, page.messages, page.more)
        if isinstance(request, LoadPending):
            messages = store.load_pending(
                request.user, request.device, request.after_seq, request.limit, now_ms
            )
            return PendingLoaded(
                request.device, request.after_seq, tuple(messages), complete=len(messages) < request.limit
            )
        if isinstance(request, AttachDevice):
            try:
                attachment = store.attach_device(request.user, request.device, request.registration, now_ms)
            except UnknownUserError:
                error = Forbidden("the user of these credentials does not exist")
            except UnknownDeviceError:
                error = Forbidden("these credentials were revoked: the device was removed")
            else:
                return DeviceAttached(
                    request.device, request.device_ref, request.request_key, pending=attachment.pending
                )
            return DeviceAttached(request.device, request.device_ref, request.request_key, error=error)
        if isinstance(request, Register):
            store.add_user(request.user, now_ms)
            registration = store.add_device(request.user, request.device, now_ms)
            return Registered(request.request_key, request.user, request.device, registration)
        if isinstance(request, PollRemovals):
            removed = store.removed_devices(request.after)
            return DevicesRemoved(removed.cursor, removed.devices)
        if isinstance(request, SetPushToken):
            if store.set_push_token(request.user, request.device, request.platform, request.token):
                return PushTokenSet(request.request_key)
            return PushTokenSet(request.request_key, error=Forbidden("this device was removed"))
        if isinstance(request, ExpireUser):
            expired = store.expire_user(request.user, now_ms)
            self._telemetry.messages_expired += expired
            return UserExpired(request.request_key, expired)
        if isinstance(request, FindPushDevice):
            found = store.device_for_push_token(request.platform, request.token)
            return PushDeviceFound(request.request_key, *(found or (None, None)))
        if isinstance(request, RemovePushToken):
            target = request.target
            store.remove_push_token(target.user, target.device, target.platform, target.token)
            return None
        if isinstance(request, (AddUser, LoadUser, RemoveDevice)):
            return _apply_api(store, request, now_ms)
        if isinstance(request, PurgeExpired):
            purged = store.purge_expired(now_ms)
            self._telemetry.messages_expired += purged
            if purged:
                log.debug("expired %d messages", purged)
            return None
        raise TypeError(f"the store actor does not handle {type(request).__name__}")

    def _answer(self, requests, outcomes) -> None:
        # One tell per recipient actor per commit, in acceptance order.
        results: dict[pykka.ActorRef, list[SendResult]] = defaultdict(list)
        # notify ref -> (stored messages, push targets to wake, users to recheck)
        committed: dict[pykka.ActorRef, tuple[list, list, dict]] = {}
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(request, Append):
                result, messages, push_targets, recheck = outcome
                results[request.reply_to].append(result)
                if messages and result.error is None:
                    self._telemetry.messages_accepted += 1  # a retried cid that stored nothing is not counted
                if messages and messages[-1].kind == COPY:  # a copy comes last (Store.append)
                    self._telemetry.copies_stored += 1
                if messages or recheck:
                    stored, wake, users = committed.setdefault(request.notify, ([], [], {}))
                    stored.extend(messages)
                    wake.extend(push_targets)
                    users.update(dict.fromkeys(recheck))
            elif isinstance(request, (Ack, MarkRead)):
                # Receipts stored (also by a call that failed after): told to the router like a
                # send's entries, the sender's devices woken.
                failed = not isinstance(outcome, Receipts)
                receipts = outcome.receipts if isinstance(outcome, _ReceiptsDespiteFailure) else outcome
                if isinstance(receipts, Receipts) and receipts.messages and request.notify is not None:
                    for receipt in receipts.messages:
                        self._telemetry.receipts_stored[receipt_type(receipt.id)] += 1
                    stored, wake, _ = committed.setdefault(request.notify, ([], [], {}))
                    stored.extend(receipts.messages)
                    wake.extend(_wake(receipts.messages, receipts.push_targets))
                if isinstance(request, MarkRead):
                    error = InternalError("the message store failed; retry later") if failed else None
                    tell_if_alive(request.reply_to, ReadMarked(request.request_key, error))
            elif isinstance(request, (LoadPending, AttachDevice, Register, PollRemovals, SetPushToken,
                                      FindPushDevice, ExpireUser, LoadHistory, LoadUser, RemoveDevice)):
                tell_if_alive(request.reply_to, outcome)
        for ref, (stored, wake, users) in committed.items():
            tell_if_alive(ref, Committed(tuple(stored), tuple(wake), recheck=tuple(users)))
        for ref, batch in results.items():
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


def _failed(request, *, recheck: bool = False):
    """A failed request's outcome; ``recheck``: a send's recipients may have it all the same."""
    error = InternalError("the message store failed; retry later")
    if isinstance(request, Append):
        result = SendResult(request.request_key, error=InternalError(MAYBE_STORED if recheck else NOT_STORED))
        return result, (), (), request.recipients if recheck else ()
    if isinstance(request, LoadPending):
        return PendingLoaded(request.device, request.after_seq, (), complete=False, failed=True)
    if isinstance(request, AttachDevice):
        return DeviceAttached(request.device, request.device_ref, request.request_key, error=error)
    if isinstance(request, Register):
        return Registered(request.request_key, request.user, request.device, error=error)
    if isinstance(request, PollRemovals):
        return DevicesRemoved(request.after, ())
    if isinstance(request, SetPushToken):
        return PushTokenSet(request.request_key, error=error)
    if isinstance(request, FindPushDevice):
        return PushDeviceFound(request.request_key, None, None)
    if isinstance(request, ExpireUser):
        return UserExpired(request.request_key, 0)
    if isinstance(request, LoadHistory):
        return HistoryLoaded(request.request_key, error=error)
    if isinstance(request, LoadUser):
        return UserLoaded(request.request_key, error=error)
    if isinstance(request, RemoveDevice):
        return DeviceRemovalDone(request.request_key, error=error)
    return None


def _apply_api(store: Store, request, now_ms: int):
    """The server API's own requests (actors/api.py)."""
    if isinstance(request, AddUser):
        store.add_user(request.user, now_ms)
        return None
    if isinstance(request, LoadUser):
        if not store.has_user(request.user):
            return UserLoaded(request.request_key)
        devices = tuple(record.device for record in store.list_devices(request.user))
        backlog = store.backlog(request.user, now_ms)
        return UserLoaded(request.request_key, True, devices,
                          tuple((device, count) for device, (count, _) in backlog.items()))
    if not store.has_user(request.user):
        return DeviceRemovalDone(request.request_key, unknown_user=True)
    return DeviceRemovalDone(request.request_key, removed=store.remove_device(request.user, request.device, now_ms))
