"""Push notifications that wake offline devices: one provider actor per platform."""
from .base import Platform, PushCounters, PushPlatforms, PushRequest, PushTokenRejected, UpstreamMessage

__all__ = ["Platform", "PushCounters", "PushPlatforms", "PushRequest", "PushTokenRejected", "UpstreamMessage"]
