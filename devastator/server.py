"""The launcher: starts the actors and endpoints in dependency order, stops them in reverse.

First start creates what a single machine needs in the data directory (CA,
server certificate, JWT keys, SQLite database); nothing is set up by hand.

The core actors (store, router, push dispatcher, cluster actor) are watched:
when one dies the server logs it, shuts down and ``serve_forever`` returns 1,
so that systemd or the ``--workers`` supervisor starts it again. Nothing
answered is lost by that: a sender is answered only after its commit.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import weakref
from typing import Callable

import gevent
import gevent.event
import pykka
from gevent.pool import Group

from . import cluster, pki
from .actors import DeviceActor, DeviceLimits, RouterActor, StoreActor, UserActor
from .actors.admin import AdminActor
from .actors.cluster import ClusterActor
from .actors.push import PushDispatcherActor
from .actors.runtime import GreenletActor
from .actors.messages import HealthQuery, Tick
from .actors.supervision import watch
from .admission import AdmissionControl, AdmissionLimits
from .auth import JwtAuthority
from .config import Settings
from .oidc import OidcVerifier
from .protocol import Limits
from .push import PushCounters, PushPlatforms
from .push.launch import provider_starters
from .operations import PROMETHEUS_CONTENT_TYPE, Operations
from .registration import Registrar
from .secrets import JwtKeyFile
from .telemetry import Telemetry
from .throttled_log import ThrottledLog
from .store import Store
from .store.factory import make_store
from .store.redis import connect as connect_redis
from .transports import HttpTransport, OutboundQueue, TlsTransport
from .transports.admin import AdminTransport

log = logging.getLogger(__name__)

EXIT_CORE_FAILURE = 1
# After a stop, how long actors' threads (greenlets) may take to end before the process exits without them.
THREADS_END_SECONDS = 5.0


class StartFailed(Exception):
    """A core actor failed while the server started (pykka logged its error)."""


class Server:
    def __init__(self, settings: Settings, *, store: Store | None = None):
        self.settings = settings
        self._store = store
        self._greenlets = Group()
        self._started = False
        self._stopping = False
        self._stopped = gevent.event.Event()
        self.failure: str | None = None  # why the server stopped by itself: a core actor died
        self.push_platforms: PushPlatforms | None = None  # whose push provider runs
        self.store_ref: pykka.ActorRef | None = None
        self.router_ref: pykka.ActorRef | None = None
        self.admission: AdmissionControl | None = None  # asked before new connections and sends
        self.tls: TlsTransport | None = None
        self.http: HttpTransport | None = None
        self.admin: AdminTransport | None = None
        self._devices: weakref.WeakSet[pykka.ActorRef] = weakref.WeakSet()
        # Push outcomes per platform, read by the operations endpoints.
        self.push_counters = {platform: PushCounters() for platform in ("apns", "gcm", "fcm")}
        self.telemetry = Telemetry()
        self.node = settings.node_name or f"{socket.gethostname()}:{os.getpid()}"
        self.operations: Operations | None = None
        self._redis_client = None  # the cluster's Redis client for presence and push claims, closed at stop

    # -- starting -------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()  # whatever did start (a port in use is found last)
            raise

    def _start(self) -> None:
        settings = self.settings
        paths = pki.ensure_pki(settings.data_dir, pki.server_names(settings.host))
        key_file = JwtKeyFile(settings.data_dir)
        key_file.keys()  # created on first start, and a broken file stops the start
        authority = JwtAuthority(key_file)
        registrar = Registrar(
            authority=authority,
            ca=pki.CertificateAuthority.load(paths),
            verifier=_oidc_verifier(settings),
            user_prefix=settings.oidc_user_prefix,
            token_ttl=settings.token_ttl,
            cert_days=settings.cert_days,
        )
        auth_log = ThrottledLog(logging.getLogger("devastator.auth"))
        limits = DeviceLimits(
            max_batch=settings.max_batch,
            max_frame_bytes=settings.max_frame_bytes,
            max_pending_requests=settings.max_pending_requests,
            message_limits=Limits(
                max_message_bytes=settings.max_message_bytes,
                max_recipients=settings.max_recipients,
                default_ttl=settings.default_ttl,
                max_ttl=settings.max_ttl,
                max_cid_length=settings.max_cid_length,
                max_signal_bytes=settings.max_signal_bytes,
                max_read_ids=settings.max_read_ids,
            ),
            history=settings.history_period > 0,
            signal_rate=settings.signal_rate,
            signal_burst=settings.signal_burst,
            signal_drop_bytes=settings.signal_drop_bytes,
        )
        push_providers = provider_starters(settings, self.push_counters)  # checked before anything starts
        store = self._store or make_store(settings)
        telemetry = self.telemetry
        self.store_ref = store_ref = StoreActor.start(store=store, telemetry=telemetry)
        self._watch_core("store", store_ref)
        push_platforms = self.push_platforms = PushPlatforms(push_providers)

        start_cluster, push_coordination, device_nodes = self._cluster_parts(settings)

        def start_push(router: pykka.ActorRef) -> pykka.ActorRef:
            return self._watch_core("push dispatcher", PushDispatcherActor.start(
                start_providers=push_providers,
                store=store_ref,
                router=router,
                quiet_period=settings.push_quiet_period,
                content=settings.push_content,
                message_limits=limits.message_limits,
                coordination=push_coordination,
                platforms=push_platforms,
                telemetry=telemetry,
            ))

        self.router_ref = router_ref = RouterActor.start(
            store=store_ref,
            start_user=lambda user: UserActor.start(
                user=user,
                store=store_ref,
                ack_timeout=settings.ack_timeout,
                delivery_window=settings.delivery_window,
                # A quarter: even resent twice over, a window stays within the outbound bound.
                delivery_window_bytes=settings.max_outbound_bytes // 4,
                telemetry=telemetry,
                router=router_ref,  # assigned by the time the router starts a user actor
            ),
            user_idle_timeout=settings.user_idle_timeout,
            start_push=start_push if push_providers else None,
            start_cluster=start_cluster,
        )
        self._watch_core("router", router_ref)
        # Both must answer before any connection can reach them.
        for name, ref in (("store", store_ref), ("router", router_ref)):
            try:
                ref.ask(HealthQuery())
            except pykka.ActorDeadError:
                raise StartFailed(f"the {name} actor failed at its start (its error is logged above)") from None
        self.admission = admission = AdmissionControl(
            AdmissionLimits.from_settings(settings), telemetry=telemetry, store_queue=store_ref.actor_inbox.qsize
        )

        def new_device(outbound: OutboundQueue) -> pykka.ActorRef:
            device = DeviceActor.start(
                connection=outbound,
                router=router_ref,
                store=store_ref,
                authority=authority,
                registrar=registrar,
                auth_log=auth_log,
                limits=limits,
                push_platforms=push_platforms,
                telemetry=telemetry,
                admission=admission.connection(),
            )
            return self._track(device)

        server_context = pki.server_ssl_context(paths)
        self.tls = TlsTransport(
            host=settings.host,
            port=settings.tls_port,
            ssl_context=server_context,
            new_device=new_device,
            max_connections=settings.max_connections,
            max_frame_bytes=settings.max_frame_bytes,
            max_outbound_bytes=settings.max_outbound_bytes,
            read_timeout=settings.read_timeout,
            frame_timeout=settings.frame_timeout,
            auth_log=auth_log,
            telemetry=telemetry,
            reuse_port=settings.workers > 1,
            admission=admission,
        )
        api = self._api_endpoint(store_ref, router_ref, authority, registrar, limits, admission, device_nodes)
        self.http = HttpTransport(
            host=settings.host,
            port=settings.http_port,
            new_device=new_device,
            max_connections=settings.max_connections,
            max_frame_bytes=settings.max_frame_bytes,
            max_outbound_bytes=settings.max_outbound_bytes,
            read_timeout=settings.read_timeout,
            header_timeout=settings.http_header_timeout,
            ping_interval=settings.ws_ping_interval,
            ssl_context=pki.server_ssl_context(paths, client_certificates=False) if settings.ws_tls else None,
            request_log=ThrottledLog(logging.getLogger("devastator.http")),
            routes={
                **(_page_routes() if settings.web_page else {}),
                "/debug/vars": ("application/json", lambda: self.operations.debug_vars()),
                "/metrics": (PROMETHEUS_CONTENT_TYPE, lambda: self.operations.metrics()),
                "/healthz": ("application/json", lambda: self.operations.health(self.failure)),
            },
            telemetry=telemetry,
            reuse_port=settings.workers > 1,
            admission=admission,
            api=api,
        )
        self.operations = Operations(
            telemetry=telemetry,
            push_counters=self.push_counters,
            push_platforms=push_platforms,
            store=store_ref,
            router=router_ref,
            greenlets=self._greenlet_count,
            node=self.node,
            admission=admission,
        )
        self.admin = AdminTransport(
            path=settings.admin_socket,
            new_device=lambda outbound: self._track(
                AdminActor.start(
                    connection=outbound,
                    router=router_ref,
                    store=store_ref,
                    snapshot=self.operations.snapshot,
                    node=self.node,
                    message_limits=limits.message_limits,
                    device_nodes=device_nodes,
                )
            ),
            max_frame_bytes=settings.max_frame_bytes,
            max_outbound_bytes=settings.max_outbound_bytes,
        )
        self._spawn(self._clock)
        admission.start()
        self.tls.start()
        self.http.start()
        self.admin.start()
        if self.failure is not None:  # a core actor died while the rest started
            raise StartFailed(f"{self.failure} (its error is logged above)")
        self._started = True
        log.info("Devastator started (data dir %s)", settings.data_dir.resolve())

    def _cluster_parts(self, settings: Settings):
        """With the Redis store: how to start the cluster actor, and the cluster's push claims."""
        if settings.store != "redis":
            return None, None, None
        def redis_client():
            return connect_redis(
                settings.redis_url, settings.redis_cluster_nodes,
                socket_timeout=settings.redis_socket_timeout, connect_timeout=settings.redis_connect_timeout,
            )

        client = self._redis_client = redis_client()
        keys = cluster.ClusterKeys(settings.redis_prefix)
        presence = cluster.Presence(client, keys, self.node, cluster.LiveNodes(client, keys))

        def start_cluster(router: pykka.ActorRef) -> pykka.ActorRef:
            return self._watch_core("cluster", ClusterActor.start(
                client=client,
                subscriber_client=redis_client(),
                prefix=settings.redis_prefix,
                node=self.node,
                router=router,
            ))

        return start_cluster, cluster.RedisPushCoordination(client, keys, presence), presence.devices_of

    def _api_endpoint(self, store_ref, router_ref, authority, registrar, limits, admission, device_nodes):
        """The server API (PROTOCOL.md 8): its keys file, and how to start its actor (again, if it dies)."""
        from .actors.api import ApiActor
        from .api_keys import ApiKeyFile
        from .transports.api import ApiEndpoint

        def start_api() -> pykka.ActorRef:
            return self._track(ApiActor.start(
                store=store_ref,
                router=router_ref,
                authority=authority,
                new_device_id=registrar.new_device_id,
                admission=admission,
                device_nodes=device_nodes,
            ))

        return ApiEndpoint(
            keys=ApiKeyFile(self.settings.data_dir),
            start_actor=start_api,
            limits=limits.message_limits,
            token_ttl=self.settings.token_ttl,
            admission=admission,
            telemetry=self.telemetry,
        )

    def _watch_core(self, name: str, ref: pykka.ActorRef) -> pykka.ActorRef:
        """Shut the server down if ``ref`` stops while the server is not stopping: it died."""
        watch(self._greenlets, ref, lambda: self._core_stopped(name))
        return ref

    def _core_stopped(self, name: str) -> None:
        if self._stopping or self.failure is not None:
            return  # stopped by us, or the first death took the rest down with it
        self.failure = f"the {name} actor died"
        if not self._started:
            return  # start() raises StartFailed with it
        log.critical("the %s actor died (its error is logged above): the server stops, to be started again "
                     "by its supervisor; every answered message is stored", name)
        gevent.spawn(self.stop)  # not in self._greenlets: stop() kills those

    def _track(self, connection_actor: pykka.ActorRef) -> pykka.ActorRef:
        """Remember an actor that serves a connection, for the sweep at stop."""
        self._devices.add(connection_actor)
        return connection_actor

    def _greenlet_count(self) -> int:
        endpoints = sum(
            endpoint.greenlet_count for endpoint in (self.tls, self.http, self.admin) if endpoint is not None
        )
        # Each actor runs in a greenlet of its own.
        return endpoints + len(self._greenlets) + len(pykka.ActorRegistry.get_all())

    def _spawn(self, function: Callable, *args) -> gevent.Greenlet:
        greenlet = self._greenlets.spawn(function, *args)
        greenlet.link_exception(lambda g: log.error("%s crashed: %r", function.__name__, g.exception))
        return greenlet

    def _clock(self) -> None:
        while True:
            gevent.sleep(self.settings.tick_interval)
            self.router_ref.tell(Tick(time.monotonic()))

    # -- running and stopping ------------------------------------------------------------

    def serve_forever(self) -> int:
        """Run until SIGTERM or SIGINT, or a core actor's death; shut down; the process's exit status.

        0 after a clean shutdown; EXIT_CORE_FAILURE when a core actor died or
        an actor would not stop. An actor stuck in a call that never returns
        would hold the interpreter's exit forever (pykka's threads are not
        daemons): then the process exits at once, without waiting for it.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, lambda: gevent.spawn(self.stop))
        self._stopped.wait()
        status = EXIT_CORE_FAILURE if self.failure else 0
        stuck = _threads_still_running(THREADS_END_SECONDS)
        if stuck:
            log.error("%d actor threads did not stop (%s): exiting without them", len(stuck), ", ".join(stuck))
            logging.shutdown()
            os._exit(EXIT_CORE_FAILURE)
        return status

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until the server has stopped (asked to, or by itself: see ``failure``); False on timeout."""
        return self._stopped.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopping:
            self._stopped.wait()  # stopping already (a signal and a failure may both ask)
            return
        self._stopping = True
        log.info("Devastator stopping")
        for transport in (self.admin, self.http, self.tls):
            if transport is not None:
                transport.stop(timeout)
        if self.admission is not None:
            self.admission.stop()  # its sampler greenlet
        self._greenlets.kill(timeout=timeout)
        for device in list(self._devices):  # their connections are closed: sweep them
            _stop_actor(device, timeout)
        for ref in (self.router_ref, self.store_ref):
            if ref is not None:
                _stop_actor(ref, timeout)
        # Device and user actors have stopped; a run of theirs may still be ending
        # (they have a greenlet only while they have messages: actors/runtime.py).
        GreenletActor.runners.join(timeout=timeout)
        if self._redis_client is not None:  # its users (cluster actor, push dispatcher) have stopped
            self._redis_client.close()
        self._stopped.set()
        log.info("Devastator stopped")


def _stop_actor(ref: pykka.ActorRef, timeout: float) -> None:
    try:
        ref.stop(timeout=timeout)
    except pykka.Timeout:  # stuck in a call that does not return (a blackholed Redis): it cannot stop
        log.error("%s did not stop within %g s", ref.actor_class.__name__, timeout)


def _threads_still_running(timeout: float) -> list[str]:
    """The names of threads (actors' greenlets, under gevent) other than this one still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threading.enumerate() if t is not current and not t.daemon and t.is_alive()]


def _page_routes() -> dict:
    from .web import page_files

    return {path: (content_type, lambda body=body: body) for path, (content_type, body) in page_files().items()}


def _oidc_verifier(settings: Settings) -> OidcVerifier | None:
    if not settings.oidc_audiences:
        return None  # auth.google answers that sign-in is not configured
    return OidcVerifier(
        issuers=settings.oidc_issuers,
        audiences=settings.oidc_audiences,
        jwks_url=settings.oidc_jwks_url,
        ssl_context=pki.client_ssl_context(settings.oidc_ca_file) if settings.oidc_ca_file else None,
        clock_skew=settings.oidc_clock_skew,
        min_refresh_interval=settings.oidc_refresh_interval,
    )
