"""What a device's credentials (a JWT or a client certificate) name.

``registration`` is a random id the store gives a device when it is
registered. Every token and certificate issued for the device carries it, and
authentication checks it against the store: removing the device (or removing
and registering it again) makes all of its earlier credentials worthless.
"""
from __future__ import annotations

from typing import NamedTuple


class DeviceIdentity(NamedTuple):
    user: str
    device: str
    registration: str
