#!/usr/bin/env python3
"""Time msg.history pages over TLS on a store of a million messages (and on smaller ones).

    .venv/bin/python bench/history.py                        # empty, conversations only, 1,000,000
    .venv/bin/python bench/history.py --stores full --messages 200000 --repeat 100

For each store state it makes a fresh data directory (the server started
once and stopped, to write its keys and database) and fills the store through
the store API (``append_many`` of 100 sends at a time, as the store actor
calls it, with the history period on; for SQLite one ``batch()`` per
``--batch`` messages and ``synchronous=OFF`` while filling). Then it starts one
real server per state, side by side, authenticates alice's device to each
over TLS and times requests one at a time (a request, its whole answer, the
next): ``--repeat`` of each case in all, made in ``--rounds`` rounds that go
through the states in turn (the order flipped every round), each case's
round after ``--warmup`` untimed requests, so that a noisy stretch of a
shared machine weighs on every state alike:

    ping         the round trip of a request that does nothing (the floor)
    first page   {"with": "bob"}: the newest 50 of the big conversation
    deep page    {"with": "bob", "before": <the id in its middle>}
    small page   {"with": "carol"}: a whole conversation of --small messages
    no messages  {"with": "dave"}: a user alice never talked with

Every answer is checked: the page's size and ``more``, newest first, all
older than ``before``, all between alice and the peer. Then, with the server
stopped, the same calls on the store in this process (store.history alone,
no RPC).

Store states (``--stores``): ``empty`` (only the users), ``conversations``
(only alice-bob and alice-carol: the same pages as ``full``), ``full``
(``--messages`` in all, among them the two conversations, the rest between
--users users, each writing to 10 others). Messages are spread evenly over
the last ``--span-days`` days; the big conversation's messages are spread
among the others as they would be in time. The other users have no device,
so their messages stay stored in their mailboxes; alice's mailbox is emptied
(store.expire_user, as if her device had received it all) so that her
connection has no backlog to drain. See bench/README.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("devastator_bench_run", BENCH / "run.py")
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)  # gevent's monkey patching, ROOT on sys.path

import socket  # noqa: E402  (patched by now)
import ssl  # noqa: E402

import gevent  # noqa: E402
import orjson  # noqa: E402

from devastator.protocol import DEFAULT_MAX_FRAME_BYTES, FrameDecoder  # noqa: E402
from devastator.store import Accepted, Send  # noqa: E402

_now = time.perf_counter
CALLER, BIG_PEER, SMALL_PEER, NOBODY = "alice", "bob", "carol", "dave"
FRIENDS = 10  # each of the other users writes to this many others
TTL_SECONDS = 28 * 86400
OTHER, BIG, SMALL = 0, 1, 2  # which conversation a message of the fill belongs to
SENDS_AT_ONCE = 100  # sends in one append_many (the store actor groups what waits; one Redis pipeline)


class BenchError(bench_run.BenchError):
    pass


# -- filling the store ------------------------------------------------------------------


def open_fill_store(settings, store_kind: str):
    """The server's store, opened for filling: SQLite with synchronous=OFF, history on."""
    if store_kind == "sqlite":
        from devastator.store.sqlite import SqliteStore

        store = SqliteStore(settings.db_path, synchronous="OFF", history_period_ms=settings.history_period * 1000)
    else:
        from devastator.store.factory import make_store

        store = make_store(settings)
    store.open()
    return store


