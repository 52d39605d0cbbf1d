"""Shared plumbing of the classification data modules: splits, checks, loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from tl_lightning.backbones import DataConfig, TextConfig
from tl_lightning.data.curation import CuratedTraining, TrainingCuration, TrainingRows
from tl_lightning.data.transforms import image_transform


def as_data_config(data_config: DataConfig | TextConfig | dict) -> DataConfig | TextConfig:
    """Accept the backbone's ``DataConfig`` or ``TextConfig``, or a plain mapping of the same fields."""
    if isinstance(data_config, (DataConfig, TextConfig)):
        return data_config
    fields = dict(data_config)
    if "tokenizer" in fields:
        return TextConfig(**fields)
    fields["input_size"] = tuple(fields["input_size"])
    fields["mean"], fields["std"] = tuple(fields["mean"]), tuple(fields["std"])
    return DataConfig(**fields)


def check_split(labels: Sequence[int], class_names: Sequence[str], split: str) -> None:
    """Stop before training on an empty split or one missing a class.

    Raises:
        ValueError: Naming the split and the missing classes by name.
    """
    if len(labels) == 0:
        raise ValueError(f"the {split} split is empty")
    missing = sorted(set(range(len(class_names))) - set(int(y) for y in labels))
    if missing:
        names = [class_names[i] for i in missing]
        raise ValueError(f"the {split} split has no example of class {', '.join(map(repr, names))}")


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test indices of ``labels``, the same for the same ``seed``.

    Raises:
        ValueError: From scikit-learn, when a class has too few samples to be split.
    """
    indices = np.arange(len(labels))
    held = val_fraction + test_fraction
    train_idx, holdout_idx = train_test_split(indices, test_size=held, stratify=labels, random_state=seed)
    val_idx, test_idx = train_test_split(
        holdout_idx, test_size=test_fraction / held, stratify=labels[holdout_idx], random_state=seed
    )
    return train_idx, val_idx, test_idx


def take_per_class(
    labels: np.ndarray, per_class: int | str | None, seed: int, key: str = "train_per_class"
) -> np.ndarray:
    """Indices of ``per_class`` examples of every class (all when ``None`` or ``"all"``), drawn with ``seed``.

    Raises:
        ValueError: If ``per_class`` is not a positive integer, ``"all"`` or ``None``, or is larger
            than what a class has, naming ``data.<key>``.
    """
    if per_class is None or per_class == "all":
        return np.arange(len(labels))
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"data.{key} must be an integer >= 1, 'all' or null, got {per_class!r}")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        pool = np.flatnonzero(labels == cls)
        if per_class > len(pool):
            raise ValueError(
                f"data.{key}={per_class} but class {cls} has only {len(pool)} examples to draw from"
            )
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed determined by ``(seed, epoch, index)`` alone (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(1, np.uint64)[0])


class EpochShuffleSampler(Sampler):
    """A new permutation every epoch, drawn from ``seed`` and the epoch number alone.

    Lightning calls ``set_epoch`` before every training epoch, so a run resumed from a checkpoint
    visits the samples in the same order as a run that never stopped (a ``RandomSampler`` draws from
    the global RNG, whose state a checkpoint does not hold).

    Args:
        length: Number of samples.
        seed: Base seed; epoch ``e`` uses ``seed + e``.
        keyed: Yield ``(epoch, index)`` keys instead of indices, for :class:`EpochSeededDataset`
            (the sampler runs in the main process, so the key carries the epoch into every worker).
    """

    def __init__(self, length: int, seed: int, keyed: bool = False) -> None:
        self.length, self.seed, self.epoch, self.keyed = length, seed, 0, keyed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        return iter([(self.epoch, i) for i in order] if self.keyed else order)

    def __len__(self) -> int:
        return self.length


class EpochSeededDataset(Dataset):
    """Random augmentation that depends on ``(seed, epoch, index)`` only: resume-exact, worker-independent.

    ``dataset[index]`` runs with torch's global CPU generator seeded by :func:`sample_seed` (and
    restored afterwards, so the augmentation neither consumes nor depends on the training RNG).
    A resumed run therefore augments every sample exactly as the uninterrupted run did, whatever
    the number of workers or what was drawn before. Transforms must draw from torch's RNG
    (torchvision's ``v2`` transforms do).

    Args:
        dataset: Map-style dataset whose ``__getitem__`` draws random augmentation.
        seed: Base seed of the draws.

    Example::

        sampler = EpochShuffleSampler(len(train_set), seed=0, keyed=True)
        loader = DataLoader(EpochSeededDataset(train_set, seed=0), sampler=sampler)
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


class NamedClasses:
    """A data module whose ``setup()`` fills ``class_names``: ``num_classes`` counts them.

    Asking for ``num_classes`` before ``setup()`` runs ``setup("fit")`` first, so the pipeline can
    size heads from a data module it has only built.
    """

    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes, known after ``setup()``."""
        if not self.class_names:
            self.setup("fit")
        return len(self.class_names)


class ClassificationDataModule(NamedClasses, pl.LightningDataModule):
    """Base for image-classification data: subclasses fill ``train_set``/``val_set``/``test_set``.

    Args:
        data_config: The backbone's preprocessing (mean, std, input size, interpolation).
        batch_size: Samples per batch for every split.
        num_workers: ``DataLoader`` worker processes.
        augment: Random training augmentation; when ``False`` training transforms are
            deterministic (which feature caching relies on).
        shuffle_seed: Seed of the per-epoch training order (:class:`EpochShuffleSampler`) and of the
            augmentation draws (:class:`EpochSeededDataset`).
        exclude: A ``label_issues.csv`` of this training split whose flagged rows are dropped
            (:class:`~tl_lightning.data.curation.TrainingCuration`).
        exclude_top: Drop the ``N`` highest-scored rows of ``exclude`` instead of the flagged ones.
        label_noise: ``{rate, kind, seed}`` of label noise planted in the training split.

    Raises:
        ValueError: If ``batch_size`` < 1 or ``num_workers`` < 0, or on bad ``exclude_top`` / ``label_noise``.
    """

    def __init__(
        self,
        data_config: DataConfig | dict,
        batch_size: int,
        num_workers: int,
        augment: bool,
        shuffle_seed: int = 0,
        *,
        exclude: str | None = None,
        exclude_top: int | None = None,
        label_noise: dict | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"need data.batch_size >= 1 and data.num_workers >= 0, got {batch_size}, {num_workers}"
            )
        self.data_config = as_data_config(data_config)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.shuffle_seed = shuffle_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.probe_set: Dataset | None = None
        self.class_names: list[str] = []
        self.curation = TrainingCuration(exclude, exclude_top, label_noise)
        self.curated: CuratedTraining | None = None

    @classmethod
    def eval_transform(cls, data_config: DataConfig | dict, image_size: int | None = None) -> Callable:
        """How a new image (PIL) becomes a model input, as this data module prepares its evaluation images.

        ``predict.py`` calls it on the class a checkpoint's ``data._target_`` names, without building
        the data module (its data need not exist where the model is used).
        """
        return image_transform(as_data_config(data_config), train=False, augment=False, image_size=image_size)

    def curate_training(self, rows: TrainingRows, labels) -> CuratedTraining:
        """Apply ``exclude`` / ``exclude_top`` / ``label_noise`` to the training split (once, in ``setup()``).

        Subclasses call it with the names and labels of their training rows (after ``train_per_class``)
        and build the training set from the result, which is also kept as :attr:`curated`.
        """
        self.curated = self.curation.apply(rows, labels, self.class_names, type(self).__name__)
        return self.curated

    @property
    def deterministic_train(self) -> bool:
        """Whether a training sample always maps to the same tensor (no random augmentation)."""
        return not self.augment

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        """Training (``shuffle``) loaders order by :class:`EpochShuffleSampler` and, with ``augment``,
        draw augmentation per (seed, epoch, sample) through :class:`EpochSeededDataset`."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        keyed = shuffle and self.augment
        return DataLoader(
            EpochSeededDataset(dataset, self.shuffle_seed) if keyed else dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.shuffle_seed, keyed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def probe_dataloader(self) -> DataLoader:
        """Held-out images of the *source* task, for ``SourceRetention`` (fixed order).

        Raises:
            RuntimeError: If this data module was not configured with a probe set.
        """
        if self.probe_set is None:
            raise RuntimeError(f"{type(self).__name__} has no probe set (see its probe_classes argument)")
        return self._loader(self.probe_set, shuffle=False)


def subset(dataset: Dataset, indices: Sequence[int]) -> Subset:
    return Subset(dataset, [int(i) for i in indices])
