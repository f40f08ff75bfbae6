#!/usr/bin/env python3
"""Server CPU per message of two checkouts, measured in one interleaved run.

    .venv/bin/python bench/compare.py --base d7c8c95 [--rounds 5] [--receipt] [-- run.py args]

Makes a git worktree of ``--base`` (detached, in a temporary directory,
removed afterwards) and runs this checkout's bench/run.py ``--mode online
--json`` against each tree's server (``--server-root``: the tree's
bin/devastator and devastator package; the load generator is this file's
run.py for both), alternating base and the working tree round after round,
the order flipped every round (A B, B A, A B, ...) so that a machine getting
busier or quieter weighs on both alike. It reports, per variant, the median
of server CPU per message (server CPU seconds / messages delivered), of
messages/s and of latency, with their ranges, and their ratios to the base:
the ratio of the medians, and the median of each round's own ratio.

``--against REV`` measures another commit instead of the working tree.
``--variant LABEL SPEC`` adds a variant on the working tree (SPEC: run.py
options and DEVASTATOR_*=value settings, e.g. ``--variant no-history
DEVASTATOR_HISTORY_PERIOD=0``); ``--receipt`` is ``--variant receipt
--receipt``. The exit status is 1 if any run failed its checks. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"
RETRY_WAIT_S = 30  # the working tree is shared: a broken server may be someone's edit in progress


class Variant:
    def __init__(self, label: str, tree: Path, args: list[str], env: dict[str, str]):
        self.label = label
        self.tree = tree
        self.args = args
        self.env = env
        self.results: list[dict | None] = []  # per round; None: the run failed


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def parse_spec(spec: str) -> tuple[list[str], dict[str, str]]:
    """run.py options and NAME=value settings from one string."""
    args, env = [], {}
    for token in shlex.split(spec):
        name, sep, value = token.partition("=")
        if sep and not token.startswith("-") and name.isupper():
            env[name] = value
        else:
            args.append(token)
    return args, env


def run_once(variant: Variant, extra: list[str], timeout: float) -> tuple[dict | None, str]:
    command = [sys.executable, str(RUN), "--server-root", str(variant.tree), "--mode", "online", "--json",
               *extra, *variant.args]
    try:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, **variant.env}, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        return None, f"timed out after {timeout:.0f} s\n{expired.stdout or ''}{expired.stderr or ''}"
    report = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return None, report
    return json.loads(lines[-1]), report


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):,.1f}-{max(values):,.1f}" if values else "n/a"


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt_ratio(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report(variants: list[Variant]) -> tuple[str, dict]:
    base = variants[0]
    lines = [
        f"{'variant':<14} {'runs':>4} {'server us/msg':>14} {'(range)':>14} {'msg/s':>9} {'(range)':>17}"
        f" {'p50 ms':>8} {'cpu ratio':>9} {'paired':>7} {'above':>6} {'msg/s ratio':>11}",
    ]
    summary = {}
    base_cpu = median(r["server_cpu_us_per_msg"] for r in base.results if r)
    base_rate = median(r["delivered_per_s"] for r in base.results if r)
    for variant in variants:
        ok = [r for r in variant.results if r]
        cpu = [r["server_cpu_us_per_msg"] for r in ok]
        rate = [r["delivered_per_s"] for r in ok]
        # Each round's own ratio to the base's run of that round (both runs must have succeeded).
        paired = [
            ratio(r["server_cpu_us_per_msg"], b["server_cpu_us_per_msg"])
            for r, b in zip(variant.results, base.results) if r and b
        ]
        entry = {
            "tree": str(variant.tree), "args": variant.args, "env": variant.env,
            "runs": len(ok), "failed": len(variant.results) - len(ok),
            "server_cpu_us_per_msg": cpu, "delivered_per_s": rate,
            "p50_ms": [r["p50_ms"] for r in ok],
            "median_server_cpu_us_per_msg": median(cpu), "median_delivered_per_s": median(rate),
            "cpu_ratio": ratio(median(cpu), base_cpu), "cpu_ratio_paired": median(paired),
            "rate_ratio": ratio(median(rate), base_rate),
            "rounds_above_base": sum(1 for r in paired if r > 1), "rounds_paired": len(paired),
        }
        if ok and "receipts_per_s" in ok[0]:
            entry["median_receipts_per_s"] = median(r["receipts_per_s"] for r in ok)
        summary[variant.label] = entry
        lines.append(
            f"{variant.label:<14} {len(ok):>4} {entry['median_server_cpu_us_per_msg'] or 0:>14,.1f} {spread(cpu):>14}"
            f" {entry['median_delivered_per_s'] or 0:>9,.0f} {spread(rate):>17}"
            f" {median(entry['p50_ms']) or 0:>8,.1f} {fmt_ratio(entry['cpu_ratio']):>9}"
            f" {fmt_ratio(entry['cpu_ratio_paired']):>7}"
            f" {entry['rounds_above_base']:>3}/{entry['rounds_paired']:<2} {fmt_ratio(entry['rate_ratio']):>11}"
        )
    lines.append("cpu ratio: median server CPU per message / the base's; paired: the median of each round's"
                 " ratio; above: rounds whose CPU per message was above the base's run of that round;"
                 " msg/s ratio: median messages/s / the base's")
    return "\n".join(lines), summary


def parse_args(argv):
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    else:
        extra = []
    parser = argparse.ArgumentParser(
        description="Server CPU per message of two checkouts, interleaved (bench/run.py --mode online).",
        epilog="Arguments after -- go to every bench/run.py run (e.g. -- --duration 10 --pairs 20).",
    )
    parser.add_argument("--base", required=True, help="the commit to compare with (a worktree of it is made)")
    parser.add_argument("--against", help="a commit instead of the working tree (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant, interleaved (5)")
    parser.add_argument("--receipt", action="store_true",
                        help="also the working tree with --receipt (every send asks for receipts)")
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("LABEL", "SPEC"),
                        help="also the working tree with these run.py options and NAME=value settings")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take (300)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line of results")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args, extra


def add_worktree(rev: str, made: list[Path]) -> Path:
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = Path(tempfile.mkdtemp(prefix=f"devastator-compare-{commit[:8]}-"))
    made.append(tree)
    git("worktree", "add", "--detach", str(tree), commit)
    return tree


def main(argv=None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    made: list[Path] = []
    status = 0
    try:
        base_tree = add_worktree(args.base, made)
        base_name = f"base {git('rev-parse', '--short', args.base)}"
        if args.against:
            head_tree, head_name = add_worktree(args.against, made), f"{git('rev-parse', '--short', args.against)}"
        else:
            dirty = " (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
            head_tree, head_name = ROOT, f"tree {git('rev-parse', '--short', 'HEAD')}{dirty}"
        variants = [Variant("base", base_tree, [], {}), Variant("head", head_tree, [], {})]
        if args.receipt:
            variants.append(Variant("receipt", head_tree, ["--receipt"], {}))
        for label, spec in args.variant:
            variants.append(Variant(label, head_tree, *parse_spec(spec)))
        print(f"compare: base = {base_name} in {base_tree}; head = {head_name}; {args.rounds} rounds;"
              f" run.py args {extra}", file=sys.stderr)
        for round_no in range(args.rounds):
            order = variants if round_no % 2 == 0 else variants[::-1]
            for variant in order:
                started = time.monotonic()
                result, output = run_once(variant, extra, args.timeout)
                if result is None:
                    print(f"compare: round {round_no + 1} {variant.label} failed; again in {RETRY_WAIT_S} s:\n"
                          f"{output[-3000:]}", file=sys.stderr)
                    time.sleep(RETRY_WAIT_S)
                    result, output = run_once(variant, extra, args.timeout)
                    if result is None:
                        status = 1
                        print(f"compare: round {round_no + 1} {variant.label} failed again:\n{output[-3000:]}",
                              file=sys.stderr)
                variant.results.append(result)
                if result is not None:
                    print(f"compare: round {round_no + 1} {variant.label:<10} {result['server_cpu_us_per_msg']:>7} us/msg"
                          f" {result['delivered_per_s']:>9,.0f} msg/s  p50 {result['p50_ms']} ms"
                          f" ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        table, summary = report(variants)
        print(f"base = {base_name}; head = {head_name}; run.py --mode online {' '.join(extra)}")
        print(table)
        if args.json:
            print(json.dumps({"base": base_name, "head": head_name, "rounds": args.rounds, "run_args": extra,
                              "variants": summary}))
    except subprocess.CalledProcessError as error:
        print(f"compare: {' '.join(error.cmd)}: {error.stderr.strip()}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("compare: interrupted", file=sys.stderr)
        status = 130
    finally:
        for tree in made:
            try:
                git("worktree", "remove", "--force", str(tree))
            except subprocess.CalledProcessError as error:
                print(f"compare: could not remove the worktree {tree}: {error.stderr.strip()}", file=sys.stderr)
            shutil.rmtree(tree, ignore_errors=True)
        if made:
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
