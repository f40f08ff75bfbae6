"""The push dispatcher: decides which offline device to wake, and tells its provider.

The router tells it which devices with a push token a newly stored message
found offline. It pushes to each at most once while the device stays away
(one push says "come and fetch", however many messages follow), and again
only after a quiet period, with the count of messages since. A device that
connects starts afresh. When a provider says a token is dead, the dispatcher
has the store forget it and never uses it again.

Payloads carry no message content unless the operator turned ``content`` on:
then the newest message goes along as a preview, through Apple or Google.

It starts the provider actors (it is their token sink) and stops them. A
provider is optional: one that dies (at its start or later; pykka logs why)
is logged once, counted in ``actor_failures``, and its platform is turned off
until the server restarts (``push.register`` for it answers -32602, its
devices are not pushed to, their messages wait in the store). Its settings
passed the checks at start, so what killed it is a bug or a broken
environment, which a restart loop would only repeat; off, the answer to
``push.register`` stays true and the failure stays visible. A
message a device sends upstream through GCM CCS is stored as a ``msg.send``
from that device's user: ``data.to`` names the recipient, ``data.message``
holds the message as JSON text, and the upstream message id is the ``cid``,
so that a message CCS hands over twice is stored once.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping

import orjson
import pykka
from gevent.pool import Group

from .. import protocol
from ..protocol.errors import RpcError
from ..push import PushPlatforms, PushRequest, PushTokenRejected, UpstreamMessage
from ..store import PushTarget
from ..telemetry import Telemetry
from .messages import (
    Append,
    ChildStopped,
    DeviceReachable,
    FindPushDevice,
    PushDeviceFound,
    PushDispatchQuery,
    RemovePushToken,
    SendResults,
    WakeDevices,
    tell_if_alive,
)
from .supervision import watch

log = logging.getLogger(__name__)

# Dead tokens remembered to skip pushes already on their way; a bound, not a cache policy.
MAX_REJECTED_KEPT = 10_000
MAX_CLAIMS_KEPT = 100_000


class LocalPushCoordination:
    """Push claims for a server alone: in memory (a cluster shares them in Redis, see cluster.py)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._claims: dict[tuple[str, str], float] = {}  # (user, device) -> claimed until

    def online(self, user: str, device: str) -> bool:
        return False  # the router passes on only devices with no connection here

    def claim(self, user: str, device: str, quiet_seconds: float) -> bool:
        now = self._clock()
        key = (user, device)
        if self._claims.get(key, now) > now:
            return False
        if len(self._claims) >= MAX_CLAIMS_KEPT:
            self._claims = {k: until for k, until in self._claims.items() if until > now}
        self._claims[key] = now + quiet_seconds
        return True

    def release(self, user: str, device: str) -> None:
        self._claims.pop((user, device), None)


