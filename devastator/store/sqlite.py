"""The embedded store: one SQLite file in WAL mode, no set-up.

Tables: users, devices, messages (one row per mailbox entry, its ``seq`` the
acceptance order; ``kind`` NULL for a message to its recipient, else "copy"
or "receipt"), wanted_receipts (a recipient's entry of a message that asked
for receipts, until its read receipt is made or it expires), history (one
row per message and recipient while the history period lasts, found by the
conversation's two users and the message id, which sorts by time), pending (which device still waits for which
mailbox entry), sends (the ``cid`` idempotency records), removals (the
devices removed lately, which running servers poll) and counts (the rows of
users, devices, messages and pending, kept by every transaction that changes
them, so that telemetry never counts over a table). A message is retired
when no pending row points at it any more, or when it expires.

A batch is one transaction: all of its calls commit, or none (``all_or_nothing``).
"""
from __future__ import annotations

import os
import contextlib
import secrets
import sqlite3
from pathlib import Path
from typing import NamedTuple, Sequence

import gevent
import gevent.threadpool
import orjson

from .base import (
    COPY,
    MESSAGE,
    NO_RECEIPTS,
    RECEIPT,
    Accepted,
    HistoryPage,
    Receipts,
    Send,
    receipt_id,
    receipt_json,
    Attachment,
    DeviceRecord,
    MessageIds,
    PushTarget,
    RemovedDevices,
    StoredMessage,
    StoreError,
    UnknownDeviceError,
    UnknownUserError,
)

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
    registration TEXT,             -- carried by the device's credentials
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
CREATE TABLE IF NOT EXISTS removals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS wanted_receipts (
    recipient TEXT NOT NULL,
    id TEXT NOT NULL,              -- the message's
    sender TEXT NOT NULL,          -- who gets the receipts
    ttl_ms INTEGER NOT NULL,       -- a receipt lives as long as its message did
    expires INTEGER NOT NULL,      -- the message's
    delivered INTEGER NOT NULL DEFAULT 0,  -- its delivered receipt is stored
    PRIMARY KEY (recipient, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS wanted_receipts_by_expiry ON wanted_receipts (expires);
-- The conversation of users a <= b; rowid order is insertion (and so time) order, which purges follow.
CREATE TABLE IF NOT EXISTS history (
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    body BLOB NOT NULL,
    ts INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_conversation ON history (a, b, id);
CREATE TABLE IF NOT EXISTS counts (
    name TEXT PRIMARY KEY,          -- one of COUNTED
    n INTEGER NOT NULL
) WITHOUT ROWID;
"""
# The tables whose rows ``counts`` keeps (and stats() reports).
COUNTED = ("users", "devices", "messages", "pending")
# Columns added after a table was first created: (table, column, declaration).
LATER_COLUMNS = (
    ("devices", "registration", "TEXT"),
    ("devices", "push_platform", "TEXT"),
    ("devices", "push_token", "TEXT"),
    ("messages", "kind", "TEXT"),  # NULL: MESSAGE
    ("messages", "to_json", "BLOB"),  # a COPY's "to" as sent
)
# Indexes on later columns: made once the columns surely exist.
LATER_INDEXES = "CREATE INDEX IF NOT EXISTS devices_by_push_token ON devices (push_token);"
# A mailbox entry and its pending rows, written with one executemany each (see _write_entries).
INSERT_ENTRY = (
    "INSERT INTO messages (seq, id, sender, recipient, body, ts, expires, kind, to_json)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_PENDING = "INSERT INTO pending (user, device, seq) VALUES (?, ?, ?)"
# The last seq ever given (AUTOINCREMENT keeps it in sqlite_sequence, even once its row is gone).
LAST_SEQ = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), (SELECT max(seq) FROM messages), 0)"
)
# A device has an entry: its pending row goes, and the entry once no device waits for it.
ACK_PENDING = "DELETE FROM pending WHERE user = ? AND device = ? AND seq = ?"
RETIRE_MESSAGE = "DELETE FROM messages WHERE seq = ? AND NOT EXISTS (SELECT 1 FROM pending WHERE pending.seq = ?)"
# Servers poll removals every second or so; a day is ample for one to catch up.
REMOVALS_KEPT_MS = 24 * 3600 * 1000
REGISTRATION_BYTES = 12

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
DATABASE_FILE_MODE = 0o600  # the messages: for the server's user only
KNOWN_USERS_KEPT = 100_000
# History rows one purge drops at most: a purge holds the write lock while it runs.
HISTORY_PURGED_AT_ONCE = 20_000
# Placeholders in one IN (...) list.
IDS_AT_ONCE = 500


class SqliteStore:
    """The Store interface on one SQLite database file."""

    all_or_nothing = True

    def __init__(
        self, path: Path | str, *, synchronous: str = "FULL", busy_timeout_ms: int = 5000, history_period_ms: int = 0
    ):
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self.path = Path(path)
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self.history_period_ms = history_period_ms
        self._db: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        # One thread of this store's own for its COMMITs (see _Transaction.__exit__): a shared
        # pool may make a transaction wait for a slot while it holds the write lock.
        self._committer: gevent.threadpool.ThreadPool | None = None
        self._transaction = _Transaction(self)
        self._ids = MessageIds()
        # Users are never removed while the store is open, so "exists" can be kept
        # (bounded: forgotten wholesale when it grows large, and when a transaction
        # that may have added one rolls back).
        self._known_users: set[str] = set()
        # Rows added (or removed, < 0) by the open transaction, per COUNTED table:
        # written to ``counts`` in the same transaction, just before it commits.
        self._deltas = dict.fromkeys(COUNTED, 0)
        # Within one transaction (BEGIN IMMEDIATE: no other process writes meanwhile), each
        # user's devices are read once: user -> its device ids and push targets. Calls
        # that change devices forget the user's entry; every transaction's end forgets all.
        self._devices_now: dict[str, _UserDevices] = {}
        # Users who may have wanted_receipts rows (a superset: rebuilt at open and at each purge;
        # only this process makes such rows, as a SQLite store has one server process), so an
        # ACK of a user with none costs no query.
        self._receipt_recipients: set[str] = set()
        # History rows of the open transaction, written with one executemany before it commits.
        self._history_rows: list[tuple] = []
        # The mailbox entries (and their pending rows) of the running call, written with one
        # executemany each when it ends (_write_entries), before anything reads them. Their seqs
        # are given here, counting on from LAST_SEQ, read once a transaction (which holds the
        # write lock): the same seqs AUTOINCREMENT would give.
        self._next_seq: int | None = None
        self._entry_rows: list[tuple] = []
        self._pending_rows: list[tuple] = []
        self._grouping = False  # append_many runs: its appends leave the writing to it

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Made private before SQLite opens it (it would make it 0644): its -wal and -shm take its mode.
        # Only a new file: closing a descriptor of an open database drops this process's locks on it.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, DATABASE_FILE_MODE))
        db = self._connect()
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA foreign_keys = OFF")
        # Commits leave copying the log into the database file to checkpoint(), unless
        # that falls far behind (a safety valve: 65,536 pages, 256 MB); a log that
        # grew in a burst is cut back to 64 MB once it has been copied.
        db.execute("PRAGMA wal_autocheckpoint = 65536")
        db.execute(f"PRAGMA journal_size_limit = {64 << 20}")
        db.executescript(SCHEMA)
        for table, column, declaration in LATER_COLUMNS:
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        db.executescript(LATER_INDEXES)
        _count_once(db)
        self._db = db
        self._load_receipt_recipients()
        self._checkpointer = self._connect()
        self._committer = gevent.threadpool.ThreadPool(1)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        db.execute(f"PRAGMA synchronous = {self._synchronous}")
        return db

    def close(self) -> None:
        if self._committer is not None:
            self._committer.kill()
            self._committer = None
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

    def _forget_transaction(self) -> None:
        self._deltas = dict.fromkeys(COUNTED, 0)
        self._devices_now.clear()
        self._history_rows = []
        self._next_seq = None
        self._entry_rows = []
        self._pending_rows = []

    def _new_seq(self) -> int:
        seq = self._next_seq
        if seq is None:
            seq = self._conn.execute(LAST_SEQ).fetchone()[0] + 1
        self._next_seq = seq + 1
        return seq

    def _write_entries(self) -> None:
        """Write the entries _store_entry and _store_copy gathered (the end of each call that makes them)."""
        db = self._conn
        if self._entry_rows:
            db.executemany(INSERT_ENTRY, self._entry_rows)
            self._entry_rows = []
        if self._pending_rows:
            db.executemany(INSERT_PENDING, self._pending_rows)
            self._pending_rows = []

    def _count(self, table: str, rows: int) -> None:
        """``rows`` rows added to (or removed from) ``table`` in the open transaction."""
        self._deltas[table] += rows

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
        *,
        receipt: bool = False,
        to_json: bytes = b"",
        origin_device: str | None = None,
    ) -> Accepted:
        with self.batch():
            accepted = self._append(sender, recipients, message_json, cid, ttl_seconds, now_ms, receipt, to_json,
                                    origin_device)
            if not self._grouping:
                self._write_entries()
        return accepted

    def _append(
        self, sender: str, recipients: Sequence[str], message_json: bytes, cid: str | None, ttl_seconds: int,
        now_ms: int, receipt: bool, to_json: bytes, origin_device: str | None,
    ) -> Accepted:
        """append's work, in its caller's transaction; its entries wait for _write_entries."""
        db = self._conn
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
        ttl_ms = ttl_seconds * 1000
        expires = now_ms + ttl_ms
        stored = []
        push_targets = []
        for recipient in recipients:
            seq = self._store_entry(message_id, sender, recipient, message_json, now_ms, expires, push_targets)
            stored.append(StoredMessage(seq, message_id, sender, recipient, message_json, now_ms, expires))
            if self.history_period_ms:
                a, b = (sender, recipient) if sender <= recipient else (recipient, sender)
                self._history_rows.append((a, b, message_id, sender, recipient, message_json, now_ms, expires))
            if receipt and recipient != sender:
                self._receipt_recipients.add(recipient)  # not forgotten at a rollback: a superset
                db.execute(
                    "INSERT OR IGNORE INTO wanted_receipts (recipient, id, sender, ttl_ms, expires)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (recipient, message_id, sender, ttl_ms, expires),
                )
        if sender not in recipients:
            copy = self._store_copy(
                message_id, sender, message_json, now_ms, expires, recipients, to_json, origin_device
            )
            if copy is not None:
                stored.append(copy)
        if cid is not None:
            db.execute(
                "INSERT OR REPLACE INTO sends (sender, cid, id, ts, expires) VALUES (?, ?, ?, ?, ?)",
                (sender, cid, message_id, now_ms, expires),
            )
        return Accepted(
            id=message_id, ts=now_ms, expires=expires, messages=tuple(stored), push_targets=tuple(push_targets)
        )

    def _store_entry(
        self, entry_id: str, sender: str, owner: str, body: bytes, now_ms: int, expires: int,
        push_targets: list | None, kind: str | None = None,
    ) -> int:
        """A mailbox entry of ``owner``'s, waiting for each of its devices; its seq (written by _write_entries).

        The owner's devices with push tokens are added to ``push_targets`` (unless None).
        """
        # The devices read once a transaction (_devices_of), not looked up again per entry.
        devices = self._devices_of(owner)
        if push_targets is not None and devices.push_targets:
            push_targets.extend(devices.push_targets)
        seq = self._new_seq()
        self._entry_rows.append((seq, entry_id, sender, owner, body, now_ms, expires, kind, None))
        ids = devices.ids
        if len(ids) == 1:
            self._pending_rows.append((owner, ids[0], seq))
        elif ids:
            self._pending_rows.extend([(owner, device, seq) for device in ids])
        deltas = self._deltas  # _count, inline: this runs for every entry
        deltas["messages"] += 1
        deltas["pending"] += len(ids)
        return seq

    def _store_copy(
        self, message_id: str, sender: str, body: bytes, now_ms: int, expires: int, recipients: Sequence[str],
        to_json: bytes, origin_device: str | None,
    ) -> StoredMessage | None:
        """The sender's COPY, for its devices but ``origin_device``; None when it has no such device.

        Its ``to`` is ``to_json``, or else the recipients'. Written by _write_entries.
        """
        devices = [device for device in self._devices_of(sender).ids if device != origin_device]
        if not devices:
            return None  # the usual case: a sender with one device
        to_json = to_json or orjson.dumps(list(recipients))
        seq = self._new_seq()
        self._entry_rows.append((seq, message_id, sender, sender, body, now_ms, expires, COPY, to_json))
        self._pending_rows.extend([(sender, device, seq) for device in devices])
        self._count("messages", 1)
        self._count("pending", len(devices))
        return StoredMessage(seq, message_id, sender, sender, body, now_ms, expires, COPY, to_json, origin_device)

    def append_many(self, sends: Sequence[Send], now_ms: int) -> list[Accepted | UnknownUserError]:
        results: list[Accepted | UnknownUserError] = []
        with self.batch():
            self._grouping = True  # each append leaves its entries for the group's _write_entries
            try:
                for sender, recipients, message_json, cid, ttl_seconds, receipt, to_json, origin_device in sends:
                    try:
                        results.append(self.append(
                            sender, recipients, message_json, cid, ttl_seconds, now_ms,
                            receipt=receipt, to_json=to_json, origin_device=origin_device,
                        ))
                    except UnknownUserError as unknown:
                        results.append(unknown)
            finally:
                self._grouping = False
            self._write_entries()  # the group's entries: two statements for them all
        return results

    def attach_device(self, user: str, device: str, registration: str, now_ms: int) -> Attachment:
        db = self._conn
        with self.batch():
            row = db.execute(
                "SELECT attached, registration FROM devices WHERE user = ? AND device = ?", (user, device)
            ).fetchone()
            if row is None or row[1] != registration:
                if not self._user_exists(user):
                    raise UnknownUserError([user])
                raise UnknownDeviceError(user, device)
            if row[0] is None:
                db.execute(
                    "UPDATE devices SET attached = ? WHERE user = ? AND device = ?", (now_ms, user, device)
                )
                # A device's first authentication: it gets what is still stored for its user.
                copied = db.execute(
                    "INSERT OR IGNORE INTO pending (user, device, seq)"
                    " SELECT ?, ?, seq FROM messages WHERE recipient = ? AND expires > ?",
                    (user, device, user, now_ms),
                ).rowcount
                self._count("pending", copied)
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
            "SELECT m.seq, m.id, m.sender, m.body, m.ts, m.expires, m.kind, m.to_json"
            " FROM pending p JOIN messages m ON m.seq = p.seq"
            " WHERE p.user = ? AND p.device = ? AND p.seq > ? AND m.expires > ?"
            " ORDER BY p.seq LIMIT ?",
            (user, device, after_seq, now_ms, limit),
        ).fetchall()
        return [
            StoredMessage(seq, message_id, sender, user, body, ts, expires, kind or MESSAGE, to_json or b"")
            for seq, message_id, sender, body, ts, expires, kind, to_json in rows
        ]

    def ack(self, user: str, device: str, seqs: Sequence[int], now_ms: int) -> Receipts:
        db = self._conn
        with self.batch():
            receipts = self._delivered_receipts(user, seqs, now_ms)
            if len(seqs) == 1:  # one at a time, as a chat client ACKs: no parameter lists to build
                seq = seqs[0]
                done = db.execute(ACK_PENDING, (user, device, seq)).rowcount
                retired = db.execute(RETIRE_MESSAGE, (seq, seq)).rowcount
            else:
                done = db.executemany(ACK_PENDING, [(user, device, seq) for seq in seqs]).rowcount
                retired = db.executemany(RETIRE_MESSAGE, [(seq, seq) for seq in seqs]).rowcount
            self._count("pending", -done)
            self._count("messages", -retired)
        return receipts

    def _delivered_receipts(self, user: str, seqs: Sequence[int], now_ms: int) -> Receipts:
        """The delivered receipts the ACK of these entries of ``user``'s makes (none made yet)."""
        db = self._conn
        if not seqs or user not in self._receipt_recipients:
            return NO_RECEIPTS  # the usual case: no query at all
        wanted = []
        for start in range(0, len(seqs), IDS_AT_ONCE):
            chunk = list(seqs[start:start + IDS_AT_ONCE])
            wanted.extend(db.execute(
                "SELECT w.id, w.sender, w.ttl_ms FROM messages m"
                " JOIN wanted_receipts w ON w.recipient = m.recipient AND w.id = m.id"
                f" WHERE m.seq IN ({','.join('?' * len(chunk))}) AND m.recipient = ? AND m.kind IS NULL"
                " AND w.delivered = 0 AND w.expires > ?",
                (*chunk, user, now_ms),
            ))
        return self._make_receipts(user, "delivered", wanted, now_ms)

    def mark_read(self, user: str, message_ids: Sequence[str], now_ms: int) -> Receipts:
        db = self._conn
        if user not in self._receipt_recipients:
            return NO_RECEIPTS
        with self.batch():
            wanted = []
            for message_id in dict.fromkeys(message_ids):  # an id twice is read once
                wanted.extend(db.execute(
                    "SELECT id, sender, ttl_ms, delivered FROM wanted_receipts"
                    " WHERE recipient = ? AND id = ? AND expires > ?",
                    (user, message_id, now_ms),
                ))
            # Read implies delivered: a message read before any device ACKed it gets both, in that order.
            delivered = self._make_receipts(
                user, "delivered", [(mid, sender, ttl) for mid, sender, ttl, done in wanted if not done], now_ms
            )
            read = self._make_receipts(user, "read", [(mid, sender, ttl) for mid, sender, ttl, _ in wanted], now_ms)
        return Receipts(delivered.messages + read.messages, delivered.push_targets + read.push_targets)

    def _make_receipts(self, by: str, kind: str, wanted: list, now_ms: int) -> Receipts:
        """Store a ``kind`` receipt by ``by`` for each (message id, sender, ttl_ms) and note it made."""
        if not wanted:
            return NO_RECEIPTS
        db = self._conn
        stored, push_targets = [], []
        for message_id, sender, ttl_ms in wanted:
            receipt = receipt_id(message_id, kind, by)
            body = receipt_json(receipt, kind, message_id, by, now_ms)
            expires = now_ms + ttl_ms
            seq = self._store_entry(receipt, by, sender, body, now_ms, expires, push_targets, RECEIPT)
            stored.append(StoredMessage(seq, receipt, by, sender, body, now_ms, expires, RECEIPT))
        self._write_entries()
        ids = [(by, message_id) for message_id, _, _ in wanted]
        if kind == "delivered":
            db.executemany("UPDATE wanted_receipts SET delivered = 1 WHERE recipient = ? AND id = ?", ids)
        else:  # the last receipt a message gets
            db.executemany("DELETE FROM wanted_receipts WHERE recipient = ? AND id = ?", ids)
        return Receipts(tuple(stored), tuple(push_targets))

    def history(self, user: str, peer: str, before: str | None, limit: int, now_ms: int) -> HistoryPage:
        if not self._user_exists(peer):
            raise UnknownUserError([peer])
        if not self.history_period_ms:
            return HistoryPage((), False)
        a, b = sorted((user, peer))
        # Ids begin with their ms in hex: the period is a bound on the index, like ``before``.
        oldest = f"{max(0, now_ms - self.history_period_ms):012x}"
        query = "SELECT id, sender, recipient, body, ts, expires FROM history WHERE a = ? AND b = ? AND id > ?"
        args: list = [a, b, oldest]
        if before is not None:
            query += " AND id < ?"
            args.append(before)
        rows = self._conn.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit + 1)).fetchall()
        return HistoryPage(
            tuple(StoredMessage(0, *row) for row in rows[:limit]),
            more=len(rows) > limit,
        )

    def purge_expired(self, now_ms: int) -> int:
        db = self._conn
        with self.batch():
            dropped = db.execute(
                "DELETE FROM pending WHERE seq IN (SELECT seq FROM messages WHERE expires <= ?)",
                (now_ms,),
            ).rowcount
            purged = db.execute("DELETE FROM messages WHERE expires <= ?", (now_ms,)).rowcount
            self._count("pending", -dropped)
            self._count("messages", -purged)
            db.execute("DELETE FROM sends WHERE expires <= ?", (now_ms,))
            db.execute("DELETE FROM wanted_receipts WHERE expires <= ?", (now_ms,))
            self._load_receipt_recipients()
            self._purge_history(now_ms - self.history_period_ms if self.history_period_ms else None)
            # Keep the newest removal row: its id is the cursor pollers resume from.
            db.execute(
                "DELETE FROM removals WHERE ts <= ? AND id < (SELECT max(id) FROM removals)",
                (now_ms - REMOVALS_KEPT_MS,),
            )
        return purged

    def _purge_history(self, before_ms: int | None) -> None:
        """Drop history from before ``before_ms`` (None: all of it, history is off), oldest first."""
        db = self._conn
        first = db.execute("SELECT rowid FROM history ORDER BY rowid LIMIT 1").fetchone()
        if first is None:
            return
        # Rows are in time order: the old ones are those before the first young one.
        young = None if before_ms is None else db.execute(
            "SELECT rowid FROM history WHERE ts >= ? ORDER BY rowid LIMIT 1", (before_ms,)
        ).fetchone()
        end = first[0] + HISTORY_PURGED_AT_ONCE
        if young is not None:
            end = min(end, young[0])
        db.execute("DELETE FROM history WHERE rowid < ?", (end,))

    # -- operators -----------------------------------------------------------

    def add_user(self, user: str, now_ms: int) -> bool:
        with self.batch():
            created = self._conn.execute(
                "INSERT OR IGNORE INTO users (id, created) VALUES (?, ?)", (user, now_ms)
            ).rowcount == 1
            self._count("users", int(created))
        return created

    def add_device(self, user: str, device: str, now_ms: int) -> str:
        self._devices_now.clear()  # its devices or tokens change
        db = self._conn
        with self.batch():
            if not self._user_exists(user):
                raise UnknownUserError([user])
            row = db.execute(
                "SELECT registration FROM devices WHERE user = ? AND device = ?", (user, device)
            ).fetchone()
            if row is not None and row[0] is not None:
                return row[0]
            registration = secrets.token_urlsafe(REGISTRATION_BYTES)
            db.execute(
                "INSERT INTO devices (user, device, created, registration) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (user, device) DO UPDATE SET registration = excluded.registration",
                (user, device, now_ms, registration),
            )
            self._count("devices", int(row is None))  # else a device from before registrations
        return registration

    def remove_device(self, user: str, device: str, now_ms: int) -> bool:
        self._devices_now.clear()  # its devices or tokens change
        db = self._conn
        with self.batch():
            if db.execute("DELETE FROM devices WHERE user = ? AND device = ?", (user, device)).rowcount == 0:
                return False
            db.execute("INSERT INTO removals (user, device, ts) VALUES (?, ?, ?)", (user, device, now_ms))
            seqs = [
                row[0]
                for row in db.execute("SELECT seq FROM pending WHERE user = ? AND device = ?", (user, device))
            ]
            db.execute("DELETE FROM pending WHERE user = ? AND device = ?", (user, device))
            self._count("devices", -1)
            self._count("pending", -len(seqs))
            if db.execute("SELECT 1 FROM devices WHERE user = ? LIMIT 1", (user,)).fetchone() is not None:
                retired = db.executemany(RETIRE_MESSAGE, [(seq, seq) for seq in seqs]).rowcount
                self._count("messages", -retired)
        return True

    def set_push_token(self, user: str, device: str, platform: str, token: str) -> bool:
        self._devices_now.clear()  # its devices or tokens change
        db = self._conn
        with self.batch():
            db.execute(
                "UPDATE devices SET push_platform = NULL, push_token = NULL"
                " WHERE push_token = ? AND push_platform = ? AND NOT (user = ? AND device = ?)",
                (token, platform, user, device),
            )
            return db.execute(
                "UPDATE devices SET push_platform = ?, push_token = ? WHERE user = ? AND device = ?",
                (platform, token, user, device),
            ).rowcount == 1

    def remove_push_token(self, user: str, device: str, platform: str, token: str) -> bool:
        self._devices_now.clear()  # its devices or tokens change
        with self.batch():
            return self._conn.execute(
                "UPDATE devices SET push_platform = NULL, push_token = NULL"
                " WHERE user = ? AND device = ? AND push_platform = ? AND push_token = ?",
                (user, device, platform, token),
            ).rowcount == 1

    def device_for_push_token(self, platform: str, token: str) -> tuple[str, str] | None:
        row = self._conn.execute(
            "SELECT user, device FROM devices WHERE push_token = ? AND push_platform = ?", (token, platform)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def removed_devices(self, after: int | None) -> RemovedDevices:
        db = self._conn
        if after is None:
            (cursor,) = db.execute("SELECT coalesce(max(id), 0) FROM removals").fetchone()
            return RemovedDevices(cursor, ())
        rows = db.execute(
            "SELECT id, user, device FROM removals WHERE id > ? ORDER BY id", (after,)
        ).fetchall()
        if not rows:
            return RemovedDevices(after, ())
        return RemovedDevices(rows[-1][0], tuple((user, device) for _, user, device in rows))

    def backlog(self, user: str, now_ms: int) -> dict[str, tuple[int, int]]:
        rows = self._conn.execute(
            "SELECT p.device, count(*), min(m.ts) FROM pending p JOIN messages m ON m.seq = p.seq"
            " WHERE p.user = ? AND m.expires > ? GROUP BY p.device",
            (user, now_ms),
        )
        return {device: (count, oldest) for device, count, oldest in rows}

    def expire_user(self, user: str, now_ms: int) -> int:
        db = self._conn
        with self.batch():
            dropped = db.execute(
                "DELETE FROM pending WHERE seq IN (SELECT seq FROM messages WHERE recipient = ?)", (user,)
            ).rowcount
            expired = db.execute("DELETE FROM messages WHERE recipient = ?", (user,)).rowcount
            self._count("pending", -dropped)
            self._count("messages", -expired)
        return expired

    def stats(self) -> dict[str, int]:
        counts = dict(self._conn.execute("SELECT name, n FROM counts"))
        return {table: counts[table] + self._deltas[table] for table in COUNTED}

    def has_user(self, user: str) -> bool:
        return self._user_exists(user)

    def list_users(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT id FROM users ORDER BY id")]

    def list_devices(self, user: str) -> list[DeviceRecord]:
        return [
            DeviceRecord(*row)
            for row in self._conn.execute(
                "SELECT device, created, attached, push_platform, push_token FROM devices"
                " WHERE user = ? ORDER BY device",
                (user,),
            )
        ]

    def _load_receipt_recipients(self) -> None:
        self._receipt_recipients = {
            user for (user,) in self._conn.execute("SELECT DISTINCT recipient FROM wanted_receipts")
        }

    def _devices_of(self, user: str) -> _UserDevices:
        """The user's devices, read once a transaction."""
        devices = self._devices_now.get(user)
        if devices is None:
            rows = self._conn.execute(
                "SELECT device, push_platform, push_token FROM devices WHERE user = ?", (user,)
            ).fetchall()
            devices = self._devices_now[user] = _UserDevices(
                tuple(device for device, _, _ in rows),
                tuple(PushTarget(user, device, platform, token) for device, platform, token in rows
                      if token is not None),
            )
        return devices

    def _user_exists(self, user: str) -> bool:
        if user in self._known_users:
            return True
        if self._conn.execute("SELECT 1 FROM users WHERE id = ?", (user,)).fetchone() is None:
            return False
        if len(self._known_users) >= KNOWN_USERS_KEPT:
            self._known_users.clear()
        self._known_users.add(user)
        return True


class _UserDevices(NamedTuple):
    ids: tuple[str, ...]
    push_targets: tuple[PushTarget, ...]  # of those with a push token


def _count_once(db: sqlite3.Connection) -> None:
    """Fill ``counts`` for a database made before it existed: the one time its tables are counted."""
    if db.execute("SELECT count(*) FROM counts").fetchone()[0] == len(COUNTED):
        return  # the usual case: no write lock taken at open
    db.execute("BEGIN IMMEDIATE")
    try:
        known = {name for (name,) in db.execute("SELECT name FROM counts")}  # another process may have filled it
        for table in COUNTED:
            if table not in known:
                db.execute(f"INSERT INTO counts (name, n) SELECT ?, count(*) FROM {table}", (table,))  # ours
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class _Transaction:
    """One SQLite transaction; entered again inside itself, the outermost one commits.

    SQLite's own errors leave it as a StoreError (the database, not the
    caller, failed: a full disk, a lock held too long), the transaction rolled back.
    """

    __slots__ = ("_store", "_depth")

    def __init__(self, store: SqliteStore):
        self._store = store
        self._depth = 0

    def __enter__(self) -> None:
        if self._depth == 0:
            try:
                self._store._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise StoreError(f"SQLite could not begin a transaction: {error}") from error
        self._depth += 1

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._depth -= 1
        if self._depth:
            return
        store = self._store
        db = store._conn
        if exc_type is None:
            try:
                if store._history_rows:
                    db.executemany(
                        "INSERT INTO history (a, b, id, sender, recipient, body, ts, expires)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        store._history_rows,
                    )
                changed = [(rows, table) for table, rows in store._deltas.items() if rows]
                if changed:
                    db.executemany("UPDATE counts SET n = n + ? WHERE name = ?", changed)
                # The fsync in a worker thread: SQLite lets go of the GIL while the disk
                # syncs, and the event loop serves every connection meanwhile.
                store._committer.apply(db.execute, ("COMMIT",))
            except sqlite3.Error as error:
                self._roll_back()
                raise StoreError(f"SQLite could not commit: {error}") from error
            store._forget_transaction()
            return
        self._roll_back()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"SQLite failed: {exc}") from exc

    def _roll_back(self) -> None:
        store = self._store
        # After some errors (a full disk, I/O) SQLite has rolled back already.
        with contextlib.suppress(sqlite3.OperationalError):
            store._conn.execute("ROLLBACK")
        store._forget_transaction()
        store._known_users.clear()  # a user added in the transaction may have been remembered
