"""Summarise a Hydra multirun of ``train.py``: a markdown table, negative-transfer flags and two plots.

Every run directory under the multirun directory (found by its ``metrics.json``) contributes one
value of the chosen metric. The report groups them by strategy (rows) and labelled training
examples per class (columns, ``data.train_per_class``; ``null`` = ``all``) and aggregates over seeds.

Written to ``--out`` (default: the multirun directory):

* ``report.md`` -- the sweep command(s) rebuilt from ``.hydra/overrides.yaml`` (one per ``train.py -m``
  call, told apart by their Hydra overrides, when several sweeps wrote into the directory), the table of
  ``mean ± std (n)`` (sample std, ddof=1), the negative-transfer section, the final layer drift and the
  sweep's wall time;
* ``sample_efficiency.png`` -- the metric vs labelled examples per class (log x), one line per strategy;
* ``drift.png`` -- final relative drift ``||θ-θ₀||/||θ₀||`` per layer group (input -> output) per strategy,
  from the ``drift/<group>`` columns of ``csv/metrics.csv`` (skipped, with a note, when there are none).

Wall time: the sum of the runs' ``metrics.json["wall_time_s"]`` (each run from its config check to its
``metrics.json``: building, fitting, testing; not the interpreter start), per strategy and in all, and the
span from the first run's start (``metrics.json``'s modification time minus ``wall_time_s``) to the last
run's end. When several sweeps write into one directory, the span includes the time between them.

Negative transfer: a strategy other than ``scratch`` whose mean is worse than scratch's at the same
``train_per_class`` by more than the seed noise, ``sqrt(se_a² + se_b²)`` with ``se = std / sqrt(n)``
(a fixed 0.01 when either side has a single run). "Worse" is lower, or higher for a metric whose name
contains ``loss``. The strategies *better* than scratch by the same rule are listed per size too.

Usage::

    python scripts/report.py multirun/train/2026-01-01_12-00-00 [--out DIR] [--metric test/acc]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

BASELINE = "scratch"
ALL = "all"
FIXED_TOLERANCE = 0.01  # used instead of the combined standard error when either side has n = 1
DRIFT_PREFIX = "drift/"


@dataclass
class Run:
    """One finished run of the sweep.

    Args:
        path: The run directory (the one holding ``metrics.json``).
        strategy: ``metrics.json["strategy"]`` (else the config's ``strategy_name``).
        train_per_class: ``data.train_per_class``; ``None`` means all training examples.
        seed: The config's ``seed`` (``None`` if unknown).
        value: The chosen metric, ``None`` if this run did not log it.
        train_examples: ``metrics.json["train_examples_per_class"]`` if present.
        overrides: The run's ``.hydra/overrides.yaml`` (empty if missing).
        hydra_overrides: The run's Hydra overrides (``hydra.overrides.hydra`` of ``.hydra/hydra.yaml``,
            e.g. ``hydra.sweep.subdir=...``) without ``hydra.mode``; they tell sweeps in one directory apart.
        drift: Final (last logged) drift per layer group, keyed by group name in CSV column order.
        wall_time_s: ``metrics.json["wall_time_s"]`` if present.
        finished: When ``metrics.json`` was written (its modification time, seconds since the epoch).
    """

    path: Path
    strategy: str
    train_per_class: int | None
    seed: int | None
    value: float | None
    train_examples: float | None = None
    overrides: list[str] = field(default_factory=list)
    hydra_overrides: tuple[str, ...] = ()
    drift: dict[str, float] = field(default_factory=dict)
    wall_time_s: float | None = None
    finished: float | None = None

    @property
    def label(self) -> str:
        """The column label: the number of examples per class, or ``"all"``."""
        return ALL if self.train_per_class is None else str(self.train_per_class)


@dataclass(frozen=True)
class Cell:
    """Seed statistics of one (strategy, train_per_class) cell: mean, sample std (0 for n = 1), n."""

    mean: float
    std: float
    n: int

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n)

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f} ({self.n})"


@dataclass(frozen=True)
class Flag:
    """A negative-transfer finding: ``strategy`` is worse than scratch at ``label`` beyond ``tolerance``."""

    strategy: str
    label: str
    cell: Cell
    baseline: Cell
    tolerance: float


# 1. Collect ----------------------------------------------------------------------------------------


def collect_runs(root: str | Path, metric: str = "test/acc") -> list[Run]:
    """Every run under ``root`` (recursive search for ``metrics.json``), in job order.

    Args:
        root: The multirun directory.
        metric: Key looked up in ``metrics.json``'s ``test``, ``final`` and ``best`` sections, then
            at its top level (e.g. ``wall_time_s``).

    Returns:
        The runs, sorted by directory and Hydra job number.

    Raises:
        FileNotFoundError: If ``root`` is not a directory or holds no ``metrics.json``.
        ValueError: If a ``metrics.json`` or ``.hydra`` file cannot be parsed (the message names it),
            or no run has ``metric`` (the message lists the metrics found).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun directory {str(root)!r} does not exist or is not a directory")
    files = sorted(root.rglob("metrics.json"), key=lambda p: _job_order(p.parent))
    if not files:
        raise FileNotFoundError(f"no metrics.json found under {str(root)!r}: not a `train.py -m` directory?")
    runs = [_read_run(f, metric) for f in files]
    if all(run.value is None for run in runs):
        available = sorted({k for f in files for k in _metric_keys(json.loads(f.read_text()))})
        raise ValueError(
            f"metric {metric!r} is in none of the {len(runs)} runs under {str(root)!r}; found: {available}"
        )
    return runs


