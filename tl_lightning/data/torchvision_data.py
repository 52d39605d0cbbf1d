"""torchvision's downloadable datasets (CIFAR-10 and friends) by name."""

from __future__ import annotations

import numpy as np
import torchvision
from sklearn.model_selection import train_test_split

from tl_lightning.backbones import DataConfig
from tl_lightning.backbones.hub import first_url, is_offline
from tl_lightning.data.base import ClassificationDataModule, check_split, subset, take_per_class
from tl_lightning.data.transforms import image_transform

SUPPORTED = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST", "SVHN", "STL10")


class TorchvisionDataModule(ClassificationDataModule):
    """A torchvision dataset with a ``train``/``test`` split; validation is carved from train.

    Args:
        name: One of :data:`SUPPORTED`.
        data_config: The backbone's preprocessing.
        root: Download/cache directory.
        download: Download in :meth:`prepare_data` when missing (needs internet; offline, it stops
            at once naming what to download).
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

    @property
    def _cls(self):
        return getattr(torchvision.datasets, self.name)

    def _dataset(self, train: bool, augment_split: bool, download: bool = False):
        cls = self._cls
        transform = image_transform(self.data_config, augment_split, self.augment, self.image_size)
        split = (
            {"split": "train" if train else "test"} if self.name in ("SVHN", "STL10") else {"train": train}
        )
        return cls(self.root, download=download, transform=transform, **split)

    def _present(self) -> bool:
        try:
            self._dataset(train=True, augment_split=False)
            self._dataset(train=False, augment_split=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            return False
        return True

    def prepare_data(self) -> None:
        """Download the dataset when it is missing (Lightning runs this on one process per node).

        Raises:
            RuntimeError: If the files are missing and ``download`` is off, or the machine is
                offline, naming ``data.root`` and where to get the files.
        """
        if self._present():
            return
        url = first_url([getattr(self._cls, a, None) for a in ("url", "mirrors", "split_list")]) or ""
        if not self.download or is_offline(url):
            reason = "data.download=false" if not self.download else "this machine is offline"
            raise RuntimeError(
                f"data.name={self.name} is not under data.root={self.root!r} and {reason}: download it "
                f"(from {url or 'its torchvision source'}) into that folder on a machine with internet, "
                "or use data=image_folder / data=digits"
            )
        self._dataset(train=True, augment_split=False, download=True)
        self._dataset(train=False, augment_split=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Read the downloaded files (never downloads: that is :meth:`prepare_data`'s job, once per node).

        Raises:
            RuntimeError: If the files are not under ``root``, asking for ``prepare_data()``.
        """
        if self.train_set is not None:
            return
        try:
            train, train_eval = self._dataset(True, True), self._dataset(True, False)
            test = self._dataset(False, False)
        except RuntimeError as error:
            raise RuntimeError(
                f"data.name={self.name} is not under data.root={self.root!r}; call prepare_data() "
                "first (Lightning's Trainer does) or put the files there"
            ) from error
        labels = np.asarray(getattr(train, "targets", getattr(train, "labels", None)))
        self.class_names = [str(c) for c in getattr(train, "classes", np.unique(labels))]
        idx = np.arange(len(labels))
        train_idx, val_idx = train_test_split(
            idx, test_size=self.val_fraction, stratify=labels, random_state=self.split_seed
        )
        train_idx = train_idx[take_per_class(labels[train_idx], self.train_per_class, self.split_seed)]
        check_split(labels[train_idx], self.class_names, "train")
        check_split(labels[val_idx], self.class_names, "val")
        self.train_set = subset(train, train_idx)
        self.val_set = subset(train_eval, val_idx)
        self.test_set = test
