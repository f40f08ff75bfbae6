#!/usr/bin/env python3
"""The SQLite store alone: what storing (and ACKing) a message costs with no sockets and no actors.

    .venv/bin/python bench/store.py                       # groups of 50 and 500, history kept
    .venv/bin/python bench/store.py --history-period 0 --groups 1,50,500,1000

It calls the store as the store actor does, on a fresh database file with
the server's defaults (WAL, synchronous FULL, the COMMIT and its fsync in the
store's worker thread): ``append_many`` of ``--group`` sends in one batch
(``fill``: messages to recipients with one device each, as to offline
devices), then, for ``round``, one batch ACKing them (as the devices of an
online run do). CPU is the whole process's (both threads: SQLite, the fsync,
the store's Python), per message. With groups of the same size the server's
own CPU per message can be no lower; bench/run.py reports that and
Mosquitto's side by side.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devastator.store import Send, SqliteStore  # noqa: E402

SENDERS = 20  # as bench/run.py's 20 pairs
DAY_MS = 24 * 3600 * 1000
CHECKPOINT_INTERVAL = 1.0  # the store actor's checkpoint_interval


def measure(group: int, messages: int, history_period_ms: int, body: bytes) -> dict:
    with tempfile.TemporaryDirectory(prefix="devastator-bench-store-") as data_dir:
        store = SqliteStore(Path(data_dir) / "devastator.db", history_period_ms=history_period_ms)
        store.open()
        try:
            now_ms = int(time.time() * 1000)
            with store.batch():
                for n in range(SENDERS):
                    for user in (f"sender-{n}", f"recipient-{n}"):
                        store.add_user(user, now_ms)
                        store.add_device(user, "phone", now_ms)
            figures = {}
            next_checkpoint = time.monotonic() + CHECKPOINT_INTERVAL
            for phase in ("fill", "round"):
                cpu = wall = 0.0
                for start in range(0, messages, group):
                    sends = [
                        Send(f"sender-{n % SENDERS}", (f"recipient-{n % SENDERS}",), body, None, 3600,
                             origin_device="phone")
                        for n in range(start, min(start + group, messages))
                    ]
                    started_cpu, started = time.process_time(), time.perf_counter()
                    with store.batch():
                        accepted = store.append_many(sends, now_ms)
                    if phase == "round":
                        with store.batch():
                            for sent in accepted:
                                for entry in sent.messages:
                                    store.ack(entry.recipient, "phone", (entry.seq,), now_ms)
                    cpu += time.process_time() - started_cpu
                    wall += time.perf_counter() - started
                    if time.monotonic() >= next_checkpoint:  # as the store actor does, at most once a second
                        store.checkpoint()  # (outside the timing: the actor runs it beside the commits)
                        next_checkpoint = time.monotonic() + CHECKPOINT_INTERVAL
                figures[phase] = {"cpu_us": cpu / messages * 1e6, "per_second": messages / wall}
                # Checked, as bench/run.py checks its deliveries: the fill's entries wait, the round's are gone.
                stats = store.stats()
                if stats["messages"] != messages or stats["pending"] != messages:
                    raise SystemExit(f"store: after the {phase}, {stats['messages']} entries and"
                                     f" {stats['pending']} pending rows, not {messages}")
            return figures
        finally:
            store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="50,500", help="sends per batch, comma-separated (50,500)")
    parser.add_argument("--messages", type=int, default=50_000, help="messages per phase and group (50,000)")
    parser.add_argument("--history-period", type=float, default=30.0,
                        help="days of history kept, as the server's history_period (30; 0: none)")
    parser.add_argument("--body-bytes", type=int, default=64, help="bytes of each message's JSON (64)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line of the figures")
    args = parser.parse_args(argv)
    body = b'"' + b"x" * max(0, args.body_bytes - 2) + b'"'
    history_ms = int(args.history_period * DAY_MS)
    print(f"store: SQLite, history {'kept' if history_ms else 'off'}, {args.messages:,} messages per phase, "
          f"{args.body_bytes}-byte messages")
    results = {}
    for group in (int(text) for text in args.groups.split(",")):
        figures = results[group] = measure(group, args.messages, history_ms, body)
        fill, round_ = figures["fill"], figures["round"]
        print(f"  group {group:>5}: fill {fill['cpu_us']:6.1f} us/msg ({fill['per_second']:>9,.0f}/s)   "
              f"send + ACK {round_['cpu_us']:6.1f} us/msg ({round_['per_second']:>9,.0f}/s)")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
