"""``make bench``: run every ``benchmarks/bench_*.py``, then print one table of their ratios with spread.

Each script runs in its own process with ``TL_BENCH_SUMMARY`` naming this run's JSON-lines file
(``<out>/rows.jsonl``), to which ``harness.report`` appends its rows. A script that exits non-zero, times
out or reports itself skipped (``harness.skip``, e.g. an optional dependency is missing) is listed with
its status; the table is printed in every case, and the exit status is 1 when a script failed.

The previous run's rows are kept (``<out>/previous.jsonl``) and printed beside this run's with the change
of each ratio's median, so two runs on a quiet machine can be compared (goal: within 10%).

Usage::

    python benchmarks/summary.py [--out outputs/bench] [--timeout 2700] [SCRIPT ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

HERE = Path(__file__).resolve().parent
SUMMARY_ENV = "TL_BENCH_SUMMARY"  # harness.SUMMARY_ENV; not imported, so this runner needs no torch


def run_script(script: Path, rows_file: Path, timeout: float) -> tuple[str, float]:
    """Run one benchmark script; return its status (``ok``, ``exit N``, ``timed out``) and wall seconds."""
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))  # finds `harness`
    env = os.environ | {SUMMARY_ENV: str(rows_file), "PYTHONPATH": path}
    print(f"\n=== {script.name}", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, str(script)], env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s", time.perf_counter() - start
    return ("ok" if code == 0 else f"exit {code}"), time.perf_counter() - start


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary_table(statuses: dict[str, tuple[str, float]], rows: list[dict], previous: list[dict]) -> Table:
    """Scripts with their status, then every ratio row (median [min-max]) with the previous run's."""
    before = {(r["script"], r["title"], r["label"]): r for r in previous}
    table = Table(title=escape("make bench: ratios, median [min-max] of paired rounds"), title_justify="left")
    for column in ("benchmark", "measurement", "this run", "previous", "change"):
        table.add_column(column, justify="right" if column in ("change",) else "left")
    skipped = {r["script"]: r["value"] for r in rows if r["label"] == "skipped"}
    for script, (status, seconds) in statuses.items():
        if status == "ok" and script in skipped:
            status = f"skipped: {skipped[script]}"
        table.add_row(script, "status", escape(f"{status} ({seconds:.0f} s)"), "", "")
    for row in rows:
        if "median" not in row and row["label"] != "skipped":
            continue
        old = before.get((row["script"], row["title"], row["label"]))
        change = (
            f"{row['median'] / old['median'] - 1:+.1%}" if old and "median" in old and "median" in row else ""
        )
        cells = (row["script"], row["label"], row["value"], old["value"] if old else "", change)
        table.add_row(*map(escape, cells))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scripts", nargs="*", type=Path, help="default: every benchmarks/bench_*.py")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument(
        "--timeout", type=float, default=2700, help="seconds per script (bench_text takes the longest)"
    )
    args = parser.parse_args()
    scripts = args.scripts or sorted(HERE.glob("bench_*.py"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file, previous_file = args.out / "rows.jsonl", args.out / "previous.jsonl"
    if rows_file.exists():
        rows_file.replace(previous_file)
    statuses = {script.stem: run_script(script, rows_file, args.timeout) for script in scripts}
    print()
    Console(width=160).print(summary_table(statuses, read_rows(rows_file), read_rows(previous_file)))
    print(f"rows: {rows_file}")
    failed = [name for name, (status, _) in statuses.items() if status != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
