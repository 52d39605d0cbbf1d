"""A directory of class sub-folders: the user's own images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import ClassificationDataModule, check_split, stratified_split, take_per_class
from tl_lightning.data.curation import TrainingRows
from tl_lightning.data.images import ImageFiles, check_disjoint, class_folders, find_images, inspect_images
from tl_lightning.data.transforms import image_transform

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class ImageFolderDataModule(ClassificationDataModule):
    """Images in ``root/<class>/*.jpg``, or in ``root/{train,val,test}/<class>/*``.

    With split sub-folders they are used as given; otherwise one folder is split (stratified,
    fixed ``split_seed``) into train/val/test. In ``setup()`` every file is decoded completely, so a
    corrupt, truncated or decompression-bomb image stops the run before training, naming the file,
    unless ``skip_corrupt`` is set, in which case it is dropped and the count is logged. 16-bit
    and float images are scaled to 8 bits, not clipped. Folder links are never followed and a real
    file is used once; the same file in two splits is an error, byte-identical copies across splits
    a warning with their count.

    Args:
        root: Directory of class sub-folders (or of ``train``/``val``/``test`` folders of them).
        data_config: The backbone's preprocessing.
        batch_size: Samples per batch.
        image_size: Side length; ``None`` uses the backbone's input size.
        train_per_class: Training examples kept per class; ``None`` or ``"all"`` keeps all.
        val_fraction: Share held out for validation when ``root`` has no split folders.
        test_fraction: Share held out for testing when ``root`` has no split folders.
        split_seed: Seed of the split and of the ``train_per_class`` draw.
        augment: Random resized crop and flip on training images, drawn per (seed, epoch, sample).
        skip_corrupt: Drop unreadable images instead of stopping.
        shuffle_seed: Seed of the per-epoch training order and of the augmentation draws.
        num_workers: ``DataLoader`` workers.
        exclude: A ``label_issues.csv`` of this training split (rows named by ``path``, relative to
            ``root``); its flagged rows are dropped.
        exclude_top: Drop the ``N`` highest-scored rows of ``exclude`` instead.
        label_noise: ``{rate, kind, seed}`` of label noise planted in the training split.

    Raises:
        FileNotFoundError: If ``root`` does not exist, naming ``data.root``.
        ValueError: On fewer than two classes, an empty split, a class missing from a split (named),
            a file in two classes or splits, or a corrupt image.

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
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={str(self.root)!r} is not a directory")
        self.image_size = image_size
        self.train_per_class = train_per_class
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.skip_corrupt = skip_corrupt
        self._digests: dict[str, str] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if all((self.root / split).is_dir() for split in SPLITS):
            self.class_names = self._classes_of_splits()
            samples = {s: self._samples(self.root / s) for s in SPLITS}
        else:
            self.class_names = self._checked_classes(self.root)
            samples = self._split(self._samples(self.root))
        check_disjoint(samples, self._digests)
        samples["train"] = self._take_per_class(samples["train"])
        train = samples["train"]
        # named relative to data.root, so that the same folder spelled another way (``./x``, an
        # absolute path, a trailing slash) or moved reads its own label_issues.csv
        names = [Path(path).relative_to(self.root).as_posix() for path, _ in train]
        curated = self.curate_training(TrainingRows("path", names), [y for _, y in train])
        kept = zip(curated.keep.tolist(), curated.labels.tolist(), strict=True)
        samples["train"] = [(train[i][0], label) for i, label in kept]
        for split in SPLITS:
            check_split([label for _, label in samples[split]], self.class_names, split)
        self.train_set, self.val_set, self.test_set = (
            ImageFiles(samples[s], self.class_names, self._transform(train=s == "train")) for s in SPLITS
        )

    def _transform(self, train: bool):
        return image_transform(self.data_config, train, self.augment, self.image_size)

    def _checked_classes(self, folder: Path) -> list[str]:
        classes = class_folders(folder)
        if len(classes) < 2:
            found = f"only {classes[0]!r}" if classes else "none"
            raise ValueError(
                f"data.root={str(self.root)!r}: classification needs at least 2 class folders in {folder}, "
                f"found {found}"
            )
        return classes

    def _classes_of_splits(self) -> list[str]:
        per_split = {s: class_folders(self.root / s) for s in SPLITS}
        classes = sorted(set().union(*per_split.values()))
        for split, names in per_split.items():
            missing = sorted(set(classes) - set(names))
            if missing:
                raise ValueError(
                    f"class folders {missing} are missing from the {split} split ({self.root / split}); "
                    "every split needs the same class folders"
                )
        return self._checked_classes(self.root / "train")

    def _samples(self, folder: Path) -> list[tuple[str, int]]:
        """Every image of ``folder``, decoded once to check it (dropping bad ones if allowed)."""
        samples = find_images(folder, self.class_names)
        results = inspect_images([path for path, _ in samples])
        bad = [(path, problem) for (path, _), (problem, _) in zip(samples, results, strict=True) if problem]
        if bad and not self.skip_corrupt:
            raise ValueError(
                f"corrupt or unreadable image {bad[0][0]!r}: {bad[0][1]} ({len(bad)} bad in {folder}); "
                "fix or remove it, or set data.skip_corrupt=true"
            )
        if bad:
            log.warning("skipped %d corrupt images in %s (first: %s: %s)", len(bad), folder, *bad[0])
        self._digests.update((path, digest) for (path, _), (_, digest) in zip(samples, results, strict=True))
        dropped = {path for path, _ in bad}
        return [sample for sample in samples if sample[0] not in dropped]

    def _split(self, samples: list[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
        if not samples:
            raise ValueError(f"no images under data.root={str(self.root)!r}")
        labels = np.array([label for _, label in samples])
        try:
            train_idx, val_idx, test_idx = stratified_split(
                labels, self.val_fraction, self.test_fraction, self.split_seed
            )
        except ValueError as error:
            counts = dict(
                zip(
                    self.class_names,
                    np.bincount(labels, minlength=len(self.class_names)).tolist(),
                    strict=True,
                )
            )
            raise ValueError(
                f"data.root={str(self.root)!r} is too small to split into train/val/test with "
                f"data.val_fraction={self.val_fraction}, data.test_fraction={self.test_fraction} "
                f"(images per class: {counts}): {error}"
            ) from error
        return {
            s: [samples[i] for i in idx]
            for s, idx in zip(SPLITS, (train_idx, val_idx, test_idx), strict=True)
        }

    def _take_per_class(self, samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
        labels = np.array([label for _, label in samples])
        if len(labels) == 0:
            return samples
        return [samples[i] for i in take_per_class(labels, self.train_per_class, self.split_seed)]