def _job_order(run_dir: Path) -> tuple:
    match = re.match(r"(\d+)_?", run_dir.name)
    return (str(run_dir.parent), int(match.group(1)) if match else math.inf, run_dir.name)


def _read_run(metrics_file: Path, metric: str) -> Run:
    run_dir = metrics_file.parent
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{metrics_file} is not valid JSON ({err}); was the run interrupted?") from err
    config = _load_yaml(run_dir / ".hydra" / "config.yaml") or {}
    overrides = [str(o) for o in (_load_yaml(run_dir / ".hydra" / "overrides.yaml") or [])]
    overridden = dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)
    hydra_node = ((_load_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}).get("overrides")
    hydra_overrides = tuple(
        str(o) for o in ((hydra_node or {}).get("hydra") or []) if not str(o).startswith("hydra.mode=")
    )

    data = config.get("data") or {}
    per_class = (
        data["train_per_class"] if "train_per_class" in data else overridden.get("data.train_per_class")
    )
    per_class = None if per_class in (None, "null", "None", "", ALL) else per_class
    seed = config.get("seed", overridden.get("seed"))
    train_examples = metrics.get("train_examples_per_class")
    wall = metrics.get("wall_time_s")
    strategy = metrics.get("strategy") or config.get("strategy_name") or overridden.get("strategy", "?")
    return Run(
        path=run_dir,
        strategy=str(strategy),
        train_per_class=None if per_class is None else int(per_class),
        seed=None if seed is None else int(seed),
        value=_metric_value(metrics, metric),
        train_examples=float(train_examples) if isinstance(train_examples, int | float) else None,
        overrides=overrides,
        hydra_overrides=hydra_overrides,
        drift=read_final_drift(run_dir / "csv" / "metrics.csv"),
        wall_time_s=float(wall) if isinstance(wall, int | float) and not isinstance(wall, bool) else None,
        finished=metrics_file.stat().st_mtime,
    )


def _load_yaml(path: Path):
    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # omegaconf/yaml raise several types; all mean "unreadable file"
        raise ValueError(f"cannot parse {path}: {err}") from err


def _metric_keys(metrics: dict) -> list[str]:
    keys = [k for section in ("test", "final", "best") for k in (metrics.get(section) or {})]
    return keys + [k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]


def _metric_value(metrics: dict, metric: str) -> float | None:
    for section in ("test", "final", "best"):
        value = (metrics.get(section) or {}).get(metric)
        if isinstance(value, int | float):
            return float(value)
    value = metrics.get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_final_drift(csv_file: Path) -> dict[str, float]:
    """The last logged value of every ``drift/<group>`` column of a Lightning ``CSVLogger`` file.

    Rows where a drift column is empty belong to other log events (steps, validation, test) and are
    ignored. Returns ``{}`` if the file or the columns do not exist.
    """
    if not csv_file.is_file():
        return {}
    with csv_file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c for c in reader.fieldnames or [] if c.startswith(DRIFT_PREFIX)]
        final: dict[str, float] = {}
        for row in reader:
            for column in columns:
                if row.get(column) not in (None, ""):
                    final[column] = float(row[column])
    return {c.removeprefix(DRIFT_PREFIX): final[c] for c in columns if c in final}


