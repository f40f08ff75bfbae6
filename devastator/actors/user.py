"""The user actor: one user's mailbox while any of its devices is online.

For each device online it keeps the deliveries in flight (sent, not yet ACKed)
up to a window (in messages and in bytes), and a cursor: the highest ``seq``
handed to that device. What
lies beyond the cursor is read from the store page by page; a live message is
sent at once only when the device has caught up with the store, so that every
device gets its messages in acceptance order. Unacked deliveries are sent again
after the ACK timeout; expired ones are dropped.

If it fails (an exception pykka logs), its connections close with 1011 and
their clients reconnect: a connection attached to a dead user actor would get
nothing more. Their device actors still tell the router DeviceOffline, which
keeps its counts true, and the next connection gets a fresh user actor.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pykka

from ..store import RECEIPT, StoredMessage
from ..telemetry import Telemetry
from .runtime import GreenletActor
from .messages import (
    Ack,
    Acked,
    AttachDevice,
    Authenticated,
    AuthFailed,
    Committed,
    Deliver,
    DeliverSignal,
    DeviceAttached,
    DeviceOffline,
    DeviceOnline,
    DeviceRemoved,
    DeviceRefsQuery,
    ForgetInFlight,
    Kick,
    Kicked,
    LoadPending,
    PendingLoaded,
    Poke,
    Replaced,
    Revoked,
    Signal,
    Tick,
    Unwatch,
    UserActorFailed,
    UserDevicesQuery,
    Watch,
    WatchEvent,
    tell_if_alive,
)

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    message: StoredMessage
    sent_at: float


@dataclass
class _DeviceSlot:
    """An attached device: its credentials were checked and its backlog counted."""

    ref: pykka.ActorRef
    cursor: int = 0
    loading: bool = False
    caught_up: bool = False  # nothing waits in the store beyond the cursor
    stale: bool = False  # a message was committed while a page was loading
    inflight: dict[str, _InFlight] = field(default_factory=dict)
    inflight_bytes: int = 0


class UserActor(GreenletActor):
    def __init__(
        self,
        *,
        user: str,
        store: pykka.ActorRef,
        ack_timeout: float,
        delivery_window: int,
        delivery_window_bytes: int = 2 << 20,
        clock=time.monotonic,
        wall_clock_ms=lambda: int(time.time() * 1000),
        telemetry: Telemetry | None = None,
        router: pykka.ActorRef | None = None,
    ):
        super().__init__()
        self._telemetry = telemetry or Telemetry()
        self.user = user
        self._store = store
        self._router = router  # told the receipts an ACK stores (through the store actor)
        self._ack_timeout = ack_timeout
        self._window = delivery_window
        # The byte bound keeps a backlog of big messages within what a
        # connection may have unsent (max_outbound_bytes), so that reading it
        # is never mistaken for a slow consumer.
        self._window_bytes = delivery_window_bytes
        # Refill only once a quarter of the window is free: fewer, fuller pages.
        self._refill_at = max(1, delivery_window // 4)
        self._refill_at_bytes = delivery_window_bytes // 4
        self._clock = clock
        self._wall_clock_ms = wall_clock_ms
        self._devices: dict[str, _DeviceSlot] = {}
        # Connections whose credentials the store is checking: device actor -> device id.
        self._attaching: dict[pykka.ActorRef, str] = {}
        self._watchers: set[pykka.ActorRef] = set()  # operators' consoles watching this user

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._telemetry.actor_failures[type(self).__name__] += 1
        connections = {slot.ref for slot in self._devices.values()} | set(self._attaching)
        for connection in connections:
            tell_if_alive(connection, UserActorFailed())

    def on_receive(self, message):
        if isinstance(message, Committed):
            self._on_committed(message)
        elif isinstance(message, Acked):
            self._on_acked(message)
        elif isinstance(message, PendingLoaded):
            self._on_loaded(message)
        elif isinstance(message, DeviceOnline):
            self._on_online(message)
        elif isinstance(message, DeviceAttached):
            self._on_attached(message)
        elif isinstance(message, DeviceOffline):
            self._attaching.pop(message.device_ref, None)
            slot = self._devices.get(message.device)
            if slot is not None and slot.ref == message.device_ref:
                del self._devices[message.device]
                self._watch("offline", message.device)
        elif isinstance(message, DeviceRemoved):
            self._close(message.device, Revoked())
        elif isinstance(message, Tick):
            self._on_tick(message)
        elif isinstance(message, UserDevicesQuery):
            return self._devices_state()
        elif isinstance(message, DeviceRefsQuery):  # the device actors, for the admin endpoint
            return {device: slot.ref for device, slot in self._devices.items()}
        elif isinstance(message, Kick):
            return self._kick(message.device)
        elif isinstance(message, ForgetInFlight):
            for slot in self._devices.values():
                slot.inflight.clear()
                slot.inflight_bytes = 0
        elif isinstance(message, Poke):
            self._on_poke()
        elif isinstance(message, Signal):
            self._on_signal(message)
        elif isinstance(message, Watch):
            self._watchers.add(message.watcher)
        elif isinstance(message, Unwatch):
            self._watchers.discard(message.watcher)
        return None

    def _kick(self, device: str | None) -> int:
        kicked = [name for name in self._devices if device is None or name == device]
        for name in kicked:
            self._close(name, Kicked())
        return len(kicked)

    def _close(self, device: str, why) -> None:
        """Forget the device's connection and tell it to close (``Revoked``, ``Kicked``)."""
        slot = self._devices.pop(device, None)
        if slot is not None:
            tell_if_alive(slot.ref, why)
            self._watch("offline", device)

    def _watch(self, event: str, device: str | None = None, ids: tuple[str, ...] = ()) -> None:
        if not self._watchers:
            return
        watch_event = WatchEvent(self.user, event, device, ids, self._wall_clock_ms())
        for watcher in list(self._watchers):
            if not tell_if_alive(watcher, watch_event):
                self._watchers.discard(watcher)

    # -- devices coming and going ---------------------------------------------

    def _on_online(self, online: DeviceOnline) -> None:
        # The connection it may replace stays until these credentials prove good.
        self._attaching[online.device_ref] = online.device
        self._store.tell(
            AttachDevice(
                self.user, online.device, online.registration, online.device_ref, online.request_key,
                self.actor_ref,
            )
        )

    def _on_attached(self, attached: DeviceAttached) -> None:
        device = self._attaching.pop(attached.device_ref, None)
        if device is None:
            return  # that connection is gone meanwhile
        if attached.error is not None:
            tell_if_alive(attached.device_ref, AuthFailed(attached.request_key, attached.error))
            return
        previous = self._devices.get(device)
        if previous is not None and previous.ref != attached.device_ref:
            tell_if_alive(previous.ref, Replaced())
        slot = self._devices[device] = _DeviceSlot(attached.device_ref)
        self._watch("online", device)
        self._tell_device(
            device,
            slot,
            Authenticated(self.user, device, self.actor_ref, attached.pending, attached.request_key),
        )
        if device in self._devices:
            self._load(device, slot)

    # -- the backlog in the store ------------------------------------------------

    def _load(self, device: str, slot: _DeviceSlot) -> None:
        room = self._window - len(slot.inflight)
        if slot.loading or room <= 0:
            return
        slot.loading = True
        slot.stale = False
        self._store.tell(LoadPending(self.user, device, slot.cursor, room, self.actor_ref))

    def _on_loaded(self, loaded: PendingLoaded) -> None:
        slot = self._devices.get(loaded.device)
        if slot is None or not slot.loading:
            return
        slot.loading = False
        if loaded.failed:
            return  # the next tick tries again
        fresh = [m for m in loaded.messages if m.seq > slot.cursor]
        sent_all = self._send(loaded.device, slot, fresh, as_batch=True)
        if loaded.device not in self._devices:
            return
        slot.caught_up = loaded.complete and sent_all and not slot.stale
        if not slot.caught_up and self._has_room(slot):
            self._load(loaded.device, slot)

    # -- live traffic ------------------------------------------------------------

    def _on_committed(self, committed: Committed) -> None:
        self._watch("stored", None, tuple(message.id for message in committed.messages))
        for device, slot in list(self._devices.items()):
            if slot.loading:
                slot.stale = True
                continue
            if not slot.caught_up:
                continue  # they wait in the store behind the cursor
            # The device that sent a message has no copy of it waiting (see Store.append).
            fresh = [m for m in committed.messages if m.seq > slot.cursor and m.origin_device != device]
            if not self._send(device, slot, fresh, as_batch=False):
                slot.caught_up = False  # the rest waits in the store behind the cursor

    def _on_signal(self, signal: Signal) -> None:
        deliver = DeliverSignal(signal.sender, self.user, signal.signal_json, signal.ts)
        for device, slot in list(self._devices.items()):
            if slot.ref != signal.origin:
                self._tell_device(device, slot, deliver)

    def _on_poke(self) -> None:
        # Stored on another node: what is new waits in the store beyond each cursor.
        for device, slot in list(self._devices.items()):
            if slot.loading:
                slot.stale = True
                continue
            slot.caught_up = False
            if self._has_room(slot):
                self._load(device, slot)

    def _on_acked(self, acked: Acked) -> None:
        slot = self._devices.get(acked.device)
        if slot is None:
            return
        inflight = slot.inflight
        done = [inflight.pop(message_id) for message_id in acked.ids if message_id in inflight]
        if not done:
            return
        slot.inflight_bytes -= sum(_cost(flight.message) for flight in done)
        telemetry = self._telemetry
        telemetry.messages_acked += len(done)
        self._watch("acked", acked.device, tuple(flight.message.id for flight in done))
        now_ms = self._wall_clock_ms()
        for flight in done:
            telemetry.delivery_seconds.observe((now_ms - flight.message.ts) / 1000)
        self._store.tell(
            Ack(self.user, acked.device, tuple(flight.message.seq for flight in done), self._router)
        )
        if not slot.caught_up and self._has_room(slot):
            self._load(acked.device, slot)

    def _send(self, device: str, slot: _DeviceSlot, messages: list[StoredMessage], *, as_batch: bool) -> bool:
        """Hand the device what fits in its window; False if some did not fit."""
        count_room = self._window - len(slot.inflight)
        byte_room = self._window_bytes - slot.inflight_bytes
        taken = 0
        for message in messages[:count_room]:
            cost = _cost(message)
            if cost > byte_room and (taken or slot.inflight):
                break  # one message always fits an empty window, however big
            byte_room -= cost
            taken += 1
        if taken:
            now = self._clock()
            sending = messages[:taken]
            for message in sending:
                slot.inflight[message.id] = _InFlight(message, now)
            slot.inflight_bytes = self._window_bytes - byte_room
            slot.cursor = sending[-1].seq
            receipts = sum(1 for message in sending if message.kind == RECEIPT)
            self._telemetry.messages_delivered += taken - receipts
            self._telemetry.receipts_delivered += receipts
            self._watch("delivered", device, tuple(message.id for message in sending))
            self._tell_device(device, slot, Deliver(tuple(sending), as_batch=as_batch))
        return taken == len(messages)

    def _has_room(self, slot: _DeviceSlot) -> bool:
        return (
            self._window - len(slot.inflight) >= self._refill_at
            and self._window_bytes - slot.inflight_bytes >= self._refill_at_bytes
        )

    def _tell_device(self, device: str, slot: _DeviceSlot, message) -> None:
        if not tell_if_alive(slot.ref, message):
            # Its connection is gone and its DeviceOffline is on the way: forget it now.
            if self._devices.get(device) is slot:
                del self._devices[device]

    # -- timers ---------------------------------------------------------------------

    def _on_tick(self, tick: Tick) -> None:
        deadline = tick.now - self._ack_timeout
        now_ms = self._wall_clock_ms()
        for device, slot in list(self._devices.items()):
            expired = [mid for mid, flight in slot.inflight.items() if flight.message.expires <= now_ms]
            for message_id in expired:
                slot.inflight_bytes -= _cost(slot.inflight.pop(message_id).message)  # purged by the store
            overdue = [flight for flight in slot.inflight.values() if flight.sent_at <= deadline]
            if overdue:
                for flight in overdue:
                    flight.sent_at = tick.now
                self._telemetry.messages_redelivered += len(overdue)
                self._watch("redelivered", device, tuple(f.message.id for f in overdue))
                self._tell_device(device, slot, Deliver(tuple(f.message for f in overdue), as_batch=False))
                if device not in self._devices:
                    continue
            if not slot.caught_up and self._has_room(slot):  # e.g. after a failed page
                self._load(device, slot)

    def _devices_state(self) -> dict:
        now = self._clock()
        return {
            "user": self.user,
            "devices": {
                device: {
                    "in_flight": len(slot.inflight),
                    "oldest_in_flight_age": max((now - f.sent_at for f in slot.inflight.values()), default=0.0),
                    "cursor": slot.cursor,
                    "caught_up": slot.caught_up,
                }
                for device, slot in self._devices.items()
            },
            "attaching": sorted(self._attaching.values()),
        }


# What a delivery adds to a connection's output: the message and its msg.recv envelope.
ENVELOPE_BYTES = 200


def _cost(message: StoredMessage) -> int:
    return len(message.message_json) + ENVELOPE_BYTES
