"""What operators read over HTTP: ``/debug/vars`` (Go expvar's JSON shape), ``/metrics`` (Prometheus), ``/healthz``.

The first two are drawn from the same figures: the ``Telemetry`` counters the
actors keep, the push providers' counters, the live actors (from pykka's
registry) and counts the store gives on request. Nothing is computed until
asked. ``/healthz`` asks the store and the router actors whether they answer.
"""
from __future__ import annotations

import gc
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

from .actors.messages import HealthQuery, StoreStatsQuery
from .admission import AdmissionControl, resident_bytes
from .push import PushCounters, PushPlatforms
from .telemetry import Histogram, Telemetry

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STORE_STATS_TIMEOUT = 5.0
HEALTH_TIMEOUT = 1.0  # seconds for the store and the router, together, to answer /healthz


class Operations:
    def __init__(
        self,
        *,
        telemetry: Telemetry,
        push_counters: Mapping[str, PushCounters],
        store: pykka.ActorRef,
        greenlets: Callable[[], int],
        node: str,
        router: pykka.ActorRef | None = None,
        push_platforms: PushPlatforms | None = None,
        health_timeout: float = HEALTH_TIMEOUT,
        admission: AdmissionControl | None = None,
    ):
        self._telemetry = telemetry
        self._admission = admission if admission is not None else AdmissionControl()
        self._push_counters = push_counters
        self._push_platforms = PushPlatforms() if push_platforms is None else push_platforms
        self._store = store
        self._router = router
        self._health_timeout = health_timeout
        self._greenlets = greenlets  # how many greenlets the server runs now
        self._node = node
        self._started = time.time()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))
        ProcessCollector(registry=self._registry)

    # -- the figures --------------------------------------------------------------------

    def health(self, failure: str | None = None) -> tuple[int, bytes]:
        """(HTTP status, JSON body): 200 when the store and the router answer in time, else 503 and why.

        ``failure`` is the server's own reason to be stopping (a core actor died).
        """
        if failure is not None:
            return _unavailable(failure)
        actors = {"store": self._store, "router": self._router}
        asked = {name: ref.ask(HealthQuery(), block=False) for name, ref in actors.items() if ref is not None}
        deadline = time.monotonic() + self._health_timeout
        for name, answer in asked.items():
            try:
                answered = answer.get(timeout=max(0.0, deadline - time.monotonic()))
            except pykka.ActorDeadError:
                return _unavailable(f"the {name} actor is not running")
            except pykka.Timeout:
                return _unavailable(f"the {name} actor did not answer within {self._health_timeout:g} s")
            except Exception as error:  # noqa: BLE001  (pykka hands the asker what the actor raised)
                return _unavailable(f"the {name} actor answers: {error}")
            if isinstance(answered, dict) and answered.get("failing"):  # e.g. the store's, since when and why
                return _unavailable(answered["failing"])
        return 200, b'{"status":"ok"}'

    def store_stats(self) -> dict[str, int]:
        return self._store.ask(StoreStatsQuery(), timeout=STORE_STATS_TIMEOUT)

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
            "actor_failures": dict(t.actor_failures),
            "messages": {
                "accepted": t.messages_accepted,
                "delivered": t.messages_delivered,
                "redelivered": t.messages_redelivered,
                "acked": t.messages_acked,
                "expired": t.messages_expired,
                "stored": store["messages"],
                "pending": store["pending"],
            },
            "receipts": {"stored": dict(t.receipts_stored), "delivered": t.receipts_delivered},
            "copies_stored": t.copies_stored,
            "signals": {"accepted": t.signals_accepted, "delivered": t.signals_delivered,
                        "dropped": dict(t.signals_dropped)},
            "history_pages": t.history_pages,
            "api_requests": {f"{route} {status}": count for (route, status), count in sorted(t.api_requests.items())},
            "users": store["users"],
            "devices": store["devices"],
            "store": {
                "commits": t.commits,
                "commit_failures": t.commit_failures,
                "commit_size": t.commit_size.summary(),
                "commit_seconds": t.commit_seconds.summary(),
            },
            "push": {platform: counters.as_dict() for platform, counters in self._push_counters.items()},
            "push_providers_running": self._push_platforms.running(),
            "requests": dict(t.requests),
            "errors": {str(code): count for code, count in t.errors.items()},
            "auth_failures": t.auth_failures,
            "overload": self._admission.snapshot(),
            "delivery_latency_seconds": t.delivery_seconds.summary(),
        }

    # -- the HTTP pages -------------------------------------------------------------------

    def debug_vars(self) -> bytes:
        return orjson.dumps({"cmdline": sys.argv, "memstats": self._memstats(), **self.snapshot()})

    def metrics(self) -> bytes:
        return generate_latest(self._registry)

    def _memstats(self) -> dict:
        return {
            "resident_bytes": resident_bytes(),
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
            ("receipts_delivered", t.receipts_delivered, "msg.receipt requests sent to devices, first sends."),
            ("copies_stored", t.copies_stored, "Copies of messages stored for their senders' other devices."),
            ("signals_accepted", t.signals_accepted, "msg.signal calls handed on."),
            ("signals_delivered", t.signals_delivered, "msg.signal notifications written to devices."),
            ("history_pages", t.history_pages, "msg.history pages answered."),
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
        yield _labelled(CounterMetricFamily, "receipts_stored", "Receipts stored for senders, by type.", "type",
                        t.receipts_stored)
        yield _labelled(CounterMetricFamily, "signals_dropped", "Signals not handed on, by why.", "reason",
                        t.signals_dropped)
        api = CounterMetricFamily("devastator_api_requests", "Server API requests, by route and HTTP status.",
                                  labels=["route", "status"])
        for (route, status), count in sorted(t.api_requests.items()):
            api.add_metric([route, str(status)], count)
        yield api
        yield _labelled(CounterMetricFamily, "sends_shed", "msg.send answered -32003 for overload, by why.",
                        "reason", t.sends_shed)
        yield _labelled(CounterMetricFamily, "sends_rate_limited", "msg.send answered -32003 by a rate limit.",
                        "limit", t.sends_rate_limited)
        yield _labelled(CounterMetricFamily, "connections_refused", "Connections refused (1013), by why.",
                        "reason", t.connections_refused)
        admission = ops._admission
        for name, value, documentation in (
            ("overloaded", int(admission.overloaded is not None), "1 while a signal is past its overload limit."),
            ("send_allowance", admission.allowance, "The factor of every send rate limit (1: as configured)."),
            ("cpu_ratio", admission.load.cpu, "The process's CPU use over the last 0.2 s, in cores."),
            ("event_loop_lag_seconds", admission.load.loop_lag, "How late the event loop runs timers."),
        ):
            yield GaugeMetricFamily(f"devastator_{name}", documentation, value=value)
        actors = ops.actors()
        yield _labelled(GaugeMetricFamily, "actors", "Live actors.", "kind",
                        {kind: figures["count"] for kind, figures in actors.items()})
        yield _labelled(GaugeMetricFamily, "actor_inbox_messages", "Messages waiting in actors' inboxes.",
                        "kind", {kind: figures["inbox"] for kind, figures in actors.items()})
        yield _labelled(CounterMetricFamily, "actor_failures", "Actors that failed (an exception), by kind.",
                        "kind", t.actor_failures)
        yield _labelled(GaugeMetricFamily, "push_provider_up", "1 while a configured push provider runs, "
                        "0 once it failed (its platform is off).", "provider",
                        {p: int(up) for p, up in ops._push_platforms.running().items()})
        for outcome in ("sent", "failed", "tokens_removed", "retried"):
            yield _labelled(CounterMetricFamily, f"push_{outcome}", f"Push notifications {outcome}.".replace(
                "_", " "), "provider", {p: getattr(c, outcome) for p, c in ops._push_counters.items()})
        yield _histogram("store_commit_size", "Requests per store transaction.", t.commit_size)
        yield _histogram("store_commit_seconds", "Time to run and commit a store transaction.", t.commit_seconds)
        yield _histogram("delivery_seconds", "From a message's acceptance to a device's ACK.", t.delivery_seconds)


def _unavailable(reason: str) -> tuple[int, bytes]:
    return 503, orjson.dumps({"status": "unavailable", "reason": reason})


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
