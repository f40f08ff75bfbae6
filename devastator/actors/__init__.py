"""The actors: router, user mailboxes, devices, the store writer."""
from .device import DeviceActor, DeviceLimits
from .router import RouterActor
from .store import StoreActor
from .user import UserActor

__all__ = ["DeviceActor", "DeviceLimits", "RouterActor", "StoreActor", "UserActor"]
