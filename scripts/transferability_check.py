"""Check transferability scores against fine-tuned accuracy: Kendall tau, weighted tau, a table and a plot.

For each dataset, give the score table ``scripts/transferability.py --csv`` wrote and the Hydra multirun
directories of ``train.py`` runs that fine-tuned the same candidates (any seeds). A run's candidate is
its backbone config (``.hydra/hydra.yaml``, ``runtime.choices.backbone``) and ``@<cut_at>`` when
``backbone.cut_at`` is set (``.hydra/config.yaml``), the names ``scripts/transferability.py`` uses. A
candidate's accuracy is the mean of ``--metric`` over its runs' ``metrics.json``.

Per dataset and score, :func:`tl_lightning.analysis.rank_agreement` compares the score with the
fine-tuned accuracy over the candidates that have both (LEEP and NCE exist only for candidates that
keep their source head). Written to ``--out``:

* ``check.md`` -- per dataset the scores and the fine-tuned accuracy (mean ± sample std, runs; no std
  for a single run), then Kendall's tau (with its p-value) and the weighted tau per score per dataset,
  with ``n``;
* ``scores_vs_finetuned.png`` -- fine-tuned accuracy against each score, one row of panels per dataset.

Usage::

    python scripts/transferability_check.py --out docs/results/transferability \\
        --dataset digits docs/results/transferability/scores_digits.csv \\
            multirun/transferability/digits_seed0 multirun/transferability/digits_seed1 \\
        --dataset fashion_mnist docs/results/transferability/scores_fashion_mnist.csv \\
            multirun/transferability/fashion_seed0
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from tl_lightning.analysis.transferability import RankAgreement, rank_agreement

SCORES = ("LogME", "LEEP", "NCE")


@dataclass
class Candidate:
    """One (backbone, cut) candidate on one dataset.

    Args:
        name: ``<backbone config>[@<layer group>]``.
        scores: Score per name in ``SCORES``; ``None`` when missing (no source head after a cut).
        feature_dim: From the score table (``None`` if the candidate was not scored).
        train_samples: From the score table (``None`` if the candidate was not scored).
        accuracy: The fine-tuned metric of each run of this candidate.
    """

    name: str
    scores: dict[str, float | None]
    feature_dim: int | None = None
    train_samples: int | None = None
    accuracy: list[float] | None = None

    @property
    def mean_accuracy(self) -> float | None:
        """Mean over runs, ``None`` without runs."""
        return statistics.fmean(self.accuracy) if self.accuracy else None


def read_scores(path: Path) -> dict[str, Candidate]:
    """Candidates of a ``scripts/transferability.py --csv`` table, keyed by name, in file order.

    Raises:
        ValueError: If the file lacks the ``candidate`` column or a score column.
    """
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    missing = [column for column in ("candidate", *SCORES) if rows and column not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected a score table with columns candidate, {', '.join(SCORES)}")
    return {
        row["candidate"]: Candidate(
            name=row["candidate"],
            scores={score: float(row[score]) if row[score] else None for score in SCORES},
            feature_dim=int(row["feature dim"]) if row.get("feature dim") else None,
            train_samples=int(row["train samples"]) if row.get("train samples") else None,
        )
        for row in rows
    }


def run_candidate(run_dir: Path) -> str:
    """``<backbone config>[@<cut_at>]`` of one ``train.py`` run directory."""
    choices = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
    cut_at = OmegaConf.load(run_dir / ".hydra" / "config.yaml").backbone.get("cut_at")
    return choices.backbone + (f"@{cut_at}" if cut_at else "")


def read_finetuned(sweep_dirs: list[Path], metric: str) -> dict[str, list[float]]:
    """``metric`` of every finished run under ``sweep_dirs``, grouped by candidate.

    Raises:
        FileNotFoundError: If a sweep directory holds no ``metrics.json``.
        KeyError: If a run's ``metrics.json`` has no ``test`` value named ``metric``, listing those it has.
    """
    accuracy: dict[str, list[float]] = {}
    for sweep_dir in sweep_dirs:
        found = sorted(sweep_dir.rglob("metrics.json"))
        if not found:
            raise FileNotFoundError(
                f"{sweep_dir}: no metrics.json below it (not a finished train.py multirun)"
            )
        for path in found:
            test = json.loads(path.read_text())["test"]
            if metric not in test:
                raise KeyError(f"{path}: no test metric {metric!r}; it has {sorted(test)}")
            accuracy.setdefault(run_candidate(path.parent), []).append(test[metric])
    return accuracy


def combine(scores: dict[str, Candidate], accuracy: dict[str, list[float]]) -> list[Candidate]:
    """Scored candidates with their runs, then fine-tuned candidates that were not scored."""
    candidates = dict(scores)
    for name, values in accuracy.items():
        candidates.setdefault(name, Candidate(name=name, scores=dict.fromkeys(SCORES))).accuracy = values
    return list(candidates.values())


def agreements(candidates: list[Candidate]) -> dict[str, RankAgreement | None]:
    """Rank agreement per score; ``None`` when fewer than 2 candidates have the score and an accuracy."""
    accuracy = {c.name: c.mean_accuracy for c in candidates}
    result: dict[str, RankAgreement | None] = {}
    for score in SCORES:
        values = {c.name: c.scores[score] for c in candidates}
        usable = [name for name, value in values.items() if value is not None and accuracy[name] is not None]
        result[score] = rank_agreement(values, accuracy) if len(usable) >= 2 else None
    return result


def _cell(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _accuracy_cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f} (1)"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)})"


def markdown(datasets: dict[str, list[Candidate]], found: dict[str, dict], metric: str) -> str:
    """The per-dataset tables, then the agreement table."""
    lines = []
    for dataset, candidates in datasets.items():
        lines += [
            f"### {dataset}",
            "",
            "| candidate | feature dim | train samples | "
            + " | ".join(SCORES)
            + f" | fine-tuned {metric} (runs) |",
            "|" + "---|" * (4 + len(SCORES)),
        ]
        for c in candidates:
            cells = [c.name, _cell(c.feature_dim), _cell(c.train_samples)]
            cells += [_cell(c.scores[score]) for score in SCORES] + [_accuracy_cell(c.accuracy)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        f"### Rank agreement with fine-tuned {metric}",
        "",
        "| dataset | score | n | Kendall tau | p-value | weighted tau |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, per_score in found.items():
        for score, agreement in per_score.items():
            if agreement is None:
                lines.append(f"| {dataset} | {score} | < 2 | - | - | - |")
            else:
                lines.append(
                    f"| {dataset} | {score} | {agreement.n} | {agreement.kendall_tau:.3f} | "
                    f"{agreement.p_value:.3f} | {agreement.weighted_tau:.3f} |"
                )
    return "\n".join(lines) + "\n"


def plot(datasets: dict[str, list[Candidate]], found: dict[str, dict], metric: str, path: Path) -> None:
    """Fine-tuned accuracy against each score: one row per dataset, one panel per score."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(
        len(datasets), len(SCORES), figsize=(4.2 * len(SCORES), 3.6 * len(datasets)), squeeze=False
    )
    for row, (dataset, candidates) in enumerate(datasets.items()):
        for column, score in enumerate(SCORES):
            axis = axes[row][column]
            for index, c in enumerate(candidates):  # one colour per candidate across panels
                if c.scores[score] is None or not c.accuracy:
                    continue
                std = statistics.stdev(c.accuracy) if len(c.accuracy) > 1 else 0.0
                x, y = c.scores[score], c.mean_accuracy
                axis.errorbar(x, y, yerr=std, fmt="o", capsize=3, color=f"C{index}")
                axis.annotate(c.name.replace("efficientnet_", ""), (x, y), fontsize=7)
            agreement = found[dataset][score]
            title = f"{dataset}: {score}"
            if agreement is not None:
                title += f"\ntau {agreement.kendall_tau:.2f} (p {agreement.p_value:.2f}), n {agreement.n}"
            axis.set_title(title, fontsize=9)
            axis.set_xlabel(score)
            axis.set_ylabel(f"fine-tuned {metric}")
            axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME SCORES_CSV SWEEP_DIR",
        help="a dataset name, its score table and one or more multirun directories; repeat per dataset",
    )
    parser.add_argument("--metric", default="test/acc", help="test metric of metrics.json (default test/acc)")
    parser.add_argument("--out", type=Path, required=True, help="directory for check.md and the plot")
    args = parser.parse_args(argv)
    datasets: dict[str, list[Candidate]] = {}
    for entry in args.dataset:
        if len(entry) < 3:
            parser.error(f"--dataset {' '.join(entry)}: expected NAME SCORES_CSV SWEEP_DIR [SWEEP_DIR ...]")
        name, scores, *sweeps = entry
        datasets[name] = combine(
            read_scores(Path(scores)), read_finetuned([Path(s) for s in sweeps], args.metric)
        )
    found = {name: agreements(candidates) for name, candidates in datasets.items()}
    text = markdown(datasets, found, args.metric)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check.md").write_text(text)
    plot(datasets, found, args.metric, args.out / "scores_vs_finetuned.png")
    print(text)


if __name__ == "__main__":
    main()
