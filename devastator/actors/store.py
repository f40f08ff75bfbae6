"""The store actor: the one writer, committing many requests at once.

Every request that reaches the store actor waits in a queue until its inbox is
empty (or the queue is long); then the whole queue runs in one transaction with
one fsync, and only after the commit are the answers told. That is how
``msg.send`` answers after its message is durable without an fsync per message.
SQLite runs in this actor's greenlet: an fsync here costs well under a
millisecond, and a worker thread would make every statement wait for the GIL.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict

import gevent
import gevent.event
import pykka

from ..protocol.errors import Forbidden, InternalError, UnknownRecipient
from ..store import Store, UnknownDeviceError, UnknownUserError
from ..telemetry import Telemetry
from .messages import (
    Ack,
    Append,
    AttachDevice,
    Committed,
    DeviceAttached,
    DevicesRemoved,
    ExpireUser,
    FindPushDevice,
    Inspect,
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

log = logging.getLogger(__name__)


class StoreActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        store: Store,
        max_group: int = 2000,
        checkpoint_interval: float = 1.0,
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
        """Operators' reads; a tuple detail names what: ("user", id) or ("pending", user, device, limit)."""
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
        try:
            with self._store.batch():
                outcomes = self._apply_all(requests, now_ms)
        except Exception:
            log.exception("store commit of %d requests failed; each is answered with an internal error",
                          len(requests))
            outcomes = [_failed(request) for request in requests]
            telemetry.commit_failures += 1
        else:
            self.commits += 1
            self.committed_requests += len(requests)
            telemetry.commits += 1
            telemetry.commit_size.observe(len(requests))
            telemetry.commit_seconds.observe(time.perf_counter() - started)
        self._answer(requests, outcomes)
        self._checkpoint_if_due()

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
        """The outcome of each request, in order; consecutive sends go to the store together."""
        outcomes: list = []
        sends: list[Append] = []
        for request in requests:
            if isinstance(request, Append):
                sends.append(request)
                continue
            if sends:
                outcomes.extend(self._append_all(sends, now_ms))
                sends = []
            outcomes.append(self._apply(request, now_ms))
        if sends:
            outcomes.extend(self._append_all(sends, now_ms))
        return outcomes

    def _append_all(self, sends: list[Append], now_ms: int) -> list:
        """(SendResult, stored messages, push targets) for each send."""
        accepted_all = self._store.append_many(
            [(send.sender, send.recipients, send.message_json, send.cid, send.ttl) for send in sends], now_ms
        )
        outcomes = []
        for send, accepted in zip(sends, accepted_all, strict=True):
            if isinstance(accepted, UnknownUserError):
                error = UnknownRecipient(data={"unknown": list(accepted.args[0])})
                outcomes.append((SendResult(send.request_key, error=error), (), ()))
                continue
            result = SendResult(send.request_key, id=accepted.id, ts=accepted.ts)
            if accepted.messages:
                self._telemetry.messages_accepted += 1
            wake = ()
            if accepted.push_targets:
                by_recipient = {message.recipient: message for message in accepted.messages}
                wake = tuple((target, by_recipient[target.user]) for target in accepted.push_targets)
            outcomes.append((result, accepted.messages, wake))
        return outcomes

    def _apply(self, request, now_ms: int):
        store = self._store
        if isinstance(request, Ack):
            store.ack(request.user, request.device, request.seqs)
            return None
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
        committed: dict[pykka.ActorRef, list] = defaultdict(list)
        wake: dict[pykka.ActorRef, list] = defaultdict(list)
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(request, Append):
                result, messages, push_targets = outcome
                results[request.reply_to].append(result)
                if messages:
                    committed[request.notify].extend(messages)
                    wake[request.notify].extend(push_targets)
            elif isinstance(request, (LoadPending, AttachDevice, Register, PollRemovals, SetPushToken,
                                      FindPushDevice, ExpireUser)):
                tell_if_alive(request.reply_to, outcome)
        for ref, batch in committed.items():
            tell_if_alive(ref, Committed(tuple(batch), tuple(wake[ref])))
        for ref, batch in results.items():
            tell_if_alive(ref, SendResults(tuple(batch)))


def _failed(request):
    error = InternalError("the message store failed; retry later")
    if isinstance(request, Append):
        return SendResult(request.request_key, error=error), (), ()
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
    return None
