"""Print the README table from the runs' metrics.json: each task's test accuracy per arm, and flags.

Negative transfer is flagged as ``scripts/report.py`` does for transfer vs scratch: an arm is worse than
the task trained alone when ``mean_alone - mean_arm > sqrt(se_alone^2 + se_arm^2)``, ``se = std / sqrt(n)``
(sample std over seeds).

Usage: python docs/results/multitask/table.py   (from the repository root, after run.sh for each seed)
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

RUNS = Path(__file__).parent / "runs"
TASKS = ("digit", "fashion")
ARMS = ("multitask", "pcgrad")


def _runs(arm: str) -> dict[str, dict]:
    """Seed -> metrics.json of every run of ``arm``."""
    return {
        p.parent.name.split("_seed")[1]: json.loads(p.read_text())
        for p in RUNS.glob(f"{arm}_seed*/metrics.json")
    }


def _cell(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample std and standard error of the mean (in points)."""
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std, std / math.sqrt(len(values))


def main() -> None:
    print("| task | trained alone | multi-task (equal weights) | multi-task + PCGrad | PCGrad - multi-task |")
    print("| --- | --- | --- | --- | --- |")
    for task in TASKS:
        key = f"test/{task}/acc"
        alone = [m["test"][key] for m in _runs(f"alone_{task}").values()]
        base = _cell(alone)
        cells = [f"{base[0]:.1f} +- {base[1]:.1f} ({len(alone)})"]
        arms = {}
        for arm in ARMS:
            runs = _runs(arm)
            values = [m["test"][key] for m in runs.values()]
            if not values:
                cells.append("- (not run)")
                arms[arm] = {}
                continue
            arms[arm] = dict(zip(runs, values, strict=True))
            mean, std, se = _cell(values)
            tolerance = math.sqrt(se**2 + base[2] ** 2)
            gap = mean - base[0]
            flag = " ⚠ negative transfer" if -gap > tolerance else ""
            cells.append(
                f"{mean:.1f} +- {std:.1f} ({len(values)}); {gap:+.1f} vs alone (noise {tolerance:.1f}){flag}"
            )
        paired = [
            100 * (arms["pcgrad"][s] - arms["multitask"][s]) for s in arms["pcgrad"] if s in arms["multitask"]
        ]
        diff = _cell([d / 100 for d in paired]) if paired else None
        cells.append(f"{diff[0]:+.1f} +- {diff[1]:.1f} (paired by seed)" if diff else "-")
        print(f"| {task} | " + " | ".join(cells) + " |")
    print()
    print("| arm | runs | wall time per run (s), mean | optimizer steps |")
    print("| --- | --- | --- | --- |")
    for arm in ("alone_digit", "alone_fashion", *ARMS):
        runs = list(_runs(arm).values())
        if runs:
            wall = statistics.mean(m["wall_time_s"] for m in runs)
            steps = sorted({m["global_step"] for m in runs})
            print(f"| {arm} | {len(runs)} | {wall:.0f} | {steps} |")


if __name__ == "__main__":
    main()
