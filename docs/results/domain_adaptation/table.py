"""Print the README table from the runs' metrics.json: target/source test accuracy, mean +- std per strategy.

Usage: python docs/results/domain_adaptation/table.py [small|medium]  (from the repository root, after run.sh)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RUNS = Path(__file__).parent / "runs"
STRATEGIES = ("source_only", "dann", "mmd")


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} +- {std:.3f}"


def main(budget: str) -> None:
    runs_dir = RUNS / budget
    tests = {
        s: {
            p.parent.name: json.loads(p.read_text())["test"] for p in runs_dir.glob(f"{s}_seed*/metrics.json")
        }
        for s in STRATEGIES
    }
    base = {run.split("_seed")[1]: t["test/acc"] for run, t in tests["source_only"].items()}
    print("| strategy | seeds | target test acc | gap vs source_only (points) | source test acc |")
    print("| --- | --- | --- | --- | --- |")
    for strategy, runs in tests.items():
        if not runs:
            continue
        target = [t["test/acc"] for t in runs.values()]
        seeds = [run.split("_seed")[1] for run in runs]
        gaps = [100 * (runs[f"{strategy}_seed{s}"]["test/acc"] - base[s]) for s in seeds if s in base]
        gap = "-" if strategy == "source_only" or not gaps else _mean_std(gaps)
        source = _mean_std([t["test/source_acc"] for t in runs.values()])
        print(f"| {strategy} | {len(runs)} | {_mean_std(target)} | {gap} | {source} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small")