def fill(settings, args, state: str) -> dict:
    """Fill the store for ``state``; returns the ids the bench needs and the fill's figures."""
    store = open_fill_store(settings, args.store)
    rng = random.Random(12)
    now_ms = int(time.time() * 1000)
    users = [f"u{i}" for i in range(args.users)] if state == "full" else []
    total = {"empty": 0, "conversations": args.big + args.small, "full": args.messages}[state]
    big_ids: list[str] = []
    small_ids: list[str] = []
    started = _now()
    try:
        with store.batch():
            for user in (CALLER, BIG_PEER, SMALL_PEER, NOBODY, *users):
                store.add_user(user, now_ms)
        if total:
            kinds = schedule(total, args.big, args.small)
            start_ms = now_ms - args.span_days * 86400 * 1000
            step_ms = (args.span_days * 86400 * 1000) / total
            body_pad = "x" * max(0, args.body_bytes - 40)
            counts = {BIG: 0, SMALL: 0}
            for first in range(0, total, args.batch):
                with store.batch():
                    for group in range(first, min(total, first + args.batch), SENDS_AT_ONCE):
                        # A group the way the store actor hands sends over: one append_many, one time.
                        sends, tags = [], []
                        for i in range(group, min(total, first + args.batch, group + SENDS_AT_ONCE)):
                            kind = kinds[i]
                            if kind == OTHER:
                                s = rng.randrange(len(users))
                                sender, recipient = users[s], users[(s + rng.randint(1, FRIENDS)) % len(users)]
                            else:  # both directions, in turn
                                peer = BIG_PEER if kind == BIG else SMALL_PEER
                                sender, recipient = (CALLER, peer) if counts[kind] % 2 else (peer, CALLER)
                                counts[kind] += 1
                            body = orjson.dumps({"text": f"message {i} {body_pad}", "n": i})
                            sends.append(Send(sender, (recipient,), body, None, TTL_SECONDS, False,
                                              orjson.dumps(recipient), None))
                            tags.append(kind)
                        for kind, accepted in zip(tags, store.append_many(sends, int(start_ms + group * step_ms))):
                            if not isinstance(accepted, Accepted):
                                raise BenchError(f"append_many: {accepted!r}")
                            if kind != OTHER:
                                (big_ids if kind == BIG else small_ids).append(accepted.id)
                appended = min(total, first + args.batch)
                if args.progress and appended % (args.batch * 20) == 0:
                    elapsed = _now() - started
                    print(f"history: {state}: {appended:,} appended in {elapsed:.0f} s"
                          f" ({appended / elapsed:,.0f}/s)", file=sys.stderr)
            store.expire_user(CALLER, now_ms)  # alice's device got it all: no backlog at auth
        fill_s = _now() - started
        stats = store.stats()
    finally:
        store.close()
    return {
        "messages": total,
        "fill_s": round(fill_s, 1),
        "fill_per_s": round(total / fill_s, 1) if total and fill_s > 0 else None,
        "store_stats": stats,
        "big_ids": big_ids,
        "small_ids": small_ids,
    }



