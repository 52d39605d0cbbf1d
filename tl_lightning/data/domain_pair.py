"""A labelled source domain and an unlabelled target domain, for unsupervised domain adaptation."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import ClassificationDataModule, NamedClasses

DomainFactory = Callable[..., ClassificationDataModule]


class Unlabelled(Dataset):
    """The images of a labelled dataset without their labels: ``dataset[i][0]``.

    The target domain's training split passes through it, so its labels cannot reach a loss.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index][0]


class DomainPairDataModule(NamedClasses, pl.LightningDataModule):
    """Labelled source batches together with unlabelled target batches, from two image data modules.

    Training batches are ``{"source": (images, labels), "target": images}`` (a ``CombinedLoader`` in
    ``max_size_cycle`` mode: an epoch is one pass over the larger training split, the smaller one
    cycles). The target labels of the training split are dropped (:class:`Unlabelled`). Validation and
    test have two loaders each: ``0`` the target domain's split with its labels (the adaptation
    result), ``1`` the source domain's (what the model still does on the labelled domain).

    Both domains are built here with the backbone's ``data_config`` and the same ``image_size`` and
    ``batch_size``, so they are normalised and sized alike; they must have the same class names in
    the same order.

    Args:
        data_config: The backbone's preprocessing, handed to both domains.
        source: Factory of the labelled domain's data module (Hydra ``_partial_: true``), called
            with ``data_config``, ``image_size`` and ``batch_size``.
        target: Factory of the unlabelled domain's data module, called the same way.
        image_size: Side length of both domains' images.
        batch_size: Samples per batch of each domain (a training step sees twice as many images).

    Raises:
        ValueError: In ``setup()``, if the domains' class names differ (listing both).

    Example::

        data = DomainPairDataModule(
            backbone.data_config, partial(MNIST5kDataModule), partial(DigitsDataModule), image_size=32
        )
    """

    def __init__(
        self,
        data_config: DataConfig | dict,
        source: DomainFactory,
        target: DomainFactory,
        image_size: int = 32,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        common = {"data_config": data_config, "image_size": image_size, "batch_size": batch_size}
        self.source = source(**common)
        self.target = target(**common)
        self.image_size, self.batch_size = image_size, batch_size
        self.class_names: list[str] = []

    def prepare_data(self) -> None:
        self.source.prepare_data()
        self.target.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.source.setup(stage)
        self.target.setup(stage)
        if self.source.class_names != self.target.class_names:
            raise ValueError(
                "data.source and data.target must have the same classes in the same order, got "
                f"{self.source.class_names} and {self.target.class_names} (select with data.*.classes)"
            )
        self.class_names = list(self.source.class_names)

    @property
    def train_set(self) -> Dataset | None:
        """The labelled (source) training split."""
        return self.source.train_set

    @property
    def deterministic_train(self) -> bool:
        """``False``: training batches pair two domains, which the feature cache does not handle."""
        return False

    def train_dataloader(self) -> CombinedLoader:
        target = self.target._loader(Unlabelled(self.target.train_set), shuffle=True)
        loaders = {"source": self.source.train_dataloader(), "target": target}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [self.target.val_dataloader(), self.source.val_dataloader()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.target.test_dataloader(), self.source.test_dataloader()]
