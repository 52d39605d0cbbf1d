"""Find likely label errors in a training split from frozen pretrained features, before fine-tuning.

1. :func:`out_of_fold_probabilities`: K-fold predicted class probabilities; every example is scored by
   a classifier fit on the other folds only, so its own label never reaches its own prediction.
2. :func:`find_label_issues`: cleanlab's confident learning on those probabilities (Northcutt et al.,
   2021, "Confident Learning: Estimating Uncertainty in Dataset Labels"): which rows are flagged, a
   score per row (higher = more likely wrong), the suggested class, and the estimated joint of given
   and true labels (the noise matrix), with a one-line summary.
3. :func:`write_label_issues`: ``label_issues.csv``, one row per training example sorted by score,
   which ``data.exclude`` reads back (:mod:`tl_lightning.data.curation`).

cleanlab is an optional dependency: ``pip install 'tl-lightning[quality]'``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import KFold

from tl_lightning.data.curation import TrainingRows

#: ``fit(train_features, train_labels)`` -> a function from features to ``(n, k)`` class probabilities.
Fit = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
INSTALL_HINT = "label issues need cleanlab: pip install 'tl-lightning[quality]' (or cleanlab>=2.9,<3)"


def out_of_fold_probabilities(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, fit: Fit, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Predicted class probabilities of every example from a model fit on the *other* folds.

    Folds are drawn from ``seed`` alone, not stratified by the labels: an example's label decides
    neither its own prediction nor which fold it lands in.

    Args:
        features: ``(n, d)`` frozen features of the training split.
        labels: ``(n,)`` given labels.
        num_classes: Number of classes (columns of the result).
        fit: Fits a classifier on ``(features, labels)`` of the other folds and returns its
            probability function (e.g. a converged logistic-regression probe).
        folds: Number of folds ``K`` (at least 2; every class needs at least ``K`` examples).
        seed: Seed of the fold assignment.

    Returns:
        ``(n, num_classes)`` probabilities (float64, rows summing to 1).

    Raises:
        ValueError: If ``folds`` < 2 or a class has fewer than ``folds`` examples, naming the class.

    Example::

        probs = out_of_fold_probabilities(x, y, 10, lambda a, b: fitted_probe(a, b), folds=5)
    """
    labels = torch.as_tensor(labels).long()
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"label_issues.folds must be an integer >= 2, got {folds!r}")
    counts = np.bincount(labels.numpy(), minlength=num_classes)
    if counts.min() < folds:
        cls = int(counts.argmin())
        raise ValueError(
            f"class {cls} has {int(counts[cls])} training examples, fewer than label_issues.folds={folds}"
        )
    probabilities = np.zeros((len(labels), num_classes))
    splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held_out in splitter.split(np.zeros(len(labels))):
        predict = fit(features[train], labels[train])
        probabilities[held_out] = predict(features[held_out]).double().numpy()
    return probabilities


@dataclass(frozen=True)
class LabelIssues:
    """What confident learning found in one training split.

    Attributes:
        given: ``(n,)`` given labels.
        suggested: ``(n,)`` the most probable class out of fold.
        score: ``(n,)`` ``1 -`` cleanlab's label quality (self-confidence): higher = more likely wrong.
        flagged: ``(n,)`` cleanlab's ``find_label_issues`` (prune by noise rate).
        joint: ``(k, k)`` estimated number of examples with given label ``i`` and true label ``j``.
        class_names: Names of the classes.
    """

    given: np.ndarray
    suggested: np.ndarray
    score: np.ndarray
    flagged: np.ndarray
    joint: np.ndarray
    class_names: list[str]

    def summary(self, pairs: int = 3) -> str:
        """One line: how many are flagged and which (given -> likely true) pairs dominate the noise."""
        off = self.joint.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(-off, axis=None, kind="stable")[:pairs]
        top = [np.unravel_index(i, off.shape) for i in order if off.flat[i] >= 0.5]
        names = self.class_names
        listed = ", ".join(f"{names[i]!r} -> {names[j]!r} ~{off[i, j]:.0f}" for i, j in top) or "none"
        n, flagged = len(self.given), int(self.flagged.sum())
        estimated = off.sum() / max(self.joint.sum(), 1)
        return (
            f"{flagged} of {n} training labels flagged ({100 * flagged / n:.1f}%); estimated noise "
            f"{100 * estimated:.1f}%; largest given -> likely true pairs: {listed}"
        )


def find_label_issues(
    labels: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str]
) -> LabelIssues:
    """cleanlab's confident learning on out-of-fold ``probabilities`` of the ``labels`` given.

    Raises:
        ImportError: If cleanlab is not installed, saying how to install it.
    """
    try:
        from cleanlab.count import estimate_joint
        from cleanlab.filter import find_label_issues as cleanlab_find
        from cleanlab.rank import get_label_quality_scores
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    given = np.asarray(labels, dtype=np.int64)
    # n_jobs=1: cleanlab's default forks a process pool, and a fork of a process holding torch's thread
    # pools can deadlock (it hung a test run); one process is also fast enough at these sizes
    flagged = cleanlab_find(given, probabilities, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = get_label_quality_scores(given, probabilities, method="self_confidence")
    joint = estimate_joint(given, probabilities) * len(given)
    return LabelIssues(
        given, probabilities.argmax(1), 1.0 - quality, np.asarray(flagged, bool), joint, list(class_names)
    )


def write_label_issues(
    path: str | Path, issues: LabelIssues, rows: TrainingRows, true_labels: np.ndarray | None = None
) -> Path:
    """``label_issues.csv``: one row per training example, highest score first.

    Columns: ``index`` (position in the training split), ``path`` (image files; empty for data held in
    memory), ``item`` (the row of an in-memory data set) or ``text``, ``given``, ``suggested``,
    ``score`` (full precision, so that ``data.exclude_top`` ranks as written), ``flagged``
    (``true``/``false``), and ``true`` (the label before planted noise) when ``true_labels`` is given.
    ``path`` is relative to the image folder's ``data.root``. ``data.exclude=<this file>`` drops the
    flagged rows.

    Raises:
        ValueError: If ``rows`` does not have one name per example.
    """
    if len(rows.keys) != len(issues.given):
        raise ValueError(f"{len(rows.keys)} row names for {len(issues.given)} examples")
    keys = ["text"] if rows.column == "text" else ["path", "item"]
    columns = ["index", *keys, "given", "suggested", "score", "flagged"]
    columns += ["true"] if true_labels is not None else []
    names = issues.class_names
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for i in np.argsort(-issues.score, kind="stable"):
            row = {key: "" for key in keys} | {rows.column: rows.keys[i]}
            row |= {
                "index": int(i),
                "given": names[issues.given[i]],
                "suggested": names[issues.suggested[i]],
                "score": repr(float(issues.score[i])),
                "flagged": "true" if issues.flagged[i] else "false",
            }
            if true_labels is not None:
                row["true"] = names[true_labels[i]]
            writer.writerow(row)
    return path


def detection_scores(flagged: np.ndarray, given: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Precision and recall of ``flagged`` against the rows whose given label differs from the true one.

    Precision is ``nan`` when nothing is flagged, recall ``nan`` when no label is wrong.
    """
    wrong = np.asarray(given) != np.asarray(true)
    hits = int((flagged & wrong).sum())
    return {
        "flagged": int(flagged.sum()),
        "wrong": int(wrong.sum()),
        "precision": hits / flagged.sum() if flagged.any() else float("nan"),
        "recall": hits / wrong.sum() if wrong.any() else float("nan"),
    }