def schedule(total: int, big: int, small: int) -> bytearray:
    """Which message (in time order) is of which conversation: each spread evenly over the others."""
    kinds = bytearray(total)  # OTHER
    for k in range(big):
        kinds[k * total // big] = BIG
    for k in range(small):
        at = (2 * k + 1) * total // (2 * small)
        while kinds[at] != OTHER:  # the next free one
            at = (at + 1) % total
        kinds[at] = SMALL
    return kinds


# -- the client ---------------------------------------------------------------------


class Client:
    """One TLS connection, one request at a time."""

    def __init__(self, address, ssl_context):
        raw = socket.create_connection(address, timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ssl_context.wrap_socket(raw, server_hostname="localhost")
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        self._frames: list[bytes] = []
        self._ids = 0

    def call(self, method: str, params=None):
        self._ids += 1
        request = {"jsonrpc": "2.0", "id": self._ids, "method": method}
        if params is not None:
            request["params"] = params
        body = orjson.dumps(request)
        self.sock.sendall(len(body).to_bytes(4, "little") + body)
        while True:
            while self._frames:
                answer = orjson.loads(self._frames.pop(0))
                if type(answer) is dict and answer.get("id") == self._ids:
                    if "error" in answer:
                        raise BenchError(f"{method} {params}: {answer['error']}")
                    return answer["result"]
                raise BenchError(f"unexpected frame: {str(answer)[:300]}")
            data = self.sock.recv(256 * 1024)
            if not data:
                raise BenchError("the server closed the connection")
            self._frames.extend(self._decoder.feed(data))

    def close(self):
        self.sock.close()


def check_page(page: dict, peer: str, *, size: int, more: bool, before: str | None) -> None:
    messages = page["messages"]
    ids = [m["id"] for m in messages]
    problems = []
    if len(messages) != size:
        problems.append(f"{len(messages)} messages, expected {size}")
    if page["more"] is not more:
        problems.append(f"more={page['more']}, expected {more}")
    if ids != sorted(ids, reverse=True) or len(set(ids)) != len(ids):
        problems.append("not newest first")
    if before is not None and any(i >= before for i in ids):
        problems.append("a message not older than before")
    if any({m["from"], m["to"]} != {CALLER, peer} for m in messages):
        problems.append("a message of another conversation")
    if problems:
        raise BenchError(f"history with {peer} (before {before}): " + "; ".join(problems))


def expected_page(ids: list[str], before: str | None, limit: int) -> tuple[int, bool]:
    older = [i for i in ids if before is None or i < before]
    return min(limit, len(older)), len(older) > limit


def cases(filled: dict, limit: int) -> list[tuple[str, str, dict | None, tuple | None]]:
    """(name, method, params, (peer, ids, before) to check against)."""
    big, small = filled["big_ids"], filled["small_ids"]
    middle = big[len(big) // 2] if big else "000000000000"
    return [
        ("ping", "ping", None, None),
        ("first page", "msg.history", {"with": BIG_PEER, "limit": limit}, (BIG_PEER, big, None)),
        ("deep page", "msg.history", {"with": BIG_PEER, "before": middle, "limit": limit}, (BIG_PEER, big, middle)),
        ("small page", "msg.history", {"with": SMALL_PEER, "limit": limit}, (SMALL_PEER, small, None)),
        ("no messages", "msg.history", {"with": NOBODY, "limit": limit}, (NOBODY, [], None)),
    ]


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)

    def at(q):
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "mean_ms": round(statistics.fmean(ordered) * 1000, 3)}


class Timing:
    """One case on one store: the samples and the server's CPU over them, gathered round after round."""

    def __init__(self):
        self.samples: list[float] = []
        self.server_cpu = 0.0
        self.answer = None

    def result(self) -> dict:
        entry = percentiles(self.samples)
        entry["server_cpu_us"] = round(self.server_cpu / len(self.samples) * 1e6, 1)
        if self.answer is not None and isinstance(self.answer, dict):
            entry["messages"] = len(self.answer["messages"])
            entry["answer_bytes"] = len(orjson.dumps(self.answer))
        return entry


def time_round(client: Client, server_pid: int, filled: dict, timings: dict, repeat: int, args) -> None:
    """``repeat`` timed requests of each case, after ``--warmup`` untimed ones; every answer's last one checked."""
    for name, method, params, check in cases(filled, args.limit):
        for _ in range(args.warmup):
            client.call(method, params)
        timing = timings.setdefault(name, Timing())
        before = bench_run.process_cpu_seconds(server_pid)
        for _ in range(repeat):
            started = _now()
            answer = client.call(method, params)
            timing.samples.append(_now() - started)
        after = bench_run.process_cpu_seconds(server_pid)
        if before is not None and after is not None:
            timing.server_cpu += sum(after) - sum(before)
        if check is not None:
            peer, ids, before_id = check
            size, more = expected_page(ids, before_id, args.limit)
            check_page(answer, peer, size=size, more=more, before=before_id)
        timing.answer = answer


def time_in_process(settings, args, filled: dict) -> dict:
    """store.history alone, the server stopped: the database's part of a page."""
    from devastator.store.factory import make_store

    store = make_store(settings)
    store.open()
    results = {}
    try:
        for name, method, params, check in cases(filled, args.limit):
            if method != "msg.history":
                continue
            samples = []
            for k in range(args.warmup + args.repeat):
                now_ms = int(time.time() * 1000)
                started = _now()
                page = store.history(CALLER, params["with"], params.get("before"), args.limit, now_ms)
                if k >= args.warmup:
                    samples.append(_now() - started)
            peer, ids, before = check
            size, more = expected_page(ids, before, args.limit)
            if len(page.messages) != size or page.more is not more:
                raise BenchError(f"store.history with {peer}: {len(page.messages)} messages, more={page.more}")
            results[name] = percentiles(samples)
    finally:
        store.close()
    return results


# -- one store state ------------------------------------------------------------------


class State:
    """One store state: its data directory, its filled store, its server and alice's connection."""

    def __init__(self, name: str, args):
        self.name = name
        self.args = args
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f"devastator-history-{name}-"))
        self.env = {
            **bench_run.CAPACITY_SETTINGS, **os.environ, "DEVASTATOR_STORE": args.store,
            "DEVASTATOR_REDIS_URL": args.redis_url, "DEVASTATOR_REDIS_PREFIX": f"bench-history-{secrets.token_hex(4)}:",
        }
        self.server = None
        self.client = None
        self.timings: dict[str, Timing] = {}
        self.ok = False

    def prepare(self) -> None:
        """The data directory (the server started once and stopped), the fill, alice's token."""
        server = bench_run.ServerProcess(self.tmp_dir, self.args.host, env=self.env)
        try:
            server.start()  # the data directory, its keys and an empty database
        finally:
            server.stop()
        self.settings = bench_run.store_settings(self.tmp_dir, self.env)
        if not self.settings.history_period:
            raise BenchError("history_period is 0: the server keeps no history")
        print(f"history: {self.name}: filling {self.tmp_dir}", file=sys.stderr)
        self.filled = fill(self.settings, self.args, self.name)
        self.token = bench_run.mint_tokens(self.settings, [CALLER])[CALLER]

    def connect(self) -> None:
        self.server = bench_run.ServerProcess(self.tmp_dir, self.args.host, env=self.env)
        self.server.start()
        ssl_context = ssl.create_default_context(cafile=str(self.tmp_dir / "ca.pem"))
        self.client = Client((self.args.host, self.server.tls_port), ssl_context)
        auth = self.client.call("auth.jwt", {"token": self.token})
        if auth.get("pending", 0):
            raise BenchError(f"alice has {auth['pending']} messages pending at auth")

    def time_round(self, repeat: int) -> None:
        time_round(self.client, self.server.pid, self.filled, self.timings, repeat, self.args)

    def finish(self) -> dict:
        """Stop the server, time store.history in this process; the results."""
        self.client.close()
        rss = bench_run.process_rss_mb(self.server.pid)
        code = self.server.stop()
        if code not in (0, None):
            raise BenchError(f"the server exited with status {code}:\n{self.server.log_tail()}")
        in_process = time_in_process(self.settings, self.args, self.filled)
        db_mb = None
        if self.args.store == "sqlite":
            db_mb = round(sum(p.stat().st_size for p in self.tmp_dir.glob("devastator.db*")) / 2**20, 1)
        self.ok = True
        filled = self.filled
        return {
            "state": self.name, "store": self.args.store, "messages": filled["messages"],
            "big_conversation": len(filled["big_ids"]), "small_conversation": len(filled["small_ids"]),
            "fill_s": filled["fill_s"], "fill_per_s": filled["fill_per_s"], "store_stats": filled["store_stats"],
            "db_mb": db_mb, "server_rss_mb": None if rss is None else round(rss, 1),
            "repeat": len(next(iter(self.timings.values())).samples),
            "over_tls": {name: timing.result() for name, timing in self.timings.items()},
            "in_process": in_process,
        }

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None and self.server.alive():
            self.server.stop()
        if self.ok and not self.args.keep_data:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        else:
            print(f"history: {self.name}: data and server log kept in {self.tmp_dir}", file=sys.stderr)


