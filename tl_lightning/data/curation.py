"""What a run does to its training labels before fitting: drop flagged rows, or plant label noise.

Every classification data module takes the same three keys and hands its training split to
:class:`TrainingCuration` once, in ``setup()``:

* ``data.exclude=<label_issues.csv>`` drops the rows ``scripts/label_issues.py`` flagged in that file
  (``data.exclude_top=N`` drops its ``N`` highest-scored rows instead). The file must describe this
  very training split: as many rows, and row by row the same file path, text or data-set row and the
  same given label; anything else stops the run, naming the file and the data.
* ``data.label_noise.rate`` / ``.kind`` / ``.seed`` flip exactly ``round(rate * n_c)`` labels of every
  class ``c`` of the training split (``symmetric``: to a uniformly drawn other class; ``pairs``: class
  ``c`` to class ``c + 1`` (mod the number of classes), the same wrong class every time), drawn
  from ``seed`` alone. Validation and test labels are never touched; the true training labels are
  kept (``CuratedTraining.true_labels``) so that a detector can be scored against them.

Noise is planted first and exclusion applied to the noisy split, as ``scripts/label_issues.py`` saw
it: score a run, then train the same overrides with ``data.exclude=<its csv>``.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The kinds of planted label noise.
NOISE_KINDS = ("symmetric", "pairs")
#: The columns that name a training row in ``label_issues.csv``: an image file, a text, or (for data
#: sets held in memory) the row of the data set's own files.
KEY_COLUMNS = ("path", "text", "item")
NOISE_KEYS = ("rate", "kind", "seed")
#: What a ``flagged`` cell may hold (case and surrounding blanks ignored), and what it means.
FLAGGED_VALUES = {"true": True, "1": True, "false": False, "0": False}


def flip_labels(labels: np.ndarray, num_classes: int, rate: float, kind: str, seed: int) -> np.ndarray:
    """A copy of ``labels`` with exactly ``round(rate * n_c)`` labels of every class ``c`` made wrong.

    Args:
        labels: ``(n,)`` class indices in ``0..num_classes-1``.
        num_classes: Number of classes (at least 2).
        rate: Share of every class to flip, in ``[0, 1)``.
        kind: ``"symmetric"`` (each flipped label becomes a uniformly drawn *other* class) or
            ``"pairs"`` (class ``c`` always becomes ``(c + 1) % num_classes``).
        seed: Seed of which examples flip and, for ``symmetric``, to what.

    Raises:
        ValueError: On a rate outside ``[0, 1)``, an unknown kind or fewer than 2 classes.

    Example::

        noisy = flip_labels(np.array([0, 0, 1, 1]), 2, rate=0.5, kind="pairs", seed=0)  # one of each flips
    """
    check_noise(rate, kind)
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        chosen = rng.choice(members, int(round(rate * len(members))), replace=False)
        if kind == "pairs":
            noisy[chosen] = (cls + 1) % num_classes
        else:
            noisy[chosen] = (cls + rng.integers(1, num_classes, len(chosen))) % num_classes
    return noisy


def check_noise(rate: float, kind: str) -> None:
    """Stop on a ``data.label_noise`` rate outside ``[0, 1)`` or a kind not in :data:`NOISE_KINDS`."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"data.label_noise.rate must be a number in [0, 1), got {rate!r}")
    if kind not in NOISE_KINDS:
        raise ValueError(f"data.label_noise.kind must be one of {list(NOISE_KINDS)}, got {kind!r}")


@dataclass(frozen=True)
class TrainingRows:
    """How the rows of a training split are named, for ``label_issues.csv``.

    Attributes:
        column: One of :data:`KEY_COLUMNS`: ``path`` (image files), ``text`` or ``item`` (the row of
            the data set's own files, for data held in memory).
        keys: One name per training example, in the split's order.
    """

    column: str
    keys: list[str]

    def __post_init__(self) -> None:
        if self.column not in KEY_COLUMNS:
            raise ValueError(f"column must be one of {list(KEY_COLUMNS)}, got {self.column!r}")