class PushDispatcherActor(pykka.ThreadingActor):
    def __init__(
        self,
        *,
        start_providers: Mapping[str, Callable[[pykka.ActorRef], pykka.ActorRef]],
        store: pykka.ActorRef,
        router: pykka.ActorRef,
        quiet_period: float,
        content: bool = False,
        message_limits: protocol.Limits = protocol.Limits(),
        coordination=None,
        clock: Callable[[], float] = time.monotonic,
        platforms: PushPlatforms | None = None,
        telemetry: Telemetry | None = None,
    ):
        super().__init__()
        self._start_providers = start_providers
        self._providers: dict[str, pykka.ActorRef] = {}
        # Shared with the device actors: a platform whose provider died is turned off here.
        self._platforms = PushPlatforms(start_providers) if platforms is None else platforms
        self._telemetry = telemetry or Telemetry()
        self._watchers = Group()  # one greenlet per provider, waiting for it to stop
        self._store = store
        self._router = router
        self._message_limits = message_limits
        self._keys = itertools.count(1)
        self._upstream: dict[int, UpstreamMessage] = {}  # waiting for the store to name the sender
        self._quiet_period = quiet_period
        self._content = content
        # Who may push to an offline device now: LocalPushCoordination, or the cluster's.
        self._coordination = coordination or LocalPushCoordination(clock)
        self._since_push: dict[tuple[str, str], int] = {}  # messages stored for a device since its last push
        self._rejected: set[tuple[str, str]] = set()  # (platform, token)
        self.pushes = 0

    def on_start(self) -> None:
        # The providers tell their dead tokens and upstream messages to us.
        for platform, start in self._start_providers.items():
            try:
                provider = start(self.actor_ref)
            except Exception:  # its constructor: a bug, or what its settings check missed
                log.exception("push provider %s could not be created", platform)
                self._turn_off(platform)
                continue
            self._providers[platform] = provider
            watch(self._watchers, provider,
                  lambda platform=platform, provider=provider: tell_if_alive(
                      self.actor_ref, ChildStopped(platform, provider)))

    def on_stop(self) -> None:
        self._watchers.kill()  # the stops below are ours, not failures
        for provider in self._providers.values():
            provider.stop()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self.on_stop()

    def on_receive(self, message):
        if isinstance(message, WakeDevices):
            self._wake(message)
        elif isinstance(message, DeviceReachable):
            self._since_push.pop((message.user, message.device), None)
            self._coordination.release(message.user, message.device)
        elif isinstance(message, PushTokenRejected):
            self._on_rejected(message)
        elif isinstance(message, UpstreamMessage):
            key = next(self._keys)
            self._upstream[key] = message
            self._store.tell(FindPushDevice(message.platform, message.token, key, self.actor_ref))
        elif isinstance(message, PushDeviceFound):
            self._on_upstream_sender(message)
        elif isinstance(message, SendResults):
            for result in message.results:
                if result.error is not None:
                    log.debug("an upstream message was refused: %s", result.error.message)
        elif isinstance(message, ChildStopped):
            self._provider_stopped(message.name, message.ref)
        elif isinstance(message, PushDispatchQuery):
            return {"providers": sorted(self._providers), "pushes": self.pushes, "waiting": len(self._since_push)}
        return None

    def _provider_stopped(self, platform: str, provider: pykka.ActorRef) -> None:
        """A provider we did not stop is dead (its watcher or a failed tell says so): its platform goes off."""
        if self._providers.get(platform) != provider:
            return  # told twice: by its watcher and by a tell that failed
        del self._providers[platform]
        self._telemetry.actor_failures[provider.actor_class.__name__] += 1
        self._turn_off(platform)

    def _turn_off(self, platform: str) -> None:
        self._platforms.turn_off(platform)
        log.error("push provider %s failed: pushes to %s devices are off until the server restarts, "
                  "push.register for %s answers -32602; their messages wait in the store", platform,
                  platform, platform)

    def _wake(self, wake: WakeDevices) -> None:
        for target, newest in wake.targets:
            provider = self._providers.get(target.platform)
            if provider is None or (target.platform, target.token) in self._rejected:
                continue  # a platform no longer configured, or a token found dead
            key = (target.user, target.device)
            self._since_push[key] = self._since_push.get(key, 0) + 1
            coordination = self._coordination
            if coordination.online(*key) or not coordination.claim(*key, self._quiet_period):
                continue  # connected elsewhere in the cluster, or pushed to lately
            request = PushRequest(
                user=target.user,
                device=target.device,
                token=target.token,
                pending=self._since_push.pop(key),
                preview=newest.message_json if self._content else None,
            )
            if tell_if_alive(provider, request):
                self.pushes += 1
            else:
                self._provider_stopped(target.platform, provider)

    def _on_rejected(self, rejected: PushTokenRejected) -> None:
        log.debug("%s token of %s/%s rejected (%s): removing it", rejected.platform, rejected.user,
                  rejected.device, rejected.reason)
        if len(self._rejected) >= MAX_REJECTED_KEPT:
            self._rejected.clear()
        self._rejected.add((rejected.platform, rejected.token))
        self._since_push.pop((rejected.user, rejected.device), None)
        self._store.tell(
            RemovePushToken(PushTarget(rejected.user, rejected.device, rejected.platform, rejected.token))
        )

    def _on_upstream_sender(self, found: PushDeviceFound) -> None:
        upstream = self._upstream.pop(found.request_key, None)
        if upstream is None:
            return
        if found.user is None:
            log.debug("upstream %s message from a token no device holds: dropped", upstream.platform)
            return
        message = upstream.data.get("message")
        if isinstance(message, str):
            message = _json_or_text(message)
        params = {"to": upstream.data.get("to"), "message": message,
                  "cid": f"{upstream.platform}:{upstream.message_id}"[: self._message_limits.max_cid_length]}
        try:
            send = protocol.parse_send(params, self._message_limits)
        except RpcError as error:
            log.debug("upstream message from %s/%s refused: %s", found.user, found.device, error.message)
            return
        self._store.tell(
            Append(found.user, send.to, send.message_json, send.cid, send.ttl, next(self._keys), self.actor_ref,
                   self._router)
        )


def _json_or_text(text: str):
    """The JSON value ``text`` holds; plain text stays a string message."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
