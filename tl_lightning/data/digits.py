"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans): the offline default data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import InterpolationMode, v2

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import ClassificationDataModule, as_data_config, check_split, take_per_class


class _AugmentedImages(Dataset):
    """Images in ``[0, 1]`` with a random affine jitter, normalised per sample."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.jitter = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.jitter(self.images[index]) - self.mean) / self.std, self.labels[index]


class DigitsDataModule(ClassificationDataModule):
    """Digits upsampled to ``image_size`` and normalised with the backbone's statistics.

    The split is stratified and fixed by ``split_seed`` (60/20/20 by default), so every strategy
    sees the same validation and test images; ``train_per_class`` then draws a low-data subset of
    the training split.

    Args:
        data_config: The backbone's preprocessing; mean, std and interpolation are used.
        batch_size: Samples per batch.
        image_size: Side length to upsample to; ``None`` uses the backbone's input size.
        train_per_class: Training examples kept per class; ``None`` or ``"all"`` keeps all.
        classes: Digits to keep (relabelled ``0..k-1`` in the given order); ``None`` keeps 0-9.
        probe_classes: Digits of an earlier (source) task: their held-out test images, labelled
            ``0..m-1`` in the given order, form ``probe_set`` for measuring forgetting.
        val_fraction: Share of all images held out for validation.
        test_fraction: Share of all images held out for testing.
        split_seed: Seed of the train/val/test split (fixed, so every run is scored on the same images).
        subset_seed: Seed of the ``train_per_class`` draw; ``None`` uses ``split_seed``. The configs
            pass the run's ``seed``, so seeds differ in which few examples they see.
        augment: Random affine jitter on training images.
        shuffle_seed: Seed of the per-epoch training order (resume-exact shuffling).
        num_workers: ``DataLoader`` workers (0 is fastest for in-memory tensors).

    Raises:
        ValueError: On fractions that leave no training data, unknown digits in ``classes``, or a
            ``train_per_class`` larger than a class has.

    Example::

        data = DigitsDataModule(efficientnet_lite0().data_config, image_size=64, train_per_class=20)
    """

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
    ) -> None:
        super().__init__(data_config, batch_size, num_workers, augment, shuffle_seed)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"data.val_fraction and data.test_fraction must be in (0, 1) and sum below 1, "
                f"got {val_fraction}, {test_fraction}"
            )
        self.classes = list(range(10)) if classes is None else [int(c) for c in classes]
        unknown = sorted(set(self.classes) - set(range(10)))
        if unknown or len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError(f"data.classes must be >= 2 distinct digits from 0-9, got {list(classes)}")
        self.probe_classes = None if probe_classes is None else [int(c) for c in probe_classes]
        if self.probe_classes is not None and (
            set(self.probe_classes) & set(self.classes) or not set(self.probe_classes) <= set(range(10))
        ):
            raise ValueError(
                f"data.probe_classes must be digits not in data.classes, got {list(probe_classes)}"
            )
        self.image_size = image_size or self.data_config.input_size[-1]
        self.train_per_class = train_per_class
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.subset_seed = split_seed if subset_seed is None else subset_seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        if self.probe_classes is not None:
            images, labels, _, _, test_idx = self._split(digits, self.probe_classes)
            self.probe_set = self._dataset(images[test_idx], torch.as_tensor(labels[test_idx]), augment=False)
        images, labels, train_idx, val_idx, test_idx = self._split(digits, self.classes)
        train_idx = train_idx[take_per_class(labels[train_idx], self.train_per_class, self.subset_seed)]
        self.class_names = [str(d) for d in self.classes]
        for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
            check_split(labels[idx], self.class_names, split)
        targets = torch.as_tensor(labels)
        self.train_set = self._dataset(images[train_idx], targets[train_idx], self.augment)
        self.val_set = self._dataset(images[val_idx], targets[val_idx], augment=False)
        self.test_set = self._dataset(images[test_idx], targets[test_idx], augment=False)

    def _split(self, digits, classes: list[int]):
        """Resized images, labels ``0..k-1`` and stratified train/val/test indices of ``classes``.

        The split of a digit depends only on ``split_seed`` and the set of digits, so the probe
        set of a target run is exactly the test split of the source run with those digits.
        """
        keep = np.isin(digits.target, classes)
        relabel = {digit: index for index, digit in enumerate(classes)}
        labels = np.array([relabel[d] for d in digits.target[keep]])
        images = self._resize(torch.tensor(digits.images[keep], dtype=torch.float32) / 16.0)
        indices = np.arange(len(labels))
        train_idx, holdout_idx = train_test_split(
            indices,
            test_size=self.val_fraction + self.test_fraction,
            stratify=labels,
            random_state=self.split_seed,
        )
        val_idx, test_idx = train_test_split(
            holdout_idx,
            test_size=self.test_fraction / (self.val_fraction + self.test_fraction),
            stratify=labels[holdout_idx],
            random_state=self.split_seed,
        )
        return images, labels, train_idx, val_idx, test_idx

    @classmethod
    def eval_transform(cls, data_config: DataConfig | dict, image_size: int | None = None) -> v2.Compose:
        """A new scan (PIL, bright ink on dark like the originals) -> input, as the splits are made.

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

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 8, 8)`` in ``[0, 1]`` -> ``(N, 3, S, S)`` in ``[0, 1]`` with the backbone's interpolation."""
        mode = self.data_config.interpolation
        size = (self.image_size, self.image_size)
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        resized = F.interpolate(images[:, None], size=size, mode=mode, **kwargs).clamp_(0.0, 1.0)
        return resized.expand(-1, 3, -1, -1).contiguous()

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> Dataset:
        mean = torch.tensor(self.data_config.mean).view(3, 1, 1)
        std = torch.tensor(self.data_config.std).view(3, 1, 1)
        if augment:
            return _AugmentedImages(images, labels, mean, std)
        return TensorDataset((images - mean) / std, labels)
