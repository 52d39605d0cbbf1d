"""Small grayscale images held in memory (digit scans, MNIST, Fashion-MNIST): one data module base.

Images stay at their native size as integers; each sample is scaled to ``[0, 1]``, upsampled with
the backbone's interpolation, copied to 3 channels and normalised with the backbone's statistics
when it is read, so a 70,000-image set costs its raw bytes, not ``70,000 x 3 x S x S`` floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import (
    ClassificationDataModule,
    as_data_config,
    check_split,
    stratified_split,
    take_per_class,
)
from tl_lightning.data.curation import TrainingRows


@dataclass(frozen=True)
class GrayscaleArrays:
    """A whole grayscale dataset as loaded from disk.

    Args:
        images: ``(N, H, W)`` integer grey levels, ``0`` = background.
        labels: ``(N,)`` class indices into ``class_names``.
        class_names: Name of every class of the dataset.
        full_scale: Grey level that maps to ``1.0`` (255 for 8-bit images, 16 for the digit scans).
        is_test: ``(N,)`` mask of the dataset's official test split, or ``None`` when it has none.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    full_scale: float
    is_test: np.ndarray | None = None


class GrayscaleImages(Dataset):
    """``(normalised (3, S, S) image, label)`` from native-size grey levels, resized on read.

    Args:
        images: ``(N, H, W)`` grey levels.
        labels: ``(N,)`` integer labels.
        full_scale: Grey level that maps to ``1.0``.
        size: Output side length.
        interpolation: ``torch.nn.functional.interpolate`` mode.
        mean: Per-channel mean (3 values).
        std: Per-channel standard deviation (3 values).
        augment: Random affine jitter before normalising (drawn from torch's RNG).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        full_scale: float,
        size: int,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ) -> None:
        self.images, self.labels, self.full_scale = images, labels, full_scale
        self.size, self.interpolation = size, interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.jitter = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = upsample(
            self.images[index : index + 1].float() / self.full_scale, self.size, self.interpolation
        )
        image = image[0].expand(3, -1, -1)
        if self.jitter is not None:
            image = self.jitter(image)
        return (image - self.mean) / self.std, self.labels[index]


def upsample(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """``(N, H, W)`` in ``[0, 1]`` -> ``(N, 1, size, size)`` in ``[0, 1]`` with interpolation ``mode``."""
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(images[:, None], size=(size, size), mode=mode, **kwargs).clamp_(0.0, 1.0)


class GrayscaleDataModule(ClassificationDataModule):
    """Base of the in-memory grayscale datasets; subclasses implement :meth:`load_arrays`.

    Splits are stratified and fixed by ``split_seed``, so every strategy sees the same validation
    and test images; ``train_per_class`` then draws a low-data subset of the training split with
    ``subset_seed``. A dataset without an official test split is divided by ``val_fraction`` and
    ``test_fraction``; one with it (:attr:`GrayscaleArrays.is_test`) keeps it as the test split
    and carves validation from its training split (see :meth:`split`).

    Args:
        data_config: The backbone's preprocessing; mean, std, input size and interpolation are used.
        batch_size: Samples per batch.
        image_size: Side length to upsample to; ``None`` uses the backbone's input size.
        train_per_class: Training examples kept per class; ``None`` or ``"all"`` keeps all.
        classes: Class indices to keep (relabelled ``0..k-1`` in the given order); ``None`` keeps all.
        probe_classes: Class indices of an earlier (source) task: their test images, labelled
            ``0..m-1`` in the given order, form ``probe_set`` for measuring forgetting.
        val_fraction: Share of all images held out for validation.
        test_fraction: Share of all images held out for testing.
        split_seed: Seed of the train/val/test split.
        subset_seed: Seed of the ``train_per_class`` draw; ``None`` uses ``split_seed``.
        augment: Random affine jitter on training images.
        num_workers: ``DataLoader`` workers (0 is fastest for in-memory tensors).
        shuffle_seed: Seed of the per-epoch training order (resume-exact shuffling).
        exclude: A ``label_issues.csv`` of this training split (rows named by ``item``, the row of
            the loaded data set); its flagged rows are dropped.
        exclude_top: Drop the ``N`` highest-scored rows of ``exclude`` instead.
        label_noise: ``{rate, kind, seed}`` of label noise planted in the training split.

    Raises:
        ValueError: On fractions that leave no training data, unknown classes in ``classes`` or
            ``probe_classes``, or a ``train_per_class`` larger than a class has.
    """

    #: Number of classes of the whole dataset (before ``classes`` selects some).
    num_dataset_classes: int = 10

    def __init__(
        self,
        data_config: DataConfig | dict,
        batch_size: int = 64,
        image_size: int | None = None,
        train_per_class: int | str | None = None,
        classes: Sequence[int] | None = None,
        probe_classes: Sequence[int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        subset_seed: int | None = None,
        augment: bool = False,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        exclude: str | None = None,
        exclude_top: int | None = None,
        label_noise: dict | None = None,
    ) -> None:
        super().__init__(
            data_config,
            batch_size,
            num_workers,
            augment,
            shuffle_seed,
            exclude=exclude,
            exclude_top=exclude_top,
            label_noise=label_noise,
        )
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"data.val_fraction and data.test_fraction must be in (0, 1) and sum below 1, "
                f"got {val_fraction}, {test_fraction}"
            )
        known = range(self.num_dataset_classes)
        self.classes = list(known) if classes is None else [int(c) for c in classes]
        if (
            not set(self.classes) <= set(known)
            or len(set(self.classes)) != len(self.classes)
            or len(self.classes) < 2
        ):
            raise ValueError(
                f"data.classes must be >= 2 distinct class indices from 0-{len(known) - 1}, "
                f"got {list(classes)}"
            )
        self.probe_classes = None if probe_classes is None else [int(c) for c in probe_classes]
        if self.probe_classes is not None and (
            set(self.probe_classes) & set(self.classes) or not set(self.probe_classes) <= set(known)
        ):
            raise ValueError(
                f"data.probe_classes must be class indices from 0-{len(known) - 1} not in data.classes, "
                f"got {list(probe_classes)}"
            )
        self.image_size = image_size or self.data_config.input_size[-1]
        self.train_per_class = train_per_class
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.subset_seed = split_seed if subset_seed is None else subset_seed

    def load_arrays(self) -> GrayscaleArrays:
        """Read the whole dataset (called once, in :meth:`setup`)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        arrays = self.load_arrays()
        if self.probe_classes is not None:
            labels, _, _, test_idx = self._select(arrays, self.probe_classes)
            self.probe_set = self._dataset(arrays, test_idx, labels, augment=False)
        labels, train_idx, val_idx, test_idx = self._select(arrays, self.classes)
        local = take_per_class(labels[train_idx], self.train_per_class, self.subset_seed)
        train_idx = train_idx[local]
        self.class_names = [arrays.class_names[c] for c in self.classes]
        curated = self.curate_training(TrainingRows("item", [str(i) for i in train_idx]), labels[train_idx])
        train_idx, given = train_idx[curated.keep], labels.copy()
        given[train_idx] = curated.labels
        for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
            check_split(given[idx], self.class_names, split)
        self.train_set = self._dataset(arrays, train_idx, given, self.augment)
        self.val_set = self._dataset(arrays, val_idx, labels, augment=False)
        self.test_set = self._dataset(arrays, test_idx, labels, augment=False)

    def _select(self, arrays: GrayscaleArrays, classes: list[int]):
        """Labels ``0..k-1`` of all images (``-1`` outside ``classes``) and the split indices of ``classes``.

        The split of a class depends only on ``split_seed`` and the set of classes, so the probe
        set of a target run is exactly the test split of the source run with those classes.
        """
        relabel = np.full(self.num_dataset_classes, -1)
        relabel[classes] = np.arange(len(classes))
        labels = relabel[arrays.labels]
        keep = np.flatnonzero(labels >= 0)
        is_test = None if arrays.is_test is None else arrays.is_test[keep]
        train_idx, val_idx, test_idx = self.split(labels[keep], is_test)
        return labels, keep[train_idx], keep[val_idx], keep[test_idx]

    def split(self, labels: np.ndarray, is_test: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """Stratified train/val/test positions into ``labels`` by ``val_fraction``/``test_fraction``.

        With an official test split, it is the test split and validation takes ``val_fraction``
        of the official training images.
        """
        indices = np.arange(len(labels))
        if is_test is not None:
            pool, test_idx = indices[~is_test], indices[is_test]
            train_idx, val_idx = train_test_split(
                pool, test_size=self.val_fraction, stratify=labels[pool], random_state=self.split_seed
            )
            return train_idx, val_idx, test_idx
        return stratified_split(labels, self.val_fraction, self.test_fraction, self.split_seed)

    def _dataset(
        self, arrays: GrayscaleArrays, idx: np.ndarray, labels: np.ndarray, augment: bool
    ) -> GrayscaleImages:
        return GrayscaleImages(
            torch.as_tensor(arrays.images[idx]),
            torch.as_tensor(labels[idx]),
            arrays.full_scale,
            self.image_size,
            self.data_config.interpolation,
            self.data_config.mean,
            self.data_config.std,
            augment,
        )

    @classmethod
    def eval_transform(cls, data_config: DataConfig | dict, image_size: int | None = None) -> v2.Compose:
        """A new image (PIL, bright foreground on dark like the originals) -> input, as the splits are made.

        Grey levels in ``[0, 1]``, the whole image upsampled (no crop) with the backbone's interpolation
        and clamped, copied to 3 channels, normalised.
        """
        config = as_data_config(data_config)
        size = image_size or config.input_size[-1]
        interpolation = InterpolationMode(config.interpolation)
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Grayscale(1),
                v2.ToDtype(torch.float32, scale=True),
                v2.Resize((size, size), interpolation=interpolation, antialias=False),
                v2.Lambda(lambda image: image.clamp(0.0, 1.0).expand(3, -1, -1)),
                v2.Normalize(list(config.mean), list(config.std)),
            ]
        )
