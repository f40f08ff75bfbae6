"""What operators read over HTTP: ``/debug/vars`` (Go expvar's JSON shape) and ``/metrics`` (Prometheus).

Both are drawn from the same figures: the ``Telemetry`` counters the actors
keep, the push providers' counters, the live actors (from pykka's registry)
and counts the store gives on request. Nothing is computed until asked.
"""
from __future__ import annotations

import gc
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import orjson
import pykka
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector

from .actors.messages import Inspect
from .push import PushCounters
from .telemetry import Histogram, Telemetry

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STORE_STATS_TIMEOUT = 5.0
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Operations:
    def __init__(
        self,
        *,
        telemetry: Telemetry,
        push_counters: Mapping[str, PushCounters],
        store: pykka.ActorRef,
        greenlets: Callable[[], int],
        node: str,
    ):
        self._telemetry = telemetry
        self._push_counters = push_counters
        self._store = store
        self._greenlets = greenlets  # how many greenlets the server runs now
        self._node = node
        self._started = time.time()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))
        ProcessCollector(registry=self._registry)

    # -- the figures --------------------------------------------------------------------

    def store_stats(self) -> dict[str, int]:
        return self._store.ask(Inspect("stats"), timeout=STORE_STATS_TIMEOUT)

    @staticmethod
    def actors() -> dict[str, dict[str, int]]:
        """Live actors by kind, with the messages waiting in their inboxes."""
        kinds: dict[str, dict[str, int]] = {}
        for ref in pykka.ActorRegistry.get_all():
            kind = kinds.setdefault(ref.actor_class.__name__, {"count": 0, "inbox": 0})
            kind["count"] += 1
            kind["inbox"] += ref.actor_inbox.qsize()
        return dict(sorted(kinds.items()))

    def snapshot(self) -> dict:
        """Everything, as plain data: /debug/vars and the console's stats."""
        t = self._telemetry
        store = self.store_stats()
        return {
            "node": self._node,
            "uptime_seconds": round(time.time() - self._started, 3),
            "connections": {"open": t.connections_open(), "opened": dict(t.connections_opened)},
            "devices_authenticated": t.devices_authenticated,
            "slow_consumers_disconnected": t.slow_consumers,
            "actors": self.actors(),
            "messages": {
                "accepted": t.messages_accepted,
                "delivered": t.messages_delivered,
                "redelivered": t.messages_redelivered,
                "acked": t.messages_acked,
                "expired": t.messages_expired,
                "stored": store["messages"],
                "pending": store["pending"],
            },
            "users": store["users"],
            "devices": store["devices"],
            "store": {
                "commits": t.commits,
                "commit_failures": t.commit_failures,
                "commit_size": t.commit_size.summary(),
                "commit_seconds": t.commit_seconds.summary(),
            },
            "push": {platform: counters.as_dict() for platform, counters in self._push_counters.items()},
            "requests": dict(t.requests),
            "errors": {str(code): count for code, count in t.errors.items()},
            "auth_failures": t.auth_failures,
            "delivery_latency_seconds": t.delivery_seconds.summary(),
        }

    # -- the HTTP pages -------------------------------------------------------------------

    def debug_vars(self) -> bytes:
        return orjson.dumps({"cmdline": sys.argv, "memstats": self._memstats(), **self.snapshot()})

    def metrics(self) -> bytes:
        return generate_latest(self._registry)

    def _memstats(self) -> dict:
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
        return {
            "resident_bytes": resident_pages * _PAGE_SIZE,
            "max_resident_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "gc_counts": gc.get_count(),
            "gc_collections": [generation["collections"] for generation in gc.get_stats()],
            "gc_frozen": gc.get_freeze_count(),
            "greenlets": self._greenlets(),
        }


class _Collector:
    """The figures as Prometheus metric families, made at each scrape."""

    def __init__(self, operations: Operations):
        self._operations = operations

    def collect(self) -> Iterator:
        ops = self._operations
        t = ops._telemetry
        store = ops.store_stats()
        for name, value, documentation in (
            ("messages_accepted", t.messages_accepted, "Messages stored for their sender (one per msg.send)."),
            ("messages_delivered", t.messages_delivered, "msg.recv requests sent to devices, first sends."),
            ("messages_redelivered", t.messages_redelivered, "msg.recv requests sent again after the ACK timeout."),
            ("messages_acked", t.messages_acked, "Deliveries ACKed by devices."),
            ("messages_expired", t.messages_expired, "Messages dropped at the end of their TTL."),
            ("slow_consumers", t.slow_consumers, "Connections closed because they did not read."),
            ("auth_failures", t.auth_failures, "Refused authentications and client certificates."),
            ("store_commits", t.commits, "Store transactions committed."),
            ("store_commit_failures", t.commit_failures, "Store transactions that failed."),
        ):
            yield CounterMetricFamily(f"devastator_{name}", documentation, value=value)
        for name, value, documentation in (
            ("messages_pending", store["pending"], "Deliveries stored and not ACKed yet."),
            ("messages_stored", store["messages"], "Mailbox entries in the store."),
            ("users", store["users"], "Users."),
            ("devices", store["devices"], "Registered devices."),
            ("devices_authenticated", t.devices_authenticated, "Connections authenticated now."),
        ):
            yield GaugeMetricFamily(f"devastator_{name}", documentation, value=value)
        yield _labelled(GaugeMetricFamily, "connections_open", "Connections open now.", "transport",
                        t.connections_open())
        yield _labelled(CounterMetricFamily, "connections", "Connections accepted.", "transport",
                        t.connections_opened)
        yield _labelled(CounterMetricFamily, "requests", "JSON-RPC calls received.", "method", t.requests)
        yield _labelled(CounterMetricFamily, "errors", "JSON-RPC errors answered.", "code",
                        {str(code): count for code, count in t.errors.items()})
        actors = ops.actors()
        yield _labelled(GaugeMetricFamily, "actors", "Live actors.", "kind",
                        {kind: figures["count"] for kind, figures in actors.items()})
        yield _labelled(GaugeMetricFamily, "actor_inbox_messages", "Messages waiting in actors' inboxes.",
                        "kind", {kind: figures["inbox"] for kind, figures in actors.items()})
        for outcome in ("sent", "failed", "tokens_removed", "retried"):
            yield _labelled(CounterMetricFamily, f"push_{outcome}", f"Push notifications {outcome}.".replace(
                "_", " "), "provider", {p: getattr(c, outcome) for p, c in ops._push_counters.items()})
        yield _histogram("store_commit_size", "Requests per store transaction.", t.commit_size)
        yield _histogram("store_commit_seconds", "Time to run and commit a store transaction.", t.commit_seconds)
        yield _histogram("delivery_seconds", "From a message's acceptance to a device's ACK.", t.delivery_seconds)


def _labelled(family, name: str, documentation: str, label: str, values: Mapping | Counter):
    metric = family(f"devastator_{name}", documentation, labels=[label])
    for key, value in sorted(values.items()):
        metric.add_metric([str(key)], value)
    return metric


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(f"devastator_{name}", documentation, buckets=buckets, sum_value=histogram.sum)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
