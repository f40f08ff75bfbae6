"""JWTs for devices: HS256, signed with the server's current key, checked by ``kid``.

The claims name the user (``sub``), the device (``dev``) and the device's
registration (``reg``, checked against the store when the token is used, so
that removing a device revokes its tokens); ``exp`` is always required. Only
HS256 is accepted, so neither ``alg: none`` nor a public key passed off as an
HMAC secret can get through. Keys come from the keys file, read again when
``jwt rotate`` changes it: new tokens use the new key, old ones stay valid
until they expire.
"""
from __future__ import annotations

import time

import jwt

from .identity import DeviceIdentity
from .protocol import is_valid_device_id, is_valid_user_id
from .protocol.errors import Forbidden
from .secrets import JwtKeyFile

ALGORITHM = "HS256"
ISSUER = "devastator"
MAX_REGISTRATION_CHARS = 64


class JwtAuthority:
    def __init__(self, key_file: JwtKeyFile, *, leeway_seconds: int = 30):
        self._key_file = key_file
        self._leeway = leeway_seconds

    def mint(self, identity: DeviceIdentity, ttl_seconds: int, *, now: float | None = None) -> str:
        keys = self._key_file.keys()
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": ISSUER,
            "sub": identity.user,
            "dev": identity.device,
            "reg": identity.registration,
            "iat": issued,
            "exp": issued + ttl_seconds,
        }
        return jwt.encode(claims, keys.current_secret, algorithm=ALGORITHM, headers={"kid": keys.current_kid})

    def verify(self, token: str) -> DeviceIdentity:
        """The device a valid token names; raises Forbidden saying why not.

        The registration is not checked here: the store does that.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Forbidden("malformed token") from None
        kid = header.get("kid")
        secret = self._key_file.keys().keys.get(kid) if isinstance(kid, str) else None
        if secret is None:
            raise Forbidden("token signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                leeway=self._leeway,
                options={"require": ["exp", "sub", "dev", "reg", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise Forbidden("token expired") from None
        except jwt.InvalidSignatureError:
            raise Forbidden("token signature invalid") from None
        except jwt.PyJWTError:
            raise Forbidden("invalid token") from None
        user, device, registration = claims["sub"], claims["dev"], claims["reg"]
        if not (isinstance(user, str) and is_valid_user_id(user)):
            raise Forbidden("token names no valid user")
        if not (isinstance(device, str) and is_valid_device_id(device)):
            raise Forbidden("token names no valid device")
        if not (isinstance(registration, str) and 0 < len(registration) <= MAX_REGISTRATION_CHARS):
            raise Forbidden("token names no valid registration")
        return DeviceIdentity(user, device, registration)
