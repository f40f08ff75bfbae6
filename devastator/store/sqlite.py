"""The embedded store: one SQLite file in WAL mode, no set-up.

Tables: users, devices, messages (one row per recipient's mailbox entry, its
``seq`` the acceptance order), pending (which device still waits for which
mailbox entry) and sends (the ``cid`` idempotency records). A message is
retired when no pending row points at it any more, or when it expires.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Sequence

from .base import Accepted, Attachment, MessageIds, StoredMessage, UnknownUserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    created INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    created INTEGER NOT NULL,
    attached INTEGER,              -- first authentication, NULL until then
    PRIMARY KEY (user, device)
) WITHOUT ROWID;
-- AUTOINCREMENT: a seq is never reused, so a device's "after seq" cursor stays right.
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    body BLOB NOT NULL,
    ts INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_recipient ON messages (recipient, seq);
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages (expires);
CREATE TABLE IF NOT EXISTS pending (
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (user, device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_by_seq ON pending (seq);
CREATE TABLE IF NOT EXISTS sends (
    sender TEXT NOT NULL,
    cid TEXT NOT NULL,
    id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (sender, cid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sends_by_expiry ON sends (expires);
"""

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
KNOWN_USERS_KEPT = 100_000


class SqliteStore:
    """The Store interface on one SQLite database file."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL", busy_timeout_ms: int = 5000):
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self.path = Path(path)
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._db: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._transaction = _Transaction(self)
        self._ids = MessageIds()
        # Users are never removed while the store is open, so "exists" can be kept
        # (bounded: forgotten wholesale when it grows large).
        self._known_users: set[str] = set()

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA foreign_keys = OFF")
        # Commits leave copying the log into the database file to checkpoint(), unless
        # that falls far behind (a safety valve: 65,536 pages, 256 MB); a log that
        # grew in a burst is cut back to 64 MB once it has been copied.
        db.execute("PRAGMA wal_autocheckpoint = 65536")
        db.execute(f"PRAGMA journal_size_limit = {64 << 20}")
        db.executescript(SCHEMA)
        self._db = db
        self._checkpointer = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        db.execute(f"PRAGMA synchronous = {self._synchronous}")
        return db

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._db is not None:
            self._db.close()  # the last connection to close checkpoints what is left
            self._db = None

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file. Blocking: run it in a worker thread.

        Left to SQLite, a commit does this every 1,000 pages, inside the
        commit: the copy and its fsync took 150-300 ms on this disk, a stall of
        every connection. On its own connection it runs beside the commits,
        and SQLite lets go of the GIL for the whole statement.
        """
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def batch(self) -> _Transaction:
        return self._transaction

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"store {self.path} is not open")
        return self._db

    # -- delivery path -------------------------------------------------------

    def append(
        self,
        sender: str,
        recipients: Sequence[str],
        message_json: bytes,
        cid: str | None,
        ttl_seconds: int,
        now_ms: int,
    ) -> Accepted:
        db = self._conn
        with self.batch():
            if cid is not None:
                row = db.execute(
                    "SELECT id, ts, expires FROM sends WHERE sender = ? AND cid = ? AND expires > ?",
                    (sender, cid, now_ms),
                ).fetchone()
                if row is not None:
                    return Accepted(id=row[0], ts=row[1], expires=row[2], messages=(), duplicate=True)
            unknown = [user for user in recipients if not self._user_exists(user)]
            if unknown:
                raise UnknownUserError(unknown)
            message_id = self._ids.new(now_ms)
            expires = now_ms + ttl_seconds * 1000
            stored = []
            for recipient in recipients:
                cursor = db.execute(
                    "INSERT INTO messages (id, sender, recipient, body, ts, expires)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (message_id, sender, recipient, message_json, now_ms, expires),
                )
                seq = cursor.lastrowid
                db.execute(
                    "INSERT INTO pending (user, device, seq)"
                    " SELECT user, device, ? FROM devices WHERE user = ?",
                    (seq, recipient),
                )
                stored.append(
                    StoredMessage(seq, message_id, sender, recipient, message_json, now_ms, expires)
                )
            if cid is not None:
                db.execute(
                    "INSERT OR REPLACE INTO sends (sender, cid, id, ts, expires) VALUES (?, ?, ?, ?, ?)",
                    (sender, cid, message_id, now_ms, expires),
                )
        return Accepted(id=message_id, ts=now_ms, expires=expires, messages=tuple(stored))

    def attach_device(self, user: str, device: str, now_ms: int) -> Attachment:
        db = self._conn
        with self.batch():
            row = db.execute(
                "SELECT attached FROM devices WHERE user = ? AND device = ?", (user, device)
            ).fetchone()
            if row is None or row[0] is None:
                if not self._user_exists(user):
                    raise UnknownUserError([user])
                if row is None:
                    db.execute(
                        "INSERT INTO devices (user, device, created, attached) VALUES (?, ?, ?, ?)",
                        (user, device, now_ms, now_ms),
                    )
                else:
                    db.execute(
                        "UPDATE devices SET attached = ? WHERE user = ? AND device = ?",
                        (now_ms, user, device),
                    )
                # A device's first authentication: it gets what is still stored for its user.
                db.execute(
                    "INSERT OR IGNORE INTO pending (user, device, seq)"
                    " SELECT ?, ?, seq FROM messages WHERE recipient = ? AND expires > ?",
                    (user, device, user, now_ms),
                )
            (count,) = db.execute(
                "SELECT count(*) FROM pending p JOIN messages m ON m.seq = p.seq"
                " WHERE p.user = ? AND p.device = ? AND m.expires > ?",
                (user, device, now_ms),
            ).fetchone()
        return Attachment(pending=count)

    def load_pending(
        self, user: str, device: str, after_seq: int, limit: int, now_ms: int
    ) -> list[StoredMessage]:
        rows = self._conn.execute(
            "SELECT m.seq, m.id, m.sender, m.body, m.ts, m.expires"
            " FROM pending p JOIN messages m ON m.seq = p.seq"
            " WHERE p.user = ? AND p.device = ? AND p.seq > ? AND m.expires > ?"
            " ORDER BY p.seq LIMIT ?",
            (user, device, after_seq, now_ms, limit),
        ).fetchall()
        return [
            StoredMessage(seq, message_id, sender, user, body, ts, expires)
            for seq, message_id, sender, body, ts, expires in rows
        ]

    def ack(self, user: str, device: str, seqs: Sequence[int]) -> None:
        db = self._conn
        with self.batch():
            db.executemany(
                "DELETE FROM pending WHERE user = ? AND device = ? AND seq = ?",
                [(user, device, seq) for seq in seqs],
            )
            db.executemany(
                "DELETE FROM messages WHERE seq = ?"
                " AND NOT EXISTS (SELECT 1 FROM pending WHERE pending.seq = ?)",
                [(seq, seq) for seq in seqs],
            )

    def purge_expired(self, now_ms: int) -> int:
        db = self._conn
        with self.batch():
            db.execute(
                "DELETE FROM pending WHERE seq IN (SELECT seq FROM messages WHERE expires <= ?)",
                (now_ms,),
            )
            purged = db.execute("DELETE FROM messages WHERE expires <= ?", (now_ms,)).rowcount
            db.execute("DELETE FROM sends WHERE expires <= ?", (now_ms,))
        return purged

    # -- operators -----------------------------------------------------------

    def add_user(self, user: str, now_ms: int) -> bool:
        with self.batch():
            created = self._conn.execute(
                "INSERT OR IGNORE INTO users (id, created) VALUES (?, ?)", (user, now_ms)
            ).rowcount == 1
        return created

    def add_device(self, user: str, device: str, now_ms: int) -> bool:
        with self.batch():
            if not self._user_exists(user):
                raise UnknownUserError([user])
            return self._conn.execute(
                "INSERT OR IGNORE INTO devices (user, device, created) VALUES (?, ?, ?)",
                (user, device, now_ms),
            ).rowcount == 1

    def list_users(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT id FROM users ORDER BY id")]

    def list_devices(self, user: str) -> list[str]:
        return [
            row[0]
            for row in self._conn.execute(
                "SELECT device FROM devices WHERE user = ? ORDER BY device", (user,)
            )
        ]

    def _user_exists(self, user: str) -> bool:
        if user in self._known_users:
            return True
        if self._conn.execute("SELECT 1 FROM users WHERE id = ?", (user,)).fetchone() is None:
            return False
        if len(self._known_users) >= KNOWN_USERS_KEPT:
            self._known_users.clear()
        self._known_users.add(user)
        return True


class _Transaction:
    """One SQLite transaction; entered again inside itself, the outermost one commits."""

    __slots__ = ("_store", "_depth")

    def __init__(self, store: SqliteStore):
        self._store = store
        self._depth = 0

    def __enter__(self) -> None:
        if self._depth == 0:
            self._store._conn.execute("BEGIN IMMEDIATE")
        self._depth += 1

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._store._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
