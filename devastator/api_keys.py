"""The server API's keys (PROTOCOL.md 8), kept hashed in ``api-keys.json`` in the data directory.

A key is ``dvk_<id>_<secret>``: ``id`` is 8 hex digits that name its entry,
``secret`` 43 base64url characters of 32 random bytes. It is printed once,
when ``apikey create`` makes it; the file keeps only its SHA-256 (with its
name, id and when it was made), so a copy of the file lets nobody in. The
file is written atomically and 0600, like ``jwt-keys.json``; a cluster of
nodes shares keys the same way, with the same file in each node's data
directory.

A running server reads the file again whenever it changes (a stat per
request: inode, mtime, size), so a key removed by ``apikey remove`` in
another process is refused at its next use. Verification finds the entry by
the id the key carries and compares the hashes with ``hmac.compare_digest``;
a malformed key costs the same hash and comparison as a wrong one.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .pki import PRIVATE_FILE_MODE, ensure_private_dir, write_file_atomically
from .secrets import file_stamp

log = logging.getLogger(__name__)

API_KEYS_FILE = "api-keys.json"
KEY_PREFIX = "dvk"
SECRET_BYTES = 32
KEY_PATTERN = re.compile(r"dvk_([0-9a-f]{8})_[A-Za-z0-9_-]{43}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
# What a malformed key is compared with: the same work as a wrong key, and never a match.
_NO_HASH = "0" * 64


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as the file keeps it: never the key itself."""

    name: str
    id: str
    hash: str  # SHA-256 of the whole key, hex
    created: int  # ms since the epoch


class ApiKeyError(ValueError):
    """An operator's request that cannot be done (a name taken, invalid, unknown)."""


def api_keys_path(data_dir: Path) -> Path:
    return Path(data_dir) / API_KEYS_FILE


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def is_valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def load_api_keys(data_dir: Path) -> list[ApiKey]:
    """The keys in the file, oldest first; none if there is no file. Raises ValueError for a broken one."""
    path = api_keys_path(data_dir)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return []
    return _parse(path, text)


def create_api_key(data_dir: Path, name: str, *, now_ms: int | None = None) -> tuple[str, ApiKey]:
    """Make a key named ``name``: (the key, to be shown once, and what the file keeps)."""
    if not is_valid_name(name):
        raise ApiKeyError(f"invalid key name {name!r} (1-64 of A-Z a-z 0-9 . _ @ -)")
    with _locked(data_dir):
        return _create(data_dir, name, now_ms)


def _create(data_dir: Path, name: str, now_ms: int | None) -> tuple[str, ApiKey]:
    keys = load_api_keys(data_dir)
    if any(entry.name == name for entry in keys):
        raise ApiKeyError(f"a key named {name!r} exists already (remove it first to replace it)")
    taken = {entry.id for entry in keys}
    while True:
        key_id = secrets.token_hex(4)
        if key_id not in taken:
            break
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    assert KEY_PATTERN.fullmatch(key)
    created = ApiKey(name, key_id, hash_key(key), int(time.time() * 1000) if now_ms is None else now_ms)
    _save(data_dir, [*keys, created])
    return key, created


def remove_api_key(data_dir: Path, name: str) -> bool:
    """Revoke the key named ``name``; False if there is none."""
    with _locked(data_dir):
        keys = load_api_keys(data_dir)
        kept = [entry for entry in keys if entry.name != name]
        if len(kept) == len(keys):
            return False
        _save(data_dir, kept)
        return True


@contextlib.contextmanager
def _locked(data_dir: Path):
    """Two operators' commands at once: each reads the file the other wrote (a lock on the directory)."""
    ensure_private_dir(Path(data_dir))
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


class ApiKeyFile:
    """The keys file as a running server sees it: read again whenever it changes.

    A file that cannot be read or parsed refuses every key (logged once per
    change of the file): a broken file must not keep a revoked key working.
    """

    def __init__(self, data_dir: Path):
        self._data_dir = Path(data_dir)
        self._path = api_keys_path(data_dir)
        self._by_id: dict[str, ApiKey] = {}
        self._stamp: tuple[int, int, int] | None | bool = False  # False: never read

    def verify(self, key: str) -> ApiKey | None:
        """The entry of a valid key, or None: malformed, unknown and revoked keys alike."""
        by_id = self._keys()
        matched = KEY_PATTERN.fullmatch(key)
        entry = by_id.get(matched.group(1)) if matched else None
        expected = entry.hash if entry is not None else _NO_HASH
        # Hashed and compared whether or not the id matched, in constant time.
        if hmac.compare_digest(hash_key(key), expected) and entry is not None:
            return entry
        return None

    def _keys(self) -> dict[str, ApiKey]:
        stamp = file_stamp(self._path)
        if stamp != self._stamp:
            try:
                keys = load_api_keys(self._data_dir)
            except (OSError, ValueError) as error:
                log.error("cannot read the API keys, refusing every key until the file is fixed: %s", error)
                keys = []
            self._by_id = {entry.id: entry for entry in keys}
            self._stamp = stamp
        return self._by_id


def _save(data_dir: Path, keys: list[ApiKey]) -> None:
    document = {"keys": [{"name": k.name, "id": k.id, "sha256": k.hash, "created": k.created} for k in keys]}
    text = json.dumps(document, indent=2) + "\n"
    write_file_atomically(api_keys_path(data_dir), text.encode("utf-8"), mode=PRIVATE_FILE_MODE)


def _parse(path: Path, text: bytes) -> list[ApiKey]:
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{path}: expected {{"keys": [{{"name", "id", "sha256", "created"}}, ...]}}')
    keys = []
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("id"), str) and re.fullmatch(r"[0-9a-f]{8}", entry["id"])
            and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            and type(entry.get("created")) is int
        ):
            raise ValueError(f"{path}: an entry is not {{name, id (8 hex), sha256 (64 hex), created (ms)}}: {entry!r}")
        keys.append(ApiKey(entry["name"], entry["id"], entry["sha256"], entry["created"]))
    return keys