@dataclass(frozen=True)
class CuratedTraining:
    """The training split after :meth:`TrainingCuration.apply`.

    Attributes:
        keep: Positions into the split as it was given, of the rows kept (sorted).
        labels: The labels to train on, one per kept row (noisy when noise was planted).
        true_labels: The labels the data set holds, one per kept row.
        rows: The names of the kept rows.
        summary: What was done, for ``metrics.json``: ``excluded``, ``exclude_file``, ``exclude_sha256``
            (the file's digest), ``exclude_top``, ``label_noise`` (``rate``, ``kind``, ``seed``, ``flipped``).
    """

    keep: np.ndarray
    labels: np.ndarray
    true_labels: np.ndarray
    rows: TrainingRows
    summary: dict = field(default_factory=dict)


class TrainingCuration:
    """``data.exclude`` / ``data.exclude_top`` / ``data.label_noise``, checked when the data module is built.

    Args:
        exclude: A ``label_issues.csv`` written by ``scripts/label_issues.py`` for this training split;
            its ``flagged`` rows are dropped. ``None``: nothing is dropped.
        exclude_top: Drop the ``N`` rows of ``exclude`` with the highest ``score`` instead of the flagged
            ones (needs ``exclude``).
        label_noise: ``{rate, kind, seed}`` of planted noise (see :func:`flip_labels`); ``None`` or
            ``rate: 0`` plants none.

    The file itself is read in :meth:`apply` (the data module's ``setup()``, before training), so a
    data module rebuilt from a finished run's config (``predict.py`` on a text model) does not need it.

    Raises:
        ValueError: On ``exclude_top`` without ``exclude`` or not a positive integer, or a bad
            ``label_noise`` (unknown key, rate, kind), naming the key and the allowed values.

    Example::

        curation = TrainingCuration(label_noise={"rate": 0.2, "kind": "pairs", "seed": 0})
        curated = curation.apply(TrainingRows("item", ["0", "1"]), np.array([0, 1]), ["a", "b"])
    """

    def __init__(
        self,
        exclude: str | None = None,
        exclude_top: int | None = None,
        label_noise: Mapping | None = None,
    ) -> None:
        if exclude_top is not None:
            if isinstance(exclude_top, bool) or not isinstance(exclude_top, int) or exclude_top < 1:
                raise ValueError(f"data.exclude_top must be an integer >= 1 or null, got {exclude_top!r}")
            if exclude is None:
                raise ValueError(
                    "data.exclude_top ranks the rows of a label_issues.csv by score: "
                    "set data.exclude=<it> too"
                )
        noise = dict(label_noise or {})
        unknown = sorted(set(noise) - set(NOISE_KEYS))
        if unknown:
            raise ValueError(f"data.label_noise has unknown keys {unknown}; allowed: {list(NOISE_KEYS)}")
        self.rate = noise.get("rate") or 0.0
        self.kind = noise.get("kind") or "symmetric"
        self.seed = int(noise.get("seed") or 0)
        check_noise(self.rate, self.kind)
        self.exclude = None if exclude is None else str(exclude)
        self.exclude_top = exclude_top

    @property
    def active(self) -> bool:
        """Whether anything is done to the training split."""
        return self.exclude is not None or self.rate > 0

    def apply(
        self, rows: TrainingRows, labels: Sequence[int], class_names: Sequence[str], data: str = "the data"
    ) -> CuratedTraining:
        """Plant the noise, then drop the excluded rows.

        Args:
            rows: Names of the training rows, in the split's order.
            labels: The data set's labels of those rows.
            class_names: Class names, indexed by label (``label_issues.csv`` holds names).
            data: How to name the data in messages (e.g. ``"DigitsDataModule"`` or its root).

        Raises:
            FileNotFoundError: If ``data.exclude`` is not a file, naming the key.
            ValueError: If ``data.exclude`` does not describe this training split, naming the file,
                the data and the first difference, or if it drops every training example of a class.
        """
        true = np.asarray(labels, dtype=np.int64)
        given = true
        summary: dict = {}
        if self.rate > 0:
            given = flip_labels(true, len(class_names), self.rate, self.kind, self.seed)
            summary["label_noise"] = {
                "rate": self.rate,
                "kind": self.kind,
                "seed": self.seed,
                "flipped": int((given != true).sum()),
            }
        keep = np.arange(len(true))
        if self.exclude is not None:
            if not Path(self.exclude).is_file():
                raise FileNotFoundError(f"data.exclude={self.exclude!r} is not a file (a label_issues.csv)")
            drop = excluded_rows(self.exclude, rows, [class_names[y] for y in given], self.exclude_top, data)
            keep = np.flatnonzero(~drop)
            self._check_classes_kept(given, drop, class_names)
            summary |= {
                "excluded": int(drop.sum()),
                "exclude_file": self.exclude,
                "exclude_sha256": file_sha256(self.exclude),
                "exclude_top": self.exclude_top,
            }
        kept_rows = TrainingRows(rows.column, [rows.keys[i] for i in keep])
        return CuratedTraining(keep, given[keep], true[keep], kept_rows, summary)

    def _check_classes_kept(self, given: np.ndarray, drop: np.ndarray, class_names: Sequence[str]) -> None:
        """Stop if the exclusion leaves a class with no training example, naming the key and the file."""
        for cls, name in enumerate(class_names):
            members = given == cls
            if members.any() and drop[members].all():
                key = f"data.exclude_top={self.exclude_top} of " if self.exclude_top else "data.exclude="
                raise ValueError(
                    f"{key}{self.exclude!r} drops all {int(members.sum())} training examples of class "
                    f"{name!r}: unflag some of them or lower data.exclude_top"
                )


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (recorded so that a run names exactly which exclusion it used)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def excluded_rows(
    path: str | Path, rows: TrainingRows, given: Sequence[str], top: int | None = None, data: str = "the data"
) -> np.ndarray:
    """Boolean mask of the training rows ``path`` (a ``label_issues.csv``) excludes.

    Args:
        path: The file: one row per training example with ``index``, the key column of ``rows``,
            ``given``, ``score`` and ``flagged``.
        rows: Names of the training rows.
        given: The given label (class name) of every training row.
        top: Exclude the ``top`` rows with the highest ``score`` instead of the ``flagged`` ones; equal
            scores rank in the file's order (the file is written highest score first).
        data: How to name the data in messages.

    The file may carry a byte-order mark (a spreadsheet's "UTF-8 CSV"); a ``flagged`` cell holds one of
    :data:`FLAGGED_VALUES` (case and blanks ignored).

    Raises:
        ValueError: If the file lacks a column, has another number of rows, names another example or
            label at some index, or holds a ``flagged`` cell outside :data:`FLAGGED_VALUES`; the message
            names the file, the data (or row) and the difference.
    """
    with open(path, newline="", encoding="utf-8-sig") as handle:
        table = list(csv.DictReader(handle))
    where = f"data.exclude={str(path)!r} does not match the training split of {data}"
    needed = ("index", rows.column, "given", "score", "flagged")
    columns = list(table[0]) if table else []
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{where}: the file lacks the columns {missing} (it has {columns})")
    if len(table) != len(rows.keys):
        raise ValueError(
            f"{where}: the file has {len(table)} rows, the training split {len(rows.keys)} examples"
        )
    drop = np.zeros(len(rows.keys), dtype=bool)
    scores = np.full(len(rows.keys), -math.inf)
    file_order = np.zeros(len(rows.keys), dtype=np.int64)
    for position, line in enumerate(table):
        index = int(line["index"])
        if not 0 <= index < len(rows.keys) or scores[index] != -math.inf:
            raise ValueError(f"{where}: index {index} is outside 0..{len(rows.keys) - 1} or repeated")
        if line[rows.column] != rows.keys[index]:
            raise ValueError(
                f"{where}: at index {index} the file has {rows.column} {line[rows.column]!r}, "
                f"the data {rows.keys[index]!r}"
            )
        if line["given"] != given[index]:
            raise ValueError(
                f"{where}: at index {index} the file has given label {line['given']!r}, the data "
                f"{given[index]!r} (same data.label_noise and data.train_per_class as the scored run?)"
            )
        scores[index] = float(line["score"])
        file_order[index] = position
        mark = (line["flagged"] or "").strip().lower()
        if mark not in FLAGGED_VALUES:
            raise ValueError(
                f"data.exclude={str(path)!r}: row index {index} has flagged={line['flagged']!r}; "
                f"allowed (any case): {list(FLAGGED_VALUES)}"
            )
        drop[index] = FLAGGED_VALUES[mark]
    if top is not None:
        drop[:] = False
        drop[np.lexsort((file_order, -scores))[:top]] = True
    return drop
