"""Admission control: the one place that decides whether the server takes new work on.

PROTOCOL.md 7 ("Overload"): the server answers -32003 with ``retry_after_ms``
instead of doing work it cannot do in time. The transports ask here before
they serve a new connection, and each device actor asks its connection's
``ConnectionAdmission`` before it takes a ``msg.send`` on or lets a user have
one more connection. What is accepted is never refused later: connections
that are open keep being served their deliveries and ACKs.

A sampler greenlet reads five signals every SAMPLE_INTERVAL: the process's
CPU use and how late its own timer fires (the event loop's lag), both
averaged over WINDOW; how much longer than usual sends wait for the store
(their mean wait over WINDOW less the least such mean over BASE_WINDOW, the
store's own pace on this disk, as TCP Vegas does with round trips); the
store actor's inbox and the resident memory.

- Past any limit, new connections are refused (``conn.close`` 1013).
- Past the store-queue or memory limit, every new ``msg.send`` is shed: more
  would only pile up in memory.
- Sends waiting for the store are bounded: once ``sends_in_flight`` wait, a
  connection may add one only while it has fewer than its fair share (that
  bound over the connections with sends waiting). A send waits behind those
  before it (Little's law: that queue over the store's pace), so the bound
  is everybody's wait, and a client sending one message at a time is never
  refused by it, however many others flood.
- That bound and every user's and connection's send rate and burst (token
  buckets) are scaled by one allowance, which shrinks while a limit is
  passed and grows back once none is (multiplicative decrease, additive
  increase, as TCP does): the heaviest senders are refused first, and users
  sending at a person's pace go on.

Every refusal tells the client how long to wait, spread by a random part so
that refused clients do not come back together; the device actor also holds
its connection's reader back for that long (transports/endpoint.py).
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import gevent
from gevent.pool import Group

from .protocol.errors import Overloaded
from .telemetry import Telemetry

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 0.1  # seconds between two samples of the signals
WINDOW = 0.2  # seconds the signals are taken over
BASE_WINDOW = 30.0  # seconds over which the least mean wait of sends is their usual wait
DECREASE = 0.5  # the allowance is multiplied by this at each sample while a limit is passed...
INCREASE = 0.01  # ...and raised by this at each sample while none is, up to 1
FLOOR = 0.05  # the smallest allowance: a user may always send 5% of its rate
RETRY_SPREAD = 0.5  # a wait told to a client is lengthened by up to this fraction, at random
MIN_RETRY_AFTER_MS = 10

# Why the server is overloaded: the first signal past its limit, in this order.
MEMORY, STORE_QUEUE, SEND_WAIT, CPU, LOOP_LAG = "memory", "store_queue", "send_wait", "cpu", "loop_lag"
SHED_EVERY_SEND = frozenset((MEMORY, STORE_QUEUE))
SENDS_IN_FLIGHT = "sends_in_flight"  # a send shed: its connection has its share of the store's queue
USER_CONNECTIONS = "user_connections"  # a connection refused: its user has as many as allowed

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """The process's resident memory (Linux: /proc/self/statm)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        return 0


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * _PAGE_SIZE


@dataclass(frozen=True)
class AdmissionLimits:
    """What is allowed; 0 turns a limit off (and the defaults here turn every one off)."""

    cpu: float = 0.0  # fraction of one core, over WINDOW
    loop_lag: float = 0.0  # seconds, mean over WINDOW
    send_wait: float = 0.0  # seconds sends wait for the store longer than usual (see above)
    store_queue: int = 0  # requests waiting in the store actor's inbox
    memory_bytes: int = 0  # resident
    sends_in_flight: int = 0  # msg.send waiting for the store, beyond which each connection keeps a fair share
    retry_after: float = 1.0  # seconds a send shed for overload is told to wait
    user_send_rate: float = 0.0  # msg.send per second, per user...
    user_send_burst: int = 1  # ...and how many at once above that rate
    connection_send_rate: float = 0.0  # the same per connection
    connection_send_burst: int = 1
    max_connections_per_user: int = 0

    @classmethod
    def from_settings(cls, settings) -> AdmissionLimits:
        return cls(
            cpu=settings.overload_cpu_percent / 100,
            loop_lag=settings.overload_loop_lag,
            send_wait=settings.overload_send_wait,
            store_queue=settings.overload_store_queue,
            memory_bytes=physical_memory_bytes() * settings.overload_memory_percent // 100,
            sends_in_flight=settings.max_sends_in_flight,
            retry_after=settings.overload_retry_after,
            user_send_rate=settings.user_send_rate,
            user_send_burst=settings.user_send_burst,
            connection_send_rate=settings.connection_send_rate,
            connection_send_burst=settings.connection_send_burst,
            max_connections_per_user=settings.max_connections_per_user,
        )


