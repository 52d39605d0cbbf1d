"""A directory of class sub-folders: the user's own images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from torchvision.datasets import ImageFolder

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import ClassificationDataModule, check_split, subset, take_per_class
from tl_lightning.data.transforms import image_transform

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False


class ImageFolderDataModule(ClassificationDataModule):
    """Images in ``root/<class>/*.jpg``, or in ``root/{train,val,test}/<class>/*``.

    With split sub-folders they are used as given; otherwise one folder is split (stratified,
    fixed ``split_seed``) into train/val/test. Every file is checked in ``setup()`` so a corrupt
    image stops the run before training, naming the file, unless ``skip_corrupt`` is set, in which
    case it is dropped and the count is logged.

    Args:
        root: Directory of class sub-folders (or of ``train``/``val``/``test`` folders of them).
        data_config: The backbone's preprocessing.
        batch_size: Samples per batch.
        image_size: Side length; ``None`` uses the backbone's input size.
        train_per_class: Training examples kept per class; ``None`` or ``"all"`` keeps all.
        val_fraction: Share held out for validation when ``root`` has no split folders.
        test_fraction: Share held out for testing when ``root`` has no split folders.
        split_seed: Seed of the split and of the ``train_per_class`` draw.
        augment: Random resized crop and flip on training images.
        skip_corrupt: Drop unreadable images instead of stopping.
        shuffle_seed: Seed of the per-epoch training order (resume-exact shuffling).
        num_workers: ``DataLoader`` workers.

    Raises:
        FileNotFoundError: If ``root`` does not exist, naming ``data.root``.
        ValueError: On an empty split, a class missing from a split, or a corrupt image.

    Example::

        data = ImageFolderDataModule("~/datasets/flowers", efficientnet_lite0().data_config)
    """

    def __init__(
        self,
        root: str,
        data_config: DataConfig | dict,
        batch_size: int = 32,
        image_size: int | None = None,
        train_per_class: int | str | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        augment: bool = True,
        skip_corrupt: bool = False,
        num_workers: int = 2,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__(data_config, batch_size, num_workers, augment, shuffle_seed)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(self.root)!r} is not a directory")
        self.image_size = image_size
        self.train_per_class = train_per_class
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.skip_corrupt = skip_corrupt

    def _folder(self, path: Path, train: bool) -> ImageFolder:
        transform = image_transform(self.data_config, train, self.augment, self.image_size)
        try:
            folder = ImageFolder(str(path), transform=transform)
        except FileNotFoundError as error:
            raise ValueError(f"{path}: {error}") from error
        bad = [p for p, _ in folder.samples if not _readable(p)]
        if bad and not self.skip_corrupt:
            raise ValueError(
                f"corrupt or unreadable image {bad[0]!r} ({len(bad)} in {path}); "
                "fix or remove it, or set data.skip_corrupt=true"
            )
        if bad:
            log.warning("skipped %d corrupt images in %s (first: %s)", len(bad), path, bad[0])
            keep = [s for s in folder.samples if s[0] not in set(bad)]
            folder.samples = folder.imgs = keep
            folder.targets = [t for _, t in keep]
        return folder

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if all((self.root / split).is_dir() for split in SPLITS):
            train, val, test = (self._folder(self.root / s, train=s == "train") for s in SPLITS)
            if not (train.classes == val.classes == test.classes):
                raise ValueError(f"class folders differ between splits under {self.root}")
            train_idx, val_idx, test_idx = (np.arange(len(f)) for f in (train, val, test))
        else:
            train, val = self._folder(self.root, train=True), self._folder(self.root, train=False)
            test = val
            train_idx, val_idx, test_idx = self._split(np.array(train.targets))
        targets = np.array(train.targets)
        train_idx = train_idx[take_per_class(targets[train_idx], self.train_per_class, self.split_seed)]
        self.class_names = list(train.classes)
        for name, folder, idx in (
            ("train", train, train_idx),
            ("val", val, val_idx),
            ("test", test, test_idx),
        ):
            check_split(np.array(folder.targets)[idx] if len(idx) else [], len(self.class_names), name)
        self.train_set = subset(train, train_idx)
        self.val_set = subset(val, val_idx)
        self.test_set = subset(test, test_idx)

    def _split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(labels) == 0:
            raise ValueError(f"no images under data.root={str(self.root)!r}")
        indices = np.arange(len(labels))
        holdout = self.val_fraction + self.test_fraction
        train_idx, rest = train_test_split(
            indices, test_size=holdout, stratify=labels, random_state=self.split_seed
        )
        val_idx, test_idx = train_test_split(
            rest, test_size=self.test_fraction / holdout, stratify=labels[rest], random_state=self.split_seed
        )
        return train_idx, val_idx, test_idx
