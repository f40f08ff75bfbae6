"""The server's figures: plain counters that actors bump, read by /debug/vars, /metrics and the console.

Actors get the one ``Telemetry`` object through ``__init__`` and add to its
integers directly: on the delivery path that costs a few attribute updates
per message, where a metrics library's locked counters would cost several
times more. Everything is read only when an operator or Prometheus asks
(``devastator/operations.py`` turns it into expvar JSON and Prometheus text).
Label sets are bounded: requests are counted by known method only (any other
name counts as "other"), errors by the codes of PROTOCOL.md.
"""
from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

KNOWN_METHODS = frozenset(
    ("ping", "auth.jwt", "auth.cert", "auth.google", "push.register", "msg.send", "msg.echo", "msg.read",
     "msg.signal", "msg.history")
)
# Seconds. Deliveries wait for a person's phone: the tail reaches minutes and hours.
DELIVERY_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400,
)
COMMIT_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
COMMIT_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Histogram:
    """Fixed buckets of plain counts; ``counts[i]`` holds values up to ``buckets[i]``, the last one the rest."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that), ending with +Inf: Prometheus's buckets."""
        total, out = 0, []
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            total += count
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float:
        """An estimate: the upper bound of the bucket holding the q-th observation (0 if none)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        for bound, total in self.cumulative():
            if total >= rank:
                return bound if bound != float("inf") else self.buckets[-1]
        return self.buckets[-1]

    def summary(self) -> dict:
        return {
            "count": self.count,
            "sum": round(self.sum, 6),
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "p99": self.quantile(0.99),
        }


@dataclass
class Telemetry:
    # Messages: one per recipient's copy, except accepted (one per msg.send stored).
    messages_accepted: int = 0
    messages_delivered: int = 0  # msg.recv sent, first time
    messages_redelivered: int = 0  # msg.recv sent again after the ACK timeout
    messages_acked: int = 0
    messages_expired: int = 0  # dropped by the store at their TTL
    # Receipts (PROTOCOL.md 7): stored for senders, by type ("delivered", "read"); sent as msg.receipt.
    receipts_stored: Counter = field(default_factory=Counter)
    receipts_delivered: int = 0  # msg.receipt sent, first time
    copies_stored: int = 0  # copies of a message for its sender's other devices
    # Signals: accepted from senders, handed to devices, dropped (a device's output backed up, rate).
    signals_accepted: int = 0
    signals_delivered: int = 0
    signals_dropped: Counter = field(default_factory=Counter)  # by why: slow_consumer, rate
    history_pages: int = 0  # msg.history pages answered
    # The server API (PROTOCOL.md 8): requests by (route, HTTP status); routes are the fixed patterns.
    api_requests: Counter = field(default_factory=Counter)
    # Connections and devices.
    connections_opened: Counter = field(default_factory=Counter)  # by transport
    connections_closed: Counter = field(default_factory=Counter)
    devices_authenticated: int = 0  # connections authenticated now
    slow_consumers: int = 0  # connections closed because they did not read
    # Actors that failed (an exception pykka logged), by class name; see actors/supervision.py.
    actor_failures: Counter = field(default_factory=Counter)
    # JSON-RPC.
    requests: Counter = field(default_factory=Counter)  # by method (known ones, else "other")
    errors: Counter = field(default_factory=Counter)  # by code
    auth_failures: int = 0
    # Overload (admission.py): msg.send refused, and connections refused, by why.
    sends_shed: Counter = field(default_factory=Counter)  # by overload signal: cpu, loop_lag, store_queue, memory
    sends_rate_limited: Counter = field(default_factory=Counter)  # by limit: user, connection
    connections_refused: Counter = field(default_factory=Counter)  # by overload signal, or user_connections
    # The store.
    commits: int = 0
    commit_failures: int = 0
    commit_size: Histogram = field(default_factory=lambda: Histogram(COMMIT_SIZE_BUCKETS))
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(COMMIT_LATENCY_BUCKETS))
    delivery_seconds: Histogram = field(default_factory=lambda: Histogram(DELIVERY_LATENCY_BUCKETS))

    def request(self, method: str) -> None:
        self.requests[method if method in KNOWN_METHODS else "other"] += 1

    def connections_open(self) -> dict[str, int]:
        return {
            transport: self.connections_opened[transport] - self.connections_closed[transport]
            for transport in sorted(self.connections_opened)
        }
