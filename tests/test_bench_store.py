"""bench/store.py runs, checks what it stored, and reports figures (a smoke test, not a timing)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_store_benchmark_stores_acks_and_reports_each_group():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "store.py"), "--groups", "1,7", "--messages", "30", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report  # it checks the entries left after each phase
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) == {"1", "7"}, report
    for group in figures.values():
        for phase in ("fill", "round"):
            assert group[phase]["cpu_us"] > 0 and group[phase]["per_second"] > 0, report
