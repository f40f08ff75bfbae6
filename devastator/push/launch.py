"""From the settings to running push providers: which are configured, and how to start each.

A provider whose credentials are not set is not started, and ``push.register``
for its platform answers -32602. A provider that is set up wrong (a missing
key file, a malformed certificate or service account) stops the server's
start with a ``SettingsError`` naming the setting, rather than failing at the
first push: its credentials are loaded here the way its actor loads them. A
provider that dies anyway, later, turns its platform off (actors/push.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import pykka

from ..config import Settings, SettingsError
from .base import PushCounters

StartProvider = Callable[[pykka.ActorRef], pykka.ActorRef]


def provider_starters(
    settings: Settings, counters: Mapping[str, PushCounters], env: Mapping[str, str] | None = None
) -> dict[str, StartProvider]:
    """platform -> a function that starts its provider actor given the dispatcher (its token sink)."""
    env = os.environ if env is None else env
    starters: dict[str, StartProvider] = {}
    if settings.apns_topic:
        starters["apns"] = _apns(settings, counters["apns"])
    if settings.gcm_sender_id:
        starters["gcm"] = _gcm(settings, counters["gcm"], env)
    if settings.fcm_service_account_file is not None:
        starters["fcm"] = _fcm(settings, counters["fcm"])
    return starters


def _apns(settings: Settings, counters: PushCounters) -> StartProvider:
    from .apns import ApnsConfig, ApnsProviderActor

    for name in ("apns_key_file", "apns_cert_file"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise SettingsError(name, f"{str(path)!r} is not a file")
    try:
        config = ApnsConfig(
            topic=settings.apns_topic,
            key_file=settings.apns_key_file,
            key_id=settings.apns_key_id or None,
            team_id=settings.apns_team_id or None,
            cert_file=settings.apns_cert_file,
            use_sandbox=settings.apns_sandbox,
            host=settings.apns_host or None,
            port=settings.apns_port,
            ca_file=settings.apns_ca_file,
            push_type=settings.apns_push_type,
            priority=settings.apns_priority or None,
            expiration=settings.apns_expiration,
            collapse_id=settings.apns_collapse_id or None,
        )
    except ValueError as error:
        raise SettingsError("apns_topic", f"APNs is set up wrong: {error}") from None
    _load_apns_credentials(config)
    return lambda sink: ApnsProviderActor.start(config=config, token_sink=sink, counters=counters)


def _load_apns_credentials(config) -> None:
    """What the APNs provider's ``on_start`` loads, loaded once here: a bad file names its setting."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from .apns import _credentials, _tls_context

    setting, path = ("apns_key_file", config.key_file) if config.auth == "token" else ("apns_cert_file",
                                                                                        config.cert_file)
    try:
        if config.auth == "token":
            # apns2 signs with it only at the first push: an ES256 (P-256) key in PEM, Apple's .p8.
            key = load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("not an elliptic-curve key (Apple's .p8 keys are ES256)")
        _credentials(config)
        _tls_context(config)
    except (OSError, ValueError, TypeError) as error:  # ssl.SSLError is an OSError
        raise SettingsError(setting, f"{str(path)!r} is not usable: {error}") from None


def _gcm(settings: Settings, counters: PushCounters, env: Mapping[str, str]) -> StartProvider:
    from .ccs import CcsConfig, GcmCcsProviderActor

    # The original project's variables, kept for operators who have them set.
    key_variable = "GOOGLE_PREPROD_API_KEY" if settings.gcm_preprod else "GOOGLE_API_KEY"
    api_key = settings.gcm_api_key or env.get(key_variable, "")
    if not api_key:
        raise SettingsError("gcm_api_key", f"GCM CCS needs an API key: set it, or {key_variable}")
    try:
        config = CcsConfig(
            sender_id=settings.gcm_sender_id,
            api_key=api_key,
            preprod=settings.gcm_preprod,
            **({"host": settings.gcm_host} if settings.gcm_host else {}),
            port=settings.gcm_port or None,
            ca_file=settings.gcm_ca_file,
            time_to_live=settings.gcm_time_to_live,
        )
    except ValueError as error:
        raise SettingsError("gcm_sender_id", f"GCM CCS is set up wrong: {error}") from None
    return lambda sink: GcmCcsProviderActor.start(
        config=config, token_sink=sink, upstream_sink=sink, counters=counters
    )


def _fcm(settings: Settings, counters: PushCounters) -> StartProvider:
    from .fcm import FcmConfig, FcmProviderActor, load_service_account

    try:
        load_service_account(settings.fcm_service_account_file)
        config = FcmConfig(
            service_account_file=settings.fcm_service_account_file,
            project_id=settings.fcm_project_id or None,
            **({"endpoint": settings.fcm_endpoint} if settings.fcm_endpoint else {}),
            token_uri=settings.fcm_token_uri or None,
            ca_file=settings.fcm_ca_file,
        )
    except ValueError as error:
        raise SettingsError("fcm_service_account_file", f"FCM is set up wrong: {error}") from None
    return lambda sink: FcmProviderActor.start(config=config, token_sink=sink, counters=counters)
