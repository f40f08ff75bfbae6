"""The router actor: finds or starts the user actor of a user id.

User actors hold no truth of their own (the store does), so the router stops
those that have had no device online for a while: a million users do not need
a million live actors. Every device coming and going passes through here,
which is what lets the router know when a user actor is idle without asking it.

Signals (``msg.signal``) pass through here on their way to the user actors
of their recipients that have devices online, and to the cluster actor for
the other nodes; a user with nothing online here gets none.

It also polls the store for removed devices (an operator may remove one from
another process) and has their connections closed, and tells the push
dispatcher which devices a new message found offline.

A user actor that fails closes its connections (see UserActor.on_failure);
the router finds it dead at its next tell and starts a fresh one if devices or
watchers still count on the user, so its counts of connections stay true. The
push dispatcher and the cluster actor are core: the launcher watches them and
exits the server when one dies, so a failed tell to them is only skipped here.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import pykka

from .messages import (
    Announce,
    Committed,
    DeviceAbsent,
    DeviceOffline,
    DeviceOnline,
    DevicePresent,
    DeviceReachable,
    DeviceRemoved,
    DevicesRemoved,
    HealthQuery,
    LiveUserQuery,
    OnlineUsersQuery,
    Poke,
    PollRemovals,
    PurgeExpired,
    Signal,
    Tick,
    Unwatch,
    WakeDevices,
    Watch,
    tell_if_alive,
)

log = logging.getLogger(__name__)


@dataclass
class _LiveUser:
    ref: pykka.ActorRef
    devices: Counter = field(default_factory=Counter)  # device id -> connections announced online
    idle_since: float = 0.0
    watchers: list = field(default_factory=list)  # consoles watching (admin actors): the actor stays while they do

    @property
    def online(self) -> int:
        return sum(self.devices.values())


class RouterActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        store: pykka.ActorRef,
        start_user: Callable[[str], pykka.ActorRef],
        user_idle_timeout: float,
        purge_interval: float = 10.0,
        removals_interval: float = 1.0,
        start_push: Callable[[pykka.ActorRef], pykka.ActorRef] | None = None,
        start_cluster: Callable[[pykka.ActorRef], pykka.ActorRef] | None = None,
    ):
        super().__init__()
        self._store = store
        # The push dispatcher, started by us (it stores upstream messages with us as
        # their router); None when no push provider is configured.
        self._start_push = start_push
        self._push: pykka.ActorRef | None = None
        # The cluster actor (Redis store only), started by us for the same reason.
        self._start_cluster = start_cluster
        self._cluster: pykka.ActorRef | None = None
        self._start_user = start_user
        self._user_idle_timeout = user_idle_timeout
        self._purge_interval = purge_interval
        self._next_purge = 0.0
        self._removals_interval = removals_interval
        self._next_removals_poll = 0.0
        self._removals_cursor: int | None = None
        self._polling_removals = False
        self._now = time.monotonic()  # the last tick's time: idleness is measured in ticks' clock
        self._users: dict[str, _LiveUser] = {}

    def on_start(self) -> None:
        # The cursor of now: removals before this start closed no connection of ours.
        self._polling_removals = True
        tell_if_alive(self._store, PollRemovals(None, self.actor_ref))  # a store that failed to open: start fails
        if self._start_push is not None:
            self._push = self._start_push(self.actor_ref)
        if self._start_cluster is not None:
            self._cluster = self._start_cluster(self.actor_ref)

    def on_stop(self) -> None:
        for live in self._users.values():
            live.ref.stop()
        self._users.clear()
        for helper in (self._push, self._cluster):
            if helper is not None:
                helper.stop()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # The launcher sees the router gone and exits the server; the children go first.
        self.on_stop()

    def on_receive(self, message):
        if isinstance(message, Committed):
            self._route_committed(message)
        elif isinstance(message, DeviceOnline):
            live = self._live(message.user)
            live.devices[message.device] += 1
            if live.devices[message.device] == 1:
                _tell_helper(self._cluster, DevicePresent(message.user, message.device))
            self._tell_user(message.user, live, message)
            _tell_helper(self._push, DeviceReachable(message.user, message.device))
        elif isinstance(message, DeviceOffline):
            live = self._users.get(message.user)
            if live is not None:
                live.devices[message.device] -= 1
                if live.devices[message.device] <= 0:
                    del live.devices[message.device]
                    _tell_helper(self._cluster, DeviceAbsent(message.user, message.device))
                live.idle_since = self._now
                self._tell_user(message.user, live, message)
        elif isinstance(message, Tick):
            self._tick(message)
        elif isinstance(message, Watch):
            live = self._live(message.user)
            live.watchers.append(message.watcher)
            self._tell_user(message.user, live, message)
        elif isinstance(message, Unwatch):
            live = self._users.get(message.user)
            if live is not None:
                if message.watcher in live.watchers:
                    live.watchers.remove(message.watcher)
                live.idle_since = self._now
                self._tell_user(message.user, live, message)
        elif isinstance(message, Signal):
            self._route_signal(message)
        elif isinstance(message, Poke):
            users = self._users if message.users is None else message.users
            for user in list(users):
                live = self._users.get(user)
                if live is not None:
                    self._tell_user(user, live, Poke(None))
        elif isinstance(message, DevicesRemoved):
            self._on_devices_removed(message)
        elif isinstance(message, HealthQuery):  # /healthz: cheap, whatever the number of users
            return {"users": len(self._users)}
        elif isinstance(message, LiveUserQuery):
            live = self._users.get(message.user)
            return None if live is None else live.ref
        elif isinstance(message, OnlineUsersQuery):
            return {user: {"online": live.online} for user, live in self._users.items()}
        return None

    def _route_committed(self, committed: Committed) -> None:
        # Users with no live actor have no device online: the store keeps theirs.
        by_user: dict[str, list] = defaultdict(list)
        for stored in committed.messages:
            if stored.recipient in self._users:
                by_user[stored.recipient].append(stored)
        for user, messages in by_user.items():
            self._tell_user(user, self._users[user], Committed(tuple(messages)))
        for user in committed.recheck:
            # The store could not tell whether a send landed for them: read past the cursors.
            live = self._users.get(user)
            if live is not None:
                self._tell_user(user, live, Poke(None))
        if self._cluster is not None:
            users = {stored.recipient for stored in committed.messages} | set(committed.recheck)
            _tell_helper(self._cluster, Announce(tuple(users)))
        if committed.push_targets and self._push is not None:
            offline = tuple(
                (target, message)
                for target, message in committed.push_targets
                if target.user not in self._users or target.device not in self._users[target.user].devices
            )
            if offline:
                _tell_helper(self._push, WakeDevices(offline))

    def _route_signal(self, signal: Signal) -> None:
        for user in signal.recipients:
            live = self._users.get(user)
            if live is not None and live.online:
                self._tell_user(user, live, signal)
        if signal.origin is not None:  # sent here: the other nodes' devices get it too
            _tell_helper(self._cluster, signal)

    def _tick(self, tick: Tick) -> None:
        self._now = tick.now
        if tick.now >= self._next_purge:
            self._next_purge = tick.now + self._purge_interval
            self._store.tell(PurgeExpired())
        if tick.now >= self._next_removals_poll and not self._polling_removals:
            self._next_removals_poll = tick.now + self._removals_interval
            self._polling_removals = True
            self._store.tell(PollRemovals(self._removals_cursor, self.actor_ref))
        idle = []
        for user, live in list(self._users.items()):
            if live.online > 0:
                self._tell_user(user, live, tick)
            elif not live.watchers and tick.now - live.idle_since >= self._user_idle_timeout:
                idle.append(user)
        for user in idle:
            # Messages already in its inbox are handled before it stops.
            self._users.pop(user).ref.stop(block=False)

    def _on_devices_removed(self, removed: DevicesRemoved) -> None:
        self._polling_removals = False
        self._removals_cursor = removed.cursor
        for user, device in removed.devices:
            live = self._users.get(user)
            if live is not None:
                log.debug("device %s/%s was removed: closing its connection", user, device)
                self._tell_user(user, live, DeviceRemoved(device))

    def _live(self, user: str) -> _LiveUser:
        """The user's live actor, started if there is none."""
        live = self._users.get(user)
        if live is None:
            live = self._users[user] = _LiveUser(self._start_user(user))
        return live

    def _tell_user(self, user: str, live: _LiveUser, message) -> None:
        if tell_if_alive(live.ref, message) or self._users.get(user) is not live:
            return
        # It failed (pykka logged why) and told its connections to close; its
        # truth is in the store. The counts stay: those connections still say
        # DeviceOffline when they close.
        if not live.online and not live.watchers:
            del self._users[user]  # the next device coming online starts a fresh one
            return
        log.info("user actor of %s failed: starting a fresh one", user)
        live.ref = self._start_user(user)
        for watcher in live.watchers:
            tell_if_alive(live.ref, Watch(user, watcher))
        tell_if_alive(live.ref, message)


def _tell_helper(helper: pykka.ActorRef | None, message) -> None:
    """Tell the push dispatcher or the cluster actor, if there is one; if it died, the launcher exits the server."""
    if helper is not None:
        tell_if_alive(helper, message)