def summary(result: dict) -> str:
    lines = [
        f"history bench: {result['store']} store, {result['state']}: {result['messages']:,} messages"
        f" (alice-bob {result['big_conversation']:,}, alice-carol {result['small_conversation']:,})"
        + (f", filled in {result['fill_s']:,.0f} s ({result['fill_per_s']:,.0f}/s)" if result["fill_per_s"] else "")
        + (f", database {result['db_mb']:,} MB" if result["db_mb"] is not None else ""),
        f"  {'over TLS':<14}{'p50 ms':>9}{'p99 ms':>9}{'server us':>11}{'messages':>10}{'bytes':>8}"
        f"   {'store.history p50':>18}{'p99 ms':>8}",
    ]
    for name, entry in result["over_tls"].items():
        store = result["in_process"].get(name)
        lines.append(
            f"  {name:<14}{entry['p50_ms']:>9.2f}{entry['p99_ms']:>9.2f}{entry['server_cpu_us'] or 0:>11,.0f}"
            f"{entry.get('messages', ''):>10}{entry.get('answer_bytes', ''):>8}"
            + (f"   {store['p50_ms']:>18.3f}{store['p99_ms']:>8.3f}" if store else "")
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time msg.history pages on a big store, over TLS.")
    parser.add_argument("--stores", default="empty,conversations,full",
                        help="store states to time, in order (empty,conversations,full)")
    parser.add_argument("--messages", type=int, default=1_000_000, help="full: messages in all (1,000,000)")
    parser.add_argument("--users", type=int, default=5000, help="full: other users (5,000)")
    parser.add_argument("--big", type=int, default=10_000, help="messages between alice and bob (10,000)")
    parser.add_argument("--small", type=int, default=30, help="messages between alice and carol (30)")
    parser.add_argument("--span-days", type=int, default=7, help="the messages' times span these days (7)")
    parser.add_argument("--body-bytes", type=int, default=80, help="about this many bytes a message (80)")
    parser.add_argument("--batch", type=int, default=10_000, help="appends in one store batch (10,000)")
    parser.add_argument("--limit", type=int, default=50, help="page size asked for (50)")
    parser.add_argument("--repeat", type=int, default=200, help="timed requests per case (200)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests of each case in each round (5)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="the timed requests are made in this many rounds, the states in turn (5)")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="with --store redis")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--keep-data", action="store_true", help="keep the data directories and server logs")
    parser.add_argument("--progress", action="store_true", help="report the fill's progress")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per store state")
    args = parser.parse_args(argv)
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not args.stores or set(args.stores) - {"empty", "conversations", "full"}:
        parser.error("--stores takes empty, conversations and full")
    if args.small >= args.limit:
        parser.error("--small must be below --limit (the small page is the whole conversation)")
    if args.big < 2 * args.limit or args.messages < args.big + args.small:
        parser.error("--big must be at least twice --limit, --messages at least --big + --small")
    if args.rounds < 1 or args.repeat < args.rounds or args.batch < 1:
        parser.error("--rounds and --batch must be at least 1, --repeat at least --rounds")
    return args


def main(argv=None) -> int:
    """Fill every state, start their servers side by side, time them in interleaved rounds."""
    args = parse_args(argv)
    states = [State(name, args) for name in args.stores]
    status = 0
    try:
        for state in states:
            state.prepare()
        for state in states:
            state.connect()
        per_round = [args.repeat // args.rounds + (1 if k < args.repeat % args.rounds else 0)
                     for k in range(args.rounds)]
        for k, repeat in enumerate(per_round):
            # The machine is shared: every state gets some of each stretch of time, in turn.
            for state in states if k % 2 == 0 else states[::-1]:
                state.time_round(repeat)
        for state in states:
            result = state.finish()
            print(summary(result), flush=True)
            if args.json:
                print(json.dumps(result), flush=True)
    except bench_run.BenchError as error:  # BenchError is one too
        print(f"history: {error}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("history: interrupted", file=sys.stderr)
        status = 130
    finally:
        for state in states:
            state.close()
    return status


if __name__ == "__main__":
    gevent.get_hub().NOT_ERROR += (KeyboardInterrupt,)
    sys.exit(main())
