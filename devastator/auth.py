"""JWTs for devices: HS256, signed with the server's current key, checked by ``kid``.

The claims name the user (``sub``) and the device (``dev``); ``exp`` is always
required. Only HS256 is accepted, so neither ``alg: none`` nor a public key
passed off as an HMAC secret can get through.
"""
from __future__ import annotations

import time

import jwt

from .protocol import is_valid_device_id, is_valid_user_id
from .protocol.errors import Forbidden
from .secrets import JwtKeys

ALGORITHM = "HS256"
ISSUER = "devastator"


class JwtAuthority:
    def __init__(self, keys: JwtKeys, *, leeway_seconds: int = 30):
        self._keys = keys
        self._leeway = leeway_seconds

    def mint(self, user: str, device: str, ttl_seconds: int, *, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims = {"iss": ISSUER, "sub": user, "dev": device, "iat": issued, "exp": issued + ttl_seconds}
        return jwt.encode(
            claims, self._keys.current_secret, algorithm=ALGORITHM, headers={"kid": self._keys.current_kid}
        )

    def verify(self, token: str) -> tuple[str, str]:
        """(user, device) of a valid token; raises Forbidden saying why not."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise Forbidden(f"malformed token: {error}") from None
        secret = self._keys.keys.get(header.get("kid"))
        if secret is None:
            raise Forbidden("token signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                leeway=self._leeway,
                options={"require": ["exp", "sub", "dev", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise Forbidden("token expired") from None
        except jwt.PyJWTError as error:
            raise Forbidden(f"invalid token: {error}") from None
        user, device = claims["sub"], claims["dev"]
        if not (isinstance(user, str) and is_valid_user_id(user)):
            raise Forbidden("token names no valid user")
        if not (isinstance(device, str) and is_valid_device_id(device)):
            raise Forbidden("token names no valid device")
        return user, device
