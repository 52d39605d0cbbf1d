"""torchvision's downloadable datasets (CIFAR-10 and friends) by name."""

from __future__ import annotations

import numpy as np
import torchvision
from sklearn.model_selection import train_test_split

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import ClassificationDataModule, check_split, subset, take_per_class
from tl_lightning.data.transforms import image_transform

SUPPORTED = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST", "SVHN", "STL10")


class TorchvisionDataModule(ClassificationDataModule):
    """A torchvision dataset with a ``train``/``test`` split; validation is carved from train.

    Args:
        name: One of :data:`SUPPORTED`.
        data_config: The backbone's preprocessing.
        root: Download/cache directory.
        download: Download when missing (needs internet).
        batch_size: Samples per batch.
        image_size: Side length; ``None`` uses the backbone's input size.
        train_per_class: Training examples kept per class; ``None`` or ``"all"`` keeps all.
        val_fraction: Share of the official training split used for validation.
        split_seed: Seed of the validation split and the ``train_per_class`` draw.
        augment: Random resized crop and flip on training images.
        shuffle_seed: Seed of the per-epoch training order (resume-exact shuffling).
        num_workers: ``DataLoader`` workers.

    Raises:
        ValueError: If ``name`` is not supported, listing the choices.

    Example::

        data = TorchvisionDataModule("CIFAR10", efficientnet_lite0().data_config, root="data")
    """

    def __init__(
        self,
        name: str,
        data_config: DataConfig | dict,
        root: str = "data",
        download: bool = True,
        batch_size: int = 64,
        image_size: int | None = None,
        train_per_class: int | str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
        num_workers: int = 4,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__(data_config, batch_size, num_workers, augment, shuffle_seed)
        if name not in SUPPORTED:
            raise ValueError(f"data.name={name!r} is not supported; choices: {list(SUPPORTED)}")
        self.name, self.root, self.download = name, root, download
        self.image_size = image_size
        self.train_per_class = train_per_class
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def _dataset(self, train: bool, augment_split: bool):
        cls = getattr(torchvision.datasets, self.name)
        transform = image_transform(self.data_config, augment_split, self.augment, self.image_size)
        split = (
            {"split": "train" if train else "test"} if self.name in ("SVHN", "STL10") else {"train": train}
        )
        return cls(self.root, download=self.download, transform=transform, **split)

    def prepare_data(self) -> None:
        self._dataset(train=True, augment_split=False)
        self._dataset(train=False, augment_split=False)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, train_eval = self._dataset(True, True), self._dataset(True, False)
        test = self._dataset(False, False)
        labels = np.asarray(getattr(train, "targets", getattr(train, "labels", None)))
        self.class_names = [str(c) for c in getattr(train, "classes", np.unique(labels))]
        idx = np.arange(len(labels))
        train_idx, val_idx = train_test_split(
            idx, test_size=self.val_fraction, stratify=labels, random_state=self.split_seed
        )
        train_idx = train_idx[take_per_class(labels[train_idx], self.train_per_class, self.split_seed)]
        check_split(labels[train_idx], len(self.class_names), "train")
        check_split(labels[val_idx], len(self.class_names), "val")
        self.train_set = subset(train, train_idx)
        self.val_set = subset(train_eval, val_idx)
        self.test_set = test