# 2. Aggregate ------------------------------------------------------------------------------------


def column_labels(runs: Sequence[Run]) -> list[str]:
    """The ``train_per_class`` labels present, sorted numerically with ``"all"`` last."""
    numbers = sorted({r.train_per_class for r in runs if r.train_per_class is not None})
    return [str(n) for n in numbers] + ([ALL] if any(r.train_per_class is None for r in runs) else [])


def strategy_order(runs: Sequence[Run]) -> list[str]:
    """Strategies with ``scratch`` first, then alphabetically."""
    names = {r.strategy for r in runs}
    return sorted(names, key=lambda s: (s != BASELINE, s))


def aggregate(runs: Sequence[Run]) -> dict[tuple[str, str], Cell]:
    """``{(strategy, train_per_class label): Cell}`` over the runs that have the metric."""
    values: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if run.value is not None:
            values.setdefault((run.strategy, run.label), []).append(run.value)
    return {
        key: Cell(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for key, v in values.items()
    }


def lower_is_better(metric: str) -> bool:
    """Losses are minimised; every other metric (accuracy, F1, ...) is maximised."""
    return "loss" in metric


def negative_transfer(cells: dict[tuple[str, str], Cell], metric: str = "test/acc") -> list[Flag]:
    """Transfer strategies worse than ``scratch`` at the same ``train_per_class`` beyond the seed noise.

    The tolerance is the combined standard error ``sqrt(se_a² + se_b²)``, or ``FIXED_TOLERANCE``
    when either cell has a single run. Cells without a scratch counterpart are not judged.
    """
    return _versus_scratch(cells, metric, worse=True)


def positive_transfer(cells: dict[tuple[str, str], Cell], metric: str = "test/acc") -> list[Flag]:
    """Transfer strategies *better* than ``scratch`` beyond the seed noise (the same rule as
    :func:`negative_transfer`, the other way round)."""
    return _versus_scratch(cells, metric, worse=False)


def _versus_scratch(cells: dict[tuple[str, str], Cell], metric: str, worse: bool) -> list[Flag]:
    sign = (-1.0 if lower_is_better(metric) else 1.0) * (1.0 if worse else -1.0)
    flags = []
    for (strategy, label), cell in sorted(cells.items()):
        baseline = cells.get((BASELINE, label))
        if strategy == BASELINE or baseline is None:
            continue
        if cell.n > 1 and baseline.n > 1:
            tolerance = math.sqrt(cell.se**2 + baseline.se**2)
        else:
            tolerance = FIXED_TOLERANCE
        if sign * (baseline.mean - cell.mean) > tolerance:
            flags.append(Flag(strategy, label, cell, baseline, tolerance))
    return flags


def sweep_calls(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs of each ``train.py -m`` call, in job order: runs that share their Hydra overrides
    (``hydra.sweep.subdir=...`` and the like) came from one call, which sets them first."""
    calls: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        calls.setdefault(run.hydra_overrides, []).append(run)
    return list(calls.values())


def sweep_commands(runs: Sequence[Run]) -> list[str]:
    """One :func:`sweep_command` per ``train.py -m`` call (:func:`sweep_calls`), in job order."""
    commands = [sweep_command(group) for group in sweep_calls(runs)]
    return [command for command in commands if command]


def sweep_command(runs: Sequence[Run]) -> str | None:
    """``python train.py -m key=v1,v2 ...`` rebuilt from the runs' overrides (values in job order), after
    the first run's Hydra overrides."""
    values: dict[str, list[str]] = {}
    for run in runs:
        for override in run.overrides:
            key, _, value = override.partition("=")
            seen = values.setdefault(key if "=" in override else override, [])
            if "=" in override and value not in seen:
                seen.append(value)
    if not values:
        return None
    parts = [shlex.quote(f"{key}={','.join(v)}" if v else key) for key, v in values.items()]
    return " ".join(["python train.py -m", *map(shlex.quote, runs[0].hydra_overrides), *parts])


def group_order(names: Sequence[str]) -> list[str]:
    """Layer groups input -> output: stem first, then by the first number in the name, then the rest.

    Ties and groups without a number keep their given (CSV column) order, so e.g.
    ``backbone.conv_stem+bn1, backbone.blocks.0, ..., backbone.blocks.6+conv_head+bn2``.
    """

    def key(item: tuple[int, str]) -> tuple:
        position, name = item
        if "stem" in name.split("+")[0]:
            return (0, 0, position)
        number = re.search(r"\d+", name)
        return (1, int(number.group()), position) if number else (2, 0, position)

    return [name for _, name in sorted(enumerate(names), key=key)]


def drift_profile(runs: Sequence[Run]) -> tuple[str | None, list[str], dict[str, list[float]]]:
    """Final drift per layer group per strategy, averaged over seeds at ``all`` (else the largest).

    Returns:
        ``(train_per_class label used, groups input -> output, {strategy: mean drift per group})``;
        ``(None, [], {})`` when no run logged drift. A group a strategy never logged is ``nan``.
    """
    with_drift = [r for r in runs if r.drift]
    if not with_drift:
        return None, [], {}
    label = column_labels(with_drift)[-1]
    chosen = [r for r in with_drift if r.label == label]
    groups = group_order(list(dict.fromkeys(g for r in chosen for g in r.drift)))
    profile = {}
    for strategy in strategy_order(chosen):
        mine = [r for r in chosen if r.strategy == strategy]
        profile[strategy] = [
            statistics.fmean(vals) if (vals := [r.drift[g] for r in mine if g in r.drift]) else math.nan
            for g in groups
        ]
    return label, groups, profile


@dataclass(frozen=True)
class WallTime:
    """How long a sweep took.

    Args:
        total_s: Sum of the runs' ``wall_time_s``.
        span_s: First run's start to last run's end.
        per_strategy: ``{strategy: (runs, summed wall_time_s)}``, in report order.
        missing: Runs without ``wall_time_s`` (left out of every number).
    """

    total_s: float
    span_s: float
    per_strategy: dict[str, tuple[int, float]]
    missing: int


def wall_time(runs: Sequence[Run]) -> WallTime | None:
    """The sweep's wall time from the runs' ``wall_time_s`` and ``metrics.json`` times; ``None`` if no run
    recorded one."""
    timed = [r for r in runs if r.wall_time_s is not None and r.finished is not None]
    if not timed:
        return None
    per_strategy = {}
    for strategy in strategy_order(timed):
        mine = [r.wall_time_s for r in timed if r.strategy == strategy]
        per_strategy[strategy] = (len(mine), math.fsum(mine))
    span = max(r.finished for r in timed) - min(r.finished - r.wall_time_s for r in timed)
    return WallTime(math.fsum(r.wall_time_s for r in timed), span, per_strategy, len(runs) - len(timed))


def format_duration(seconds: float) -> str:
    """``"1 h 02 min"``, ``"3 min 05 s"`` or ``"42.0 s"``."""
    if seconds >= 3600:
        hours, rest = divmod(round(seconds / 60), 60)
        return f"{hours} h {rest:02d} min"
    if seconds >= 60:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    return f"{seconds:.1f} s"


# 3. Write ----------------------------------------------------------------------------------------


def render_markdown(runs: Sequence[Run], metric: str, root: Path, plots: dict[str, str | None]) -> str:
    """The whole ``report.md``: command, table, negative transfer, drift, wall time, notes."""
    cells = aggregate(runs)
    flags = negative_transfer(cells, metric)
    flagged = {(f.strategy, f.label) for f in flags}
    labels = column_labels(runs)
    direction = "lower is better" if lower_is_better(metric) else "higher is better"
    plural = "" if len(runs) == 1 else "s"
    lines = [f"# Sweep report: `{metric}`", "", f"{len(runs)} run{plural} under `{root}`.", ""]

    commands = sweep_commands(runs)
    lines += ["## Command" if len(commands) < 2 else "## Commands", ""]
    lines += ["```bash", *commands, "```"] if commands else ["No `.hydra/overrides.yaml` found: unknown."]

    lines += ["", "## Results", ""]
    lines += [
        f"`{metric}` ({direction}): mean ± std (n seeds) by strategy and labelled training examples "
        f"per class (`data.train_per_class`). ⚠ = negative transfer (worse than `{BASELINE}`)."
    ]
    lines += ["", "| strategy | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for strategy in strategy_order(runs):
        row = []
        for label in labels:
            cell = cells.get((strategy, label))
            row.append("—" if cell is None else f"{cell}{' ⚠' if (strategy, label) in flagged else ''}")
        lines.append(f"| {strategy} | " + " | ".join(row) + " |")

    lines += ["", "## Negative transfer", ""]
    if not any(s == BASELINE for s, _ in cells):
        lines.append(f"No `{BASELINE}` runs: negative transfer cannot be judged.")
    elif not flags:
        lines.append(f"None found: no transfer strategy is worse than `{BASELINE}` beyond the seed noise.")
    else:
        lines.append(
            f"Worse than `{BASELINE}` by more than the seed noise (combined standard error, "
            f"or {FIXED_TOLERANCE} when a side has one run):"
        )
        lines.append("")
        for f in flags:
            lines.append(
                f"- `{f.strategy}` at train_per_class={f.label}: {f.cell} vs {BASELINE} {f.baseline}, "
                f"difference {abs(f.cell.mean - f.baseline.mean):.3f} > tolerance {f.tolerance:.3f}"
            )

    lines += ["", "## Transfer that beats scratch", ""]
    better = positive_transfer(cells, metric)
    if not any(s == BASELINE for s, _ in cells):
        lines.append(f"No `{BASELINE}` runs: nothing to compare with.")
    else:
        lines.append(f"Better than `{BASELINE}` by more than the seed noise (the same tolerance):")
        lines.append("")
        for label in labels:
            wins = sorted(
                (f for f in better if f.label == label), key=lambda f: -abs(f.cell.mean - f.baseline.mean)
            )
            text = (
                ", ".join(f"`{f.strategy}` +{abs(f.cell.mean - f.baseline.mean):.3f}" for f in wins) or "none"
            )
            lines.append(f"- train_per_class={label}: {text}")

    lines += ["", "## Layer drift", ""]
    label, groups, profile = drift_profile(runs)
    if not groups:
        lines.append("No `drift/<group>` columns in any `csv/metrics.csv`: drift plot skipped.")
    else:
        lines.append(
            f"Final relative drift ||θ-θ₀||/||θ₀|| per layer group (input -> output), "
            f"mean over seeds at train_per_class={label}."
        )
        lines += ["", "| strategy | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        for strategy, values in profile.items():
            shown = ("—" if math.isnan(v) else f"{v:.4f}" for v in values)
            lines.append(f"| {strategy} | " + " | ".join(shown) + " |")

    lines += ["", "## Wall time", "", *_wall_time_lines(runs)]

    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({file})" for name, file in plots.items() if file]

    notes = _notes(runs, metric)
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _wall_time_lines(runs: Sequence[Run]) -> list[str]:
    timing = wall_time(runs)
    if timing is None:
        return ["No `wall_time_s` in any `metrics.json`: unknown."]
    counted = len(runs) - timing.missing
    lines = [
        f"{format_duration(timing.total_s)} summed over {counted} runs (each run's `wall_time_s`: "
        f"config check to `metrics.json`, i.e. building, fitting and testing; not the interpreter start); "
        f"{format_duration(timing.span_s)} from the first run's start to the last run's end "
        f"(including any time between sweeps written into this directory).",
    ]
    if timing.missing:
        lines[0] += f" {timing.missing} run(s) without `wall_time_s` are not counted."
    lines += ["", "| strategy | runs | mean per run | total |", "|---|---|---|---|"]
    for strategy, (n, total) in timing.per_strategy.items():
        lines.append(f"| {strategy} | {n} | {format_duration(total / n)} | {format_duration(total)} |")
    calls = sweep_calls(runs)
    if len(calls) < 2:
        return lines
    lines += [
        "",
        "Per sweep (one `train.py -m` call each, numbered in the order of the commands above):",
        "",
        "| sweep | runs | summed | first start to last end |",
        "|---|---|---|---|",
    ]
    for number, call in enumerate(calls, start=1):
        sweep = wall_time(call)
        if sweep is None:
            lines.append(f"| {number} | {len(call)} | unknown | unknown |")
        else:
            timed = len(call) - sweep.missing
            total, span = format_duration(sweep.total_s), format_duration(sweep.span_s)
            lines.append(f"| {number} | {timed} | {total} | {span} |")
    return lines


def _notes(runs: Sequence[Run], metric: str) -> list[str]:
    notes = [f"- no `{metric}` in `{r.path}` (run skipped)" for r in runs if r.value is None]
    seen: dict[tuple, Path] = {}
    for r in runs:
        key = (r.strategy, r.label, r.seed)
        if r.seed is not None and key in seen:
            notes.append(
                f"- duplicate strategy={r.strategy} train_per_class={r.label} seed={r.seed}: "
                f"`{seen[key]}` and `{r.path}` (both counted)"
            )
        seen.setdefault(key, r.path)
    return notes


def x_positions(runs: Sequence[Run]) -> dict[str, float]:
    """Examples per class of each column label; ``all``: ``train_examples`` if known, else 2 x the largest."""
    numbers = [r.train_per_class for r in runs if r.train_per_class is not None]
    positions = {str(n): float(n) for n in numbers}
    if any(r.train_per_class is None for r in runs):
        known = [r.train_examples for r in runs if r.train_per_class is None and r.train_examples]
        positions[ALL] = max(known) if known else (2.0 * max(numbers) if numbers else 1.0)
    return positions


def plot_sample_efficiency(runs: Sequence[Run], metric: str, out_file: Path) -> Path:
    """Metric vs labelled examples per class (log x), one line with std error bars per strategy."""
    plt = _pyplot()
    cells = aggregate(runs)
    labels = column_labels(runs)
    xs = x_positions(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in strategy_order(runs):
        present = [label for label in labels if (strategy, label) in cells]
        if present:
            ax.errorbar(
                [xs[label] for label in present],
                [cells[strategy, label].mean for label in present],
                yerr=[cells[strategy, label].std for label in present],
                marker="o",
                capsize=3,
                label=strategy,
                linestyle="--" if strategy == BASELINE else "-",
            )
    ax.set_xscale("log")
    ax.set_xticks([xs[label] for label in labels], labels)
    ax.minorticks_off()
    ax.set_xlabel("labelled training examples per class")
    ax.set_ylabel(metric)
    ax.set_title(f"Sample efficiency ({metric}, mean ± std over seeds)")
    return _save(plt, fig, ax, out_file)


def plot_drift(runs: Sequence[Run], out_file: Path) -> Path | None:
    """Final drift per layer group (input -> output), one line per strategy; ``None`` if no drift logged."""
    label, groups, profile = drift_profile(runs)
    if not groups:
        return None
    plt = _pyplot()
    short = _strip_common_prefix(groups)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(groups)), 4.5))
    for strategy, values in profile.items():
        style = "--" if strategy == BASELINE else "-"
        ax.plot(range(len(groups)), values, marker="o", label=strategy, linestyle=style)
    ax.set_xticks(range(len(groups)), short, rotation=30, ha="right")
    ax.set_xlabel("layer group (input -> output)")
    ax.set_ylabel("relative drift ||θ-θ₀|| / ||θ₀||")
    ax.set_title(f"Final layer drift (train_per_class={label}, mean over seeds)")
    return _save(plt, fig, ax, out_file)


def _save(plt, fig, ax, out_file: Path) -> Path:
    """Grid, legend and layout shared by both plots; write the PNG and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=120)
    plt.close(fig)
    return out_file


def _strip_common_prefix(names: Sequence[str]) -> list[str]:
    prefixes = {n.split(".", 1)[0] + "." for n in names}
    if len(prefixes) == 1 and all("." in n for n in names):
        prefix = prefixes.pop()
        return [n.removeprefix(prefix) for n in names]
    return list(names)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def write_report(root: str | Path, out: str | Path | None = None, metric: str = "test/acc") -> Path:
    """Collect the runs under ``root`` and write ``report.md`` and the plots into ``out`` (default ``root``).

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError, ValueError: See :func:`collect_runs`.
    """
    root = Path(root)
    runs = collect_runs(root, metric)
    out_dir = Path(out) if out is not None else root
    out_dir.mkdir(parents=True, exist_ok=True)
    efficiency = plot_sample_efficiency(runs, metric, out_dir / "sample_efficiency.png")
    drift = plot_drift(runs, out_dir / "drift.png")
    plots = {"sample efficiency": efficiency.name, "layer drift": drift.name if drift else None}
    report = out_dir / "report.md"
    report.write_text(render_markdown(runs, metric, root, plots), encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exits with code 2 (argparse error) on a missing or empty multirun directory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", type=Path, help="directory of a `python train.py -m ...` sweep")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: multirun_dir)")
    parser.add_argument("--metric", default="test/acc", help="metric to report (default: test/acc)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.multirun_dir, args.out, args.metric)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"report written to {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
