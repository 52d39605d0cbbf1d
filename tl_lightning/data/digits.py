"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans): the offline default data."""

from __future__ import annotations

from sklearn.datasets import load_digits

from tl_lightning.data.grayscale import GrayscaleArrays, GrayscaleDataModule


class DigitsDataModule(GrayscaleDataModule):
    """Digits upsampled to ``image_size`` and normalised with the backbone's statistics.

    The split is stratified and fixed by ``split_seed`` (60/20/20 by default), so every strategy
    sees the same validation and test images; ``train_per_class`` then draws a low-data subset of
    the training split. Arguments are those of :class:`~tl_lightning.data.grayscale.GrayscaleDataModule`;
    ``classes`` and ``probe_classes`` are digits.

    Example::

        data = DigitsDataModule(efficientnet_lite0().data_config, image_size=64, train_per_class=20)
    """

    def load_arrays(self) -> GrayscaleArrays:
        digits = load_digits()
        return GrayscaleArrays(
            images=digits.images.astype("uint8"),
            labels=digits.target,
            class_names=[str(d) for d in range(10)],
            full_scale=16.0,
        )
