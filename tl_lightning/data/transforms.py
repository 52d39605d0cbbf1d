"""Image transforms built from the backbone's ``DataConfig`` (never from hard-coded statistics)."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from tl_lightning.backbones import DataConfig
from tl_lightning.data.images import to_rgb8


def image_transform(
    data_config: DataConfig, train: bool, augment: bool, image_size: int | None = None
) -> v2.Compose:
    """PIL image -> normalised float tensor at the backbone's resolution.

    A PIL image of any mode is first brought to 8-bit RGB by
    :func:`~tl_lightning.data.images.to_rgb8`, as every image file is read for training (a palette
    image's colours, not its indices; alpha dropped; 16-bit levels scaled), so an image handed over
    undecoded gets the pixels training sees.

    Evaluation resizes the shorter side to ``data_config.resize_size(size)`` (the weights' own
    ``crop_pct``/``resize_size``, e.g. 256 for a 224 crop at ``crop_pct=0.875``) and centre-crops
    ``size``, as the weights were evaluated.

    Args:
        data_config: The backbone's preprocessing.
        train: Whether this is the training split (augmentation only applies there).
        augment: Random resized crop and horizontal flip on the training split.
        image_size: Output side length; ``None`` uses the backbone's input size.

    Example::

        transform = image_transform(backbone.data_config, train=False, augment=False)
    """
    size = image_size or data_config.input_size[-1]
    interpolation = InterpolationMode(data_config.interpolation)
    if train and augment:
        geometry = [
            v2.RandomResizedCrop(size, interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        resize = data_config.resize_size(size)
        geometry = [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
    return v2.Compose(
        [
            v2.Lambda(_rgb8, Image.Image),
            v2.ToImage(),
            v2.RGB(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(data_config.mean), list(data_config.std)),
        ]
    )


def _rgb8(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else to_rgb8(image)