@dataclass(frozen=True)
class Load:
    """The signals at the latest sample."""

    cpu: float = 0.0  # cores
    loop_lag: float = 0.0  # seconds
    send_wait: float = 0.0  # seconds longer than usual
    usual_send_wait: float = 0.0  # seconds
    store_queue: int = 0
    resident_bytes: int = 0


class TokenBucket:
    """``rate`` tokens a second up to ``burst``, both scaled by the allowance of the moment."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def refill(self, now: float, allowance: float) -> float:
        """The tokens held now."""
        self.tokens = min(max(1.0, self.burst * allowance),
                          self.tokens + (now - self.updated) * self.rate * allowance)
        self.updated = now
        return self.tokens

    def seconds_to_half_full(self, allowance: float) -> float:
        """What a refused sender is told to wait: then it may send a burst again, not just one more."""
        wanted = max(1.0, self.burst * allowance / 2)
        return max(0.0, wanted - self.tokens) / (self.rate * allowance)


@dataclass
class _User:
    bucket: TokenBucket | None
    connections: Counter = field(default_factory=Counter)  # device -> its connections here


class AdmissionControl:
    def __init__(
        self,
        limits: AdmissionLimits = AdmissionLimits(),
        *,
        telemetry: Telemetry | None = None,
        store_queue: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
        cpu_seconds: Callable[[], float] = time.process_time,
        memory: Callable[[], int] = resident_bytes,
    ):
        self.limits = limits
        self._telemetry = telemetry or Telemetry()
        self._store_queue = store_queue
        self._clock = clock
        self._cpu_seconds = cpu_seconds
        self._memory = memory
        self._greenlets = Group()  # the sampler
        # (time, CPU seconds, lag, seconds waited by the sends answered since the sample before, how many)
        self._samples: deque[tuple[float, float, float, float, int]] = deque(
            [(clock(), cpu_seconds(), 0.0, 0.0, 0)])
        self._waited_seconds = 0.0  # by the sends answered since the last sample...
        self._waited_sends = 0  # ...and how many they were
        self._usual_waits: deque[tuple[float, float]] = deque()  # (time, mean wait) over BASE_WINDOW
        self._users: dict[str, _User] = {}
        self._in_flight = 0  # msg.send told to the store and not answered yet, over every connection
        self._sending = 0  # connections with sends in flight
        self.load = Load()
        self.overloaded: str | None = None  # the signal past its limit now, if any
        self.allowance = 1.0  # the factor of every send rate and burst
        self._lowered_by = CPU  # the signal that lowered the allowance last

    # -- sampling -------------------------------------------------------------------------

    def start(self) -> None:
        sampler = self._greenlets.spawn(self._sample_forever)
        sampler.link_exception(lambda crashed: log.error("overload sampler crashed: %r", crashed.exception))

    def stop(self) -> None:
        self._greenlets.kill()

    def _sample_forever(self) -> None:
        while True:
            due = self._clock() + SAMPLE_INTERVAL
            gevent.sleep(SAMPLE_INTERVAL)
            self.sample(lag=max(0.0, self._clock() - due))

    def sample(self, lag: float) -> None:
        """Take one sample (the sampler's timer fired ``lag`` seconds late) and decide."""
        now = self._clock()
        samples = self._samples
        samples.append((now, self._cpu_seconds(), lag, self._waited_seconds, self._waited_sends))
        self._waited_seconds, self._waited_sends = 0.0, 0
        while len(samples) > 2 and now - samples[1][0] >= WINDOW:
            samples.popleft()
        first_time, first_cpu = samples[0][:2]
        span = now - first_time
        window = list(samples)[1:]
        waited, sends = sum(sample[3] for sample in window), sum(sample[4] for sample in window)
        usual = self._usual_wait(now, waited / sends if sends else None)
        self.load = Load(
            cpu=(samples[-1][1] - first_cpu) / span if span > 0 else 0.0,
            loop_lag=sum(sample[2] for sample in window) / len(window),
            send_wait=max(0.0, waited / sends - usual) if sends else 0.0,
            usual_send_wait=usual,
            store_queue=self._store_queue(),
            resident_bytes=self._memory(),
        )
        overloaded = self._past_limit(self.load)
        if overloaded is not None and self.overloaded is None:
            refused = "every new send" if overloaded in SHED_EVERY_SEND else "the heaviest senders"
            log.warning("overloaded (%s): refusing new connections and %s; %s", overloaded, refused,
                        self._figures())
        elif overloaded is None and self.overloaded is not None:
            log.info("overload over: new connections taken again, send allowances growing back; %s",
                     self._figures())
        self.overloaded = overloaded
        if overloaded is not None:
            self._lowered_by = overloaded
            self.allowance = max(FLOOR, self.allowance * DECREASE)
        else:
            self.allowance = min(1.0, self.allowance + INCREASE)

    def _usual_wait(self, now: float, mean: float | None) -> float:
        usual = self._usual_waits
        if mean is not None:
            usual.append((now, mean))
        while usual and now - usual[0][0] > BASE_WINDOW:
            usual.popleft()
        return min(wait for _, wait in usual) if usual else 0.0

    def _past_limit(self, load: Load) -> str | None:
        limits = self.limits
        if limits.memory_bytes and load.resident_bytes > limits.memory_bytes:
            return MEMORY
        if limits.store_queue and load.store_queue > limits.store_queue:
            return STORE_QUEUE
        if limits.send_wait and load.send_wait > limits.send_wait:
            return SEND_WAIT
        if limits.cpu and load.cpu > limits.cpu:
            return CPU
        if limits.loop_lag and load.loop_lag > limits.loop_lag:
            return LOOP_LAG
        return None

    def _figures(self) -> str:
        load = self.load
        return (f"CPU {load.cpu:.0%} of a core, loop lag {load.loop_lag * 1000:.0f} ms, sends wait"
                f" {load.send_wait * 1000:.0f} ms longer than the usual {load.usual_send_wait * 1000:.0f} ms,"
                f" store queue {load.store_queue}, resident"
                f" {load.resident_bytes / 2**20:.0f} MiB")

    # -- what the transports ask -------------------------------------------------------

    def refuse_connection(self) -> str | None:
        """Why a new connection is refused now (it gets ``conn.close`` 1013), or None to serve it."""
        if self.overloaded is not None:
            self._telemetry.connections_refused[self.overloaded] += 1
        return self.overloaded

    def connection(self) -> ConnectionAdmission:
        """The part of a new connection, for its device actor."""
        return ConnectionAdmission(self)

    def snapshot(self) -> dict:
        """For /debug/vars and the console's stats."""
        t, load = self._telemetry, self.load
        return {
            "overloaded": self.overloaded,
            "send_allowance": round(self.allowance, 3),
            "cpu": round(load.cpu, 3),
            "loop_lag_seconds": round(load.loop_lag, 4),
            "send_wait_seconds": round(load.send_wait, 4),
            "usual_send_wait_seconds": round(load.usual_send_wait, 4),
            "store_queue": load.store_queue,
            "resident_bytes": load.resident_bytes,
            "sends_in_flight": self._in_flight,
            "sends_shed": dict(t.sends_shed),
            "sends_rate_limited": dict(t.sends_rate_limited),
            "connections_refused": dict(t.connections_refused),
        }

    # -- for ConnectionAdmission ---------------------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _claim(self, user: str, device: str) -> _User | None:
        state = self._users.get(user)
        cap = self.limits.max_connections_per_user
        if state is None:
            rate = self.limits.user_send_rate
            bucket = TokenBucket(rate, self.limits.user_send_burst, self._now()) if rate else None
            state = self._users[user] = _User(bucket)
        elif cap and sum(state.connections.values()) >= cap and not state.connections[device]:
            # A device that is connected already may connect again: the new connection replaces the old.
            self._telemetry.connections_refused[USER_CONNECTIONS] += 1
            return None
        state.connections[device] += 1
        return state

    def _release(self, user: str, device: str) -> None:
        state = self._users.get(user)
        if state is None:
            return
        state.connections[device] -= 1
        if state.connections[device] <= 0:
            del state.connections[device]
        if not state.connections:
            del self._users[user]  # its bucket goes too: a reconnect costs a TLS handshake and an auth


def _spread_ms(seconds: float) -> int:
    """A wait to tell a client, lengthened at random so that refused clients do not all come back at once."""
    return max(MIN_RETRY_AFTER_MS, math.ceil(seconds * 1000 * (1 + RETRY_SPREAD * random.random())))


class ConnectionAdmission:
    """One connection's part: its send bucket, the user it counts for, its sends waiting for the store."""

    def __init__(self, control: AdmissionControl):
        self._control = control
        rate = control.limits.connection_send_rate
        self._bucket = TokenBucket(rate, control.limits.connection_send_burst, control._now()) if rate else None
        self._buckets = self._buckets_of(None)  # (bucket, which limit): what a send takes a token from
        self._claimed: tuple[str, str] | None = None
        self._sent_at: deque[float] = deque()  # when each of its sends waiting for the store was sent

    @classmethod
    def unlimited(cls) -> ConnectionAdmission:
        """No limit at all (actor tests, and whatever starts a device actor without a server)."""
        return AdmissionControl().connection()

    def _buckets_of(self, user: _User | None) -> tuple[tuple[TokenBucket, str], ...]:
        pairs = ((self._bucket, "connection"), (user.bucket if user is not None else None, "user"))
        return tuple((bucket, limit) for bucket, limit in pairs if bucket is not None)

    def claim(self, user: str, device: str) -> Overloaded | None:
        """Count this connection for ``user``; the error to answer if the user has as many as allowed."""
        self._drop_claim()
        state = self._control._claim(user, device)
        if state is None:
            limits = self._control.limits
            return Overloaded(f"user {user} has {limits.max_connections_per_user} connections already,"
                              " as many as allowed", retry_after_ms=_spread_ms(limits.retry_after))
        self._claimed, self._buckets = (user, device), self._buckets_of(state)
        return None

    def release(self) -> None:
        """The connection is over: it counts no more for its user, nor do its sends still waiting."""
        if self._sent_at:  # their answers go to an actor that has stopped: no wait to learn from
            self._control._in_flight -= len(self._sent_at)
            self._control._sending -= 1
            self._sent_at.clear()
        self._drop_claim()

    def _drop_claim(self) -> None:
        if self._claimed is not None:
            self._control._release(*self._claimed)
            self._claimed, self._buckets = None, self._buckets_of(None)

    def admit_send(self) -> Overloaded | None:
        """None to take this ``msg.send`` on, else the error to answer it with."""
        control = self._control
        limits = control.limits
        overloaded = control.overloaded
        if overloaded in SHED_EVERY_SEND:
            control._telemetry.sends_shed[overloaded] += 1
            return Overloaded(f"overloaded ({overloaded}), retry later",
                              retry_after_ms=_spread_ms(limits.retry_after))
        allowance = control.allowance
        waiting = len(self._sent_at)
        # A connection alone waits behind nobody's sends but its own: max_pending_requests bounds it.
        if waiting and limits.sends_in_flight and control._sending > 1:
            bound = limits.sends_in_flight * allowance
            if control._in_flight >= bound and waiting >= max(1, bound // control._sending):
                control._telemetry.sends_shed[SENDS_IN_FLIGHT] += 1
                return Overloaded(f"overloaded: {waiting} sends of this connection wait for the store already,"
                                  " its share; retry later", retry_after_ms=_spread_ms(limits.retry_after))
        buckets = self._buckets
        if buckets:
            now = control._now()
            for bucket, limit in buckets:
                if bucket.refill(now, allowance) < 1:
                    return self._over_rate(bucket, limit, allowance)
            for bucket, _ in buckets:
                bucket.tokens -= 1
        return None

    def _over_rate(self, bucket: TokenBucket, limit: str, allowance: float) -> Overloaded:
        control = self._control
        if allowance < 1:
            control._telemetry.sends_shed[control._lowered_by] += 1
            message = f"overloaded ({control._lowered_by}): over this {limit}'s share, retry later"
        else:
            control._telemetry.sends_rate_limited[limit] += 1
            message = f"over the send rate of this {limit} ({bucket.rate:g}/s), retry later"
        return Overloaded(message, retry_after_ms=_spread_ms(bucket.seconds_to_half_full(allowance)))

    def sent(self) -> None:
        """A send admitted went to the store."""
        control = self._control
        if not self._sent_at:
            control._sending += 1
        self._sent_at.append(control._now())
        control._in_flight += 1

    def answered(self, count: int) -> None:
        """The store answered ``count`` of this connection's sends (the oldest: it answers them in order)."""
        sent_at = self._sent_at
        count = min(count, len(sent_at))
        if not count:
            return
        control = self._control
        now = control._now()
        popleft = sent_at.popleft
        waited = now - popleft() if count == 1 else sum(now - popleft() for _ in range(count))
        control._waited_seconds += waited
        control._waited_sends += count
        control._in_flight -= count
        if not sent_at:
            control._sending -= 1
