"""Fashion-MNIST (Zalando, MIT) read from its idx files (the Debian package or torchvision raw folder)."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import take_per_class
from tl_lightning.data.grayscale import GrayscaleArrays, GrayscaleDataModule

#: Where the Debian package ``dataset-fashion-mnist`` installs the files (``make data`` installs it).
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzip-compressed) of unsigned bytes as an array.

    Args:
        path: A ``*-idx1-ubyte`` (labels) or ``*-idx3-ubyte`` (images) file, ``.gz`` or not.

    Raises:
        ValueError: If the header is not an unsigned-byte idx header or the payload size does not
            match the dimensions it declares, naming the file.

    Example::

        labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")  # (10000,)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable idx file: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE or data[3] == 0:
        raise ValueError(f"{path} is not an unsigned-byte idx file (header {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(data[4:header], dtype=">u4"))
    if len(shape) != ndim or len(data) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path}: the idx header declares shape {shape} but the file holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_file(root: Path, stem: str) -> Path:
    """``root/stem.gz`` or ``root/stem``, also under torchvision's ``FashionMNIST/raw`` layout.

    Raises:
        FileNotFoundError: Naming the paths looked at and how to get the files.
    """
    folders = (root, root / "FashionMNIST" / "raw")
    candidates = [folder / name for folder in folders for name in (f"{stem}.gz", stem)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"data.root={str(root)!r}: Fashion-MNIST file {stem}[.gz] not found (looked at "
        f"{[str(c) for c in candidates]}); run `make data` (installs the Debian package "
        f"dataset-fashion-mnist into {DEBIAN_ROOT}), or with internet use data=torchvision "
        "data.name=FashionMNIST"
    )


def load_fashion_mnist(root: str | Path) -> GrayscaleArrays:
    """The 60,000 training and 10,000 test images of Fashion-MNIST under ``root``, checked.

    Raises:
        FileNotFoundError: If a file is missing (see :func:`find_idx_file`).
        ValueError: If a file is corrupt, images and labels disagree in number, or a label is not 0-9.
    """
    root = Path(root)
    images, labels = [], []
    for image_stem, label_stem in FILES.values():
        image_path, label_path = find_idx_file(root, image_stem), find_idx_file(root, label_stem)
        split_images, split_labels = read_idx(image_path), read_idx(label_path)
        if split_images.ndim != 3 or split_labels.ndim != 1 or len(split_images) != len(split_labels):
            raise ValueError(
                f"{image_path} ({split_images.shape}) and {label_path} ({split_labels.shape}) must hold "
                "(N, H, W) images and N labels"
            )
        if split_labels.max(initial=0) >= len(CLASS_NAMES):
            raise ValueError(f"{label_path} has labels above {len(CLASS_NAMES) - 1}")
        images.append(split_images)
        labels.append(split_labels.astype(np.int64))
    is_test = np.repeat([False, True], [len(labels[0]), len(labels[1])])
    return GrayscaleArrays(np.concatenate(images), np.concatenate(labels), CLASS_NAMES, 255.0, is_test)


class FashionMNISTDataModule(GrayscaleDataModule):
    """Fashion-MNIST (10 clothing classes, 28x28 grey) normalised with the backbone's statistics.

    Reads Zalando's idx files directly (torchvision's MD5 check rejects the Debian copies). The
    official test split is the test split; validation is ``val_per_class`` images per class drawn
    from the official training split with ``split_seed`` and never trained on; ``train_per_class``
    then draws from the rest with ``subset_seed``.

    Args:
        data_config: The backbone's preprocessing; mean, std, input size and interpolation are used.
        root: Folder with the four ``*-ubyte[.gz]`` files (or torchvision's ``root`` holding
            ``FashionMNIST/raw``).
        batch_size: Samples per batch.
        image_size: Side length to upsample to; ``None`` uses the backbone's input size.
        train_per_class: Training examples kept per class; ``None`` or ``"all"`` keeps all.
        val_per_class: Validation images per class, taken from the official training split.
        test_per_class: Test images per class (a fixed subset, for quick CPU runs); ``None`` keeps
            all 10,000.
        classes: Class indices to keep (relabelled ``0..k-1`` in the given order); ``None`` keeps all.
        probe_classes: Class indices of an earlier (source) task, for measuring forgetting.
        split_seed: Seed of the validation and test subsets.
        subset_seed: Seed of the ``train_per_class`` draw; ``None`` uses ``split_seed``.
        augment: Random affine jitter on training images.
        num_workers: ``DataLoader`` workers.
        shuffle_seed: Seed of the per-epoch training order.
        exclude: A ``label_issues.csv`` of this training split; its flagged rows are dropped.
        exclude_top: Drop the ``N`` highest-scored rows of ``exclude`` instead.
        label_noise: ``{rate, kind, seed}`` of label noise planted in the training split.

    Raises:
        FileNotFoundError: In :meth:`setup`, if the files are missing under ``root`` (run ``make data``).
        ValueError: On a corrupt file, bad class lists, or per-class counts larger than a class has.

    Example::

        data = FashionMNISTDataModule(efficientnet_lite0().data_config, image_size=64, train_per_class=20)
    """

    def __init__(
        self,
        data_config: DataConfig | dict,
        root: str = DEBIAN_ROOT,
        batch_size: int = 64,
        image_size: int | None = None,
        train_per_class: int | str | None = None,
        val_per_class: int = 100,
        test_per_class: int | None = None,
        classes: Sequence[int] | None = None,
        probe_classes: Sequence[int] | None = None,
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
            batch_size=batch_size,
            image_size=image_size,
            train_per_class=train_per_class,
            classes=classes,
            probe_classes=probe_classes,
            split_seed=split_seed,
            subset_seed=subset_seed,
            augment=augment,
            num_workers=num_workers,
            shuffle_seed=shuffle_seed,
            exclude=exclude,
            exclude_top=exclude_top,
            label_noise=label_noise,
        )
        if isinstance(val_per_class, bool) or not isinstance(val_per_class, int) or val_per_class < 1:
            raise ValueError(f"data.val_per_class must be an integer >= 1, got {val_per_class!r}")
        self.root = root
        self.val_per_class = val_per_class
        self.test_per_class = test_per_class

    def load_arrays(self) -> GrayscaleArrays:
        return load_fashion_mnist(self.root)

    def split(self, labels: np.ndarray, is_test: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """Official test images (``test_per_class`` of them per class when set), and validation
        images drawn per class from the official training split; training gets the rest."""
        indices = np.arange(len(labels))
        pool, test_idx = indices[~is_test], indices[is_test]
        test_idx = test_idx[
            take_per_class(labels[test_idx], self.test_per_class, self.split_seed, "test_per_class")
        ]
        val_idx = pool[take_per_class(labels[pool], self.val_per_class, self.split_seed, "val_per_class")]
        return np.setdiff1d(pool, val_idx), val_idx, test_idx
