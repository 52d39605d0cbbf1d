"""Several labelled classification tasks for one shared backbone: a batch of every task per step."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import ClassificationDataModule

TaskFactory = Callable[..., ClassificationDataModule]
RESERVED = ("source",)  # a backbone's pretrained classifier is kept as heads["source"]


class MultiTaskDataModule(pl.LightningDataModule):
    """One image data module per task, each with its own labels (tasks may come from different datasets).

    Training batches are ``{task: (images, labels)}`` with one batch of every task (a ``CombinedLoader``
    in ``max_size_cycle`` mode: an epoch is one pass over the largest training split, smaller ones
    cycle). Validation and test have one loader per task, in the order of ``tasks``. A single task
    gives the single-task baseline through the same pipeline (drop the others: ``~data.tasks.<name>``).

    Every task's data module is built here with the backbone's ``data_config`` and the same
    ``image_size`` and ``batch_size``.

    Args:
        data_config: The backbone's preprocessing, handed to every task.
        tasks: Task name -> factory of its data module (Hydra ``_partial_: true``), called with
            ``data_config``, ``image_size`` and ``batch_size``.
        image_size: Side length of every task's images.
        batch_size: Samples per batch of each task (a training step sees ``len(tasks)`` times as many).

    Raises:
        ValueError: If ``tasks`` is empty or uses a reserved name (``source``).

    Example::

        tasks = {"digit": partial(MNIST5kDataModule), "fashion": partial(FashionMNISTDataModule)}
        data = MultiTaskDataModule(backbone.data_config, tasks)
    """

    def __init__(
        self,
        data_config: DataConfig | dict,
        tasks: Mapping[str, TaskFactory],
        image_size: int = 64,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("data.tasks is empty: give at least one task name -> data module")
        reserved = sorted(set(tasks) & set(RESERVED))
        if reserved:
            raise ValueError(f"data.tasks may not use the reserved names {reserved}; rename the task")
        common = {"data_config": data_config, "image_size": image_size, "batch_size": batch_size}
        self.tasks = {name: factory(**common) for name, factory in tasks.items()}
        self.image_size, self.batch_size = image_size, batch_size
        self._set_up = False

    def prepare_data(self) -> None:
        for data in self.tasks.values():
            data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for data in self.tasks.values():
            data.setup(stage)
        self._set_up = True

    @property
    def task_classes(self) -> dict[str, int]:
        """Task name -> number of classes (known after ``setup()``); one head is built per task from it."""
        if not self._set_up:
            self.setup("fit")
        return {name: data.num_classes for name, data in self.tasks.items()}

    @property
    def class_names(self) -> list[str]:
        """Every task's class names as ``<task>/<class>``, in task order."""
        return [f"{name}/{c}" for name, data in self.tasks.items() for c in data.class_names]

    @property
    def num_classes(self) -> int:
        """Classes of all tasks together (``len(class_names)``)."""
        return sum(self.task_classes.values())

    @property
    def train_set(self) -> Dataset:
        """All tasks' training splits, one after another."""
        return ConcatDataset([data.train_set for data in self.tasks.values()])

    @property
    def deterministic_train(self) -> bool:
        """``False``: training batches pair several tasks, which the feature cache does not handle."""
        return False

    def train_dataloader(self) -> CombinedLoader:
        loaders = {name: data.train_dataloader() for name, data in self.tasks.items()}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [data.val_dataloader() for data in self.tasks.values()]

    def test_dataloader(self) -> list[DataLoader]:
        return [data.test_dataloader() for data in self.tasks.values()]
