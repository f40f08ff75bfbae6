"""The secrets that sign and verify the server's JWTs, kept in ``jwt-keys.json``.

The file maps key ids (the JWT ``kid`` header) to base64url secrets and names
the current one, which signs new tokens. Rotation adds a key and makes it
current but keeps the old ones, so tokens already handed out stay valid until
an operator removes their key from the file.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devastator.pki import PRIVATE_FILE_MODE, ensure_private_dir, write_file_atomically

log = logging.getLogger(__name__)

JWT_KEYS_FILE = "jwt-keys.json"
SECRET_BYTES = 32
# HS256 needs at least as many secret bytes as the hash has (RFC 7518 3.2).
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class JwtKeys:
    """The signing secrets by key id, and the id of the one that signs new tokens."""

    current_kid: str
    # repr=False: these objects end up in logs and tracebacks.
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.current_kid not in self.keys:
            raise ValueError(f"current key id {self.current_kid!r} is not among the keys")
        # A read-only copy: a caller's later changes must not alter our keys.
        object.__setattr__(self, "keys", types.MappingProxyType(dict(self.keys)))

    @property
    def current_secret(self) -> bytes:
        return self.keys[self.current_kid]


def jwt_keys_path(data_dir: Path) -> Path:
    return Path(data_dir) / JWT_KEYS_FILE


def ensure_jwt_keys(data_dir: Path) -> JwtKeys:
    """Load the keys file, creating it with one fresh key if it is missing."""
    path = jwt_keys_path(data_dir)
    if path.exists():
        return _load(path)
    ensure_private_dir(Path(data_dir))
    kid = _new_kid(())
    jwt_keys = JwtKeys(current_kid=kid, keys={kid: secrets.token_bytes(SECRET_BYTES)})
    _save(path, jwt_keys)
    return jwt_keys


def rotate_jwt_keys(data_dir: Path) -> JwtKeys:
    """Add a fresh key and make it current; older keys still verify tokens."""
    existing = ensure_jwt_keys(data_dir)
    kid = _new_kid(existing.keys)
    rotated = JwtKeys(current_kid=kid, keys={**existing.keys, kid: secrets.token_bytes(SECRET_BYTES)})
    _save(jwt_keys_path(data_dir), rotated)
    return rotated


class JwtKeyFile:
    """The keys file as a running server sees it: read again whenever it changes.

    ``jwt rotate`` runs in another process; a stat per use is how the server
    notices, without a timer or a signal, and starts signing with the new key.
    """

    def __init__(self, data_dir: Path):
        self._data_dir = Path(data_dir)
        self._path = jwt_keys_path(data_dir)
        self._keys: JwtKeys | None = None
        self._stamp: tuple[int, int, int] | None = None

    def keys(self) -> JwtKeys:
        stamp = file_stamp(self._path)
        if self._keys is None or stamp != self._stamp:
            try:
                self._keys = ensure_jwt_keys(self._data_dir)
            except (OSError, ValueError) as error:
                if self._keys is None:
                    raise
                log.error("cannot reload JWT keys, still using the ones loaded before: %s", error)
            self._stamp = file_stamp(self._path)
        return self._keys


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a re-read file changed (None: there is none); the API keys use it too."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    # The inode changes with every atomic replace, even within one mtime tick.
    return status.st_ino, status.st_mtime_ns, status.st_size


def _new_kid(taken: Collection[str]) -> str:
    while True:
        kid = secrets.token_hex(4)
        if kid not in taken:
            return kid


def _save(path: Path, jwt_keys: JwtKeys) -> None:
    document = {
        "current": jwt_keys.current_kid,
        "keys": {kid: _encode(secret) for kid, secret in jwt_keys.keys.items()},
    }
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    write_file_atomically(path, text.encode("utf-8"), mode=PRIVATE_FILE_MODE)


def _load(path: Path) -> JwtKeys:
    try:
        document = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object")
    current = document.get("current")
    encoded_keys = document.get("keys")
    if not isinstance(current, str) or not isinstance(encoded_keys, dict):
        raise ValueError(f'{path}: expected {{"current": kid, "keys": {{kid: secret}}}}')
    keys: dict[str, bytes] = {}
    for kid, encoded in encoded_keys.items():
        secret = _decode(encoded) if isinstance(encoded, str) else None
        if secret is None or len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"{path}: key {kid!r} is not a base64url secret of at least {MIN_SECRET_BYTES} bytes")
        keys[kid] = secret
    if current not in keys:
        raise ValueError(f"{path}: current key id {current!r} is not among the keys")
    return JwtKeys(current_kid=current, keys=keys)


def _encode(secret: bytes) -> str:
    # Unpadded, as base64url values are written in JOSE (RFC 7515).
    return base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes | None:
    """The secret encoded in ``text``, padded or not; None if it is not base64url."""
    try:
        # validate=True: stray characters are corruption, not noise to skip.
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
