"""Tests of the store actor's dispatch table: each request type's failure answer and reply.

A store whose every call fails stands behind the actor, all or nothing
(SQLite: the group rolls back) or call by call (Redis: each request its own
outcome). Each request type of ``ROUTES`` is told once and its asker must be
answered what its entry says; a type added to the table without a case here
fails the first test.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest

from devastator.actors import StoreActor
from devastator.actors.messages import (
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
    HistoryLoaded,
    LoadHistory,
    LoadPending,
    LoadUser,
    MarkRead,
    PendingLoaded,
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
    UserExpired,
    UserLoaded,
)
from devastator.actors.store import MAYBE_STORED, NOT_STORED, ROUTES, STORE_FAILED
from devastator.protocol.errors import INTERNAL_ERROR, RpcError
from devastator.store import PushTarget, SqliteStore, StoreError
from devastator.telemetry import Telemetry

from actor_fakes import Recorder

FAILED = (INTERNAL_ERROR, STORE_FAILED)


class _FailingStore:
    """Fails every store call with a StoreError (and records its name); opens, closes and batches."""

    def __init__(self, all_or_nothing: bool):
        self.all_or_nothing = all_or_nothing
        self.calls: list[str] = []

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.opened = False

    def checkpoint(self) -> None:
        self.checkpointed = True

    @contextlib.contextmanager
    def batch(self):
        yield  # nothing to roll back: every call failed before it changed anything

    def __getattr__(self, name: str):
        def fail(*args):
            self.calls.append(name)
            raise StoreError(f"{name} failed")

        return fail


def plain(value):
    """``value`` with each RpcError in it as (code, message), so that answers compare with ==."""
    if isinstance(value, RpcError):
        return (value.code, value.message)
    if isinstance(value, tuple):
        return tuple(plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)})
    return value


TARGET = PushTarget("alice", "phone", "fcm", "token-1")


def cases(asker, router, *, all_or_nothing: bool) -> dict[type, tuple]:
    """For each request type: (the request, what its asker is told, what the router is told)."""
    send_error = (INTERNAL_ERROR, NOT_STORED if all_or_nothing else MAYBE_STORED)
    # A send that failed on a store of independent calls may have landed: its recipients are rechecked.
    send_recheck = [] if all_or_nothing else [Committed((), (), recheck=("alice", "carol"))]
    a, r = asker.ref, router.ref
    return {
        Append: (Append("bob", ("alice", "carol"), b'"hi"', "c-1", 60, 1, a, r),
                 [SendResults((SendResult(1, error=send_error),))], send_recheck),
        Ack: (Ack("alice", "phone", (3,), r), [], []),
        MarkRead: (MarkRead("alice", ("m-1",), 2, a, r), [ReadMarked(2, FAILED)], []),
        LoadPending: (LoadPending("alice", "phone", 4, 10, a),
                      [PendingLoaded("phone", 4, (), complete=False, failed=True)], []),
        AttachDevice: (AttachDevice("alice", "phone", "reg", r, 3, a), [DeviceAttached("phone", r, 3, error=FAILED)], []),
        Register: (Register("alice", "tablet", 4, a), [Registered(4, "alice", "tablet", error=FAILED)], []),
        PollRemovals: (PollRemovals(17, a), [DevicesRemoved(17, ())], []),
        SetPushToken: (SetPushToken("alice", "phone", "fcm", "t", 5, a), [PushTokenSet(5, FAILED)], []),
        FindPushDevice: (FindPushDevice("fcm", "t", 6, a), [PushDeviceFound(6, None, None)], []),
        RemovePushToken: (RemovePushToken(TARGET), [], []),
        ExpireUser: (ExpireUser("alice", 7, a), [UserExpired(7, 0)], []),
        PurgeExpired: (PurgeExpired(), [], []),
        LoadHistory: (LoadHistory("alice", "bob", None, 20, 8, a), [HistoryLoaded(8, error=FAILED)], []),
        AddUser: (AddUser("dave"), [], []),
        LoadUser: (LoadUser("alice", 9, a), [UserLoaded(9, error=FAILED)], []),
        RemoveDevice: (RemoveDevice("alice", "phone", 10, a), [DeviceRemovalDone(10, error=FAILED)], []),
    }


def test_every_route_has_a_case_here():
    assert set(cases(Recorder("asker"), Recorder("router"), all_or_nothing=True)) == set(ROUTES)


@pytest.mark.parametrize("all_or_nothing", [True, False], ids=["all-or-nothing", "call-by-call"])
@pytest.mark.parametrize("kind", list(ROUTES), ids=lambda kind: kind.__name__)
def test_a_request_whose_store_call_fails_is_answered_its_route_s_failure_answer(kind, all_or_nothing):
    asker, router = Recorder("asker"), Recorder("router")
    request, asker_told, router_told = cases(asker, router, all_or_nothing=all_or_nothing)[kind]
    store, telemetry = _FailingStore(all_or_nothing), Telemetry()
    ref = StoreActor.start(store=store, telemetry=telemetry)
    ref.ask(CommitCountsQuery())  # started: the request below is a group of its own

    ref.tell(request)
    counts = ref.ask(CommitCountsQuery())  # answered after the group ran and told its answers

    assert store.calls, "the store was not tried"
    assert [plain(told) for told in asker.drain()] == asker_told
    assert router.drain() == router_told
    assert counts == {"commits": 0, "committed_requests": 0}
    assert telemetry.commit_failures == 1


def test_a_whole_group_rolled_back_answers_each_request_in_order_and_each_asker_once():
    asker, router = Recorder("asker"), Recorder("router")
    requests = cases(asker, router, all_or_nothing=True)
    ref = StoreActor.start(store=_FailingStore(all_or_nothing=True), telemetry=Telemetry())
    ref.ask(CommitCountsQuery())
    # Told in one go, they wait in one group: one failure rolls every one of them back.
    ordered = [Append, LoadPending, Append, Register, MarkRead, LoadUser]
    for kind in ordered:
        ref.tell(requests[kind][0])
    ref.ask(CommitCountsQuery())

    told = [plain(message) for message in asker.drain()]
    # Direct answers in acceptance order, then one SendResults for both sends (the same key here).
    expected = [answer for kind in ordered if kind is not Append for answer in requests[kind][1]]
    (send_result,) = requests[Append][1][0].results
    assert told == [*expected, SendResults((send_result, send_result))]
    assert router.drain() == []


def test_a_message_the_store_actor_does_not_handle_is_dropped_and_the_group_goes_on(tmp_path, caplog):
    asker = Recorder("asker")
    ref = StoreActor.start(store=SqliteStore(tmp_path / "store.db", synchronous="NORMAL"), telemetry=Telemetry())
    ref.ask(CommitCountsQuery())

    ref.tell("not a request")
    ref.tell(Register("alice", "phone", 1, asker.ref))
    counts = ref.ask(CommitCountsQuery())

    (registered,) = asker.drain()
    assert (registered.error, registered.user, registered.device) == (None, "alice", "phone")
    assert counts == {"commits": 1, "committed_requests": 1}
    assert "does not handle 'not a request'" in caplog.text
