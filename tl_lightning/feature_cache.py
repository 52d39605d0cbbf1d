"""Train a head on backbone features computed once, when the backbone never changes.

Valid only when the backbone is frozen and in eval mode for the whole run and the training inputs
are deterministic (no random augmentation): then every epoch would recompute the same features.
The pipeline checks both conditions (:func:`cache_applies`) before wrapping the data.

On disk, features are stored as safetensors under a key hashing the backbone's weights and
buffers *and* the exact input tensors (so the data and its transform are both covered).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tl_lightning.callbacks import Freeze, GradualUnfreeze
from tl_lightning.data.base import ClassificationDataModule

log = logging.getLogger(__name__)
MODES = ("auto", "off", "memory", "disk")


def cache_applies(callbacks: Sequence[pl.Callback], datamodule: ClassificationDataModule) -> bool:
    """Whether the run keeps the whole backbone frozen and in eval mode on deterministic inputs.

    True when a ``Freeze`` callback selects ``backbone`` with ``train_bn=False`` and no callback
    that changes trainability later (``GradualUnfreeze``) is present.
    """
    frozen = any(isinstance(c, Freeze) and "backbone" in c.modules and not c.train_bn for c in callbacks)
    unfreezes = any(isinstance(c, GradualUnfreeze) for c in callbacks)
    return frozen and not unfreezes and datamodule.deterministic_train


def _fingerprint(*tensors: torch.Tensor) -> hashlib.sha256:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


@torch.no_grad()
def extract_features(
    backbone: nn.Module, dataset: Dataset, batch_size: int, cache_dir: Path | None = None
) -> TensorDataset:
    """Features and labels of every sample of ``dataset``, in order, from ``backbone`` in eval mode.

    Args:
        backbone: Maps inputs to feature vectors; put in eval mode for the call and restored.
        dataset: Yields ``(input, label)`` deterministically.
        batch_size: Samples per forward pass.
        cache_dir: When given, reuse or write ``<key>.safetensors`` there.

    Returns:
        A ``TensorDataset(features, labels)``.
    """
    with torch.random.fork_rng():  # iterating a DataLoader draws a seed: keep the run's RNG stream intact
        inputs, labels = zip(*DataLoader(dataset, batch_size=batch_size, shuffle=False), strict=True)
    labels = torch.cat(labels)
    path = None
    if cache_dir is not None:
        key = _fingerprint(*backbone.state_dict().values(), *inputs, labels).hexdigest()[:32]
        path = Path(cache_dir) / f"{key}.safetensors"
        if path.is_file():
            log.info("feature cache hit: %s", path)
            stored = load_file(path)
            return TensorDataset(stored["features"], stored["labels"])
    was_training = backbone.training
    backbone.eval()
    try:
        features = torch.cat([backbone(x) for x in inputs])
    finally:
        backbone.train(was_training)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": features.contiguous(), "labels": labels.contiguous()}, tmp)
        tmp.replace(path)  # atomic: a crashed run never leaves a truncated cache file
    return TensorDataset(features, labels)


class CachedFeatureDataModule(ClassificationDataModule):
    """Wraps a data module so that every split yields backbone features instead of images.

    Args:
        datamodule: The image data module (deterministic training inputs).
        backbone: The frozen backbone whose features are cached.
        cache_dir: Directory for the on-disk cache; ``None`` keeps features in memory only.

    Raises:
        ValueError: If ``datamodule`` applies random training augmentation.

    Example::

        data = CachedFeatureDataModule(DigitsDataModule(backbone.data_config), backbone)
    """

    def __init__(
        self, datamodule: ClassificationDataModule, backbone: nn.Module, cache_dir: str | Path | None = None
    ) -> None:
        if not datamodule.deterministic_train:
            raise ValueError("feature caching needs deterministic training inputs; set data.augment=false")
        super().__init__(datamodule.data_config, datamodule.batch_size, 0, False, datamodule.shuffle_seed)
        self.source = datamodule
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.source.setup(stage)
        self.class_names = list(self.source.class_names)
        self.probe_set = self.source.probe_set  # images: SourceRetention runs the backbone itself
        self.train_set = extract_features(self.backbone, self.source.train_set, 256, self.cache_dir)
        self.val_set = extract_features(self.backbone, self.source.val_set, 256, self.cache_dir)
        self.test_set = extract_features(self.backbone, self.source.test_set, 256, self.cache_dir)
