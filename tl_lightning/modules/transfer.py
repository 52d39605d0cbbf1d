"""``TransferModule``: a pretrained backbone with named heads, metrics and named parameter groups."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from tl_lightning.backbones import Backbone
from tl_lightning.modules.optim import named_param_groups
from tl_lightning.modules.rebuild import METADATA_KEY, load_run_checkpoint
from tl_lightning.modules.sharding import readable_checkpoint, shard_layer_groups

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., object]


class TransferModule(pl.LightningModule):
    """Backbone + named heads (``target``, and ``source`` when the weights bring a classifier).

    The source head is never trained (its parameters are frozen): it measures what the backbone
    still knows of the source task.

    The target head is trained with cross-entropy; accuracy and macro F1 are logged per epoch
    for train/val/test. Every parameter, frozen or not, sits in a named optimizer group from the start
    (one per layer group, plus a ``/no_decay`` twin for norms and biases), so callbacks that unfreeze
    or rescale learning rates never have to add a group.

    Args:
        backbone: The feature extractor; its source head, if any, becomes ``heads["source"]``.
        head: The new classifier for the target task.
        num_classes: Number of target classes.
        optimizer: Partial optimizer, called with the parameter groups (Hydra ``_partial_: true``).
        scheduler: Optional partial LR scheduler called with the optimizer; if its signature has an
            unbound ``total_steps`` it receives ``trainer.estimated_stepping_batches``. Stepped every
            optimizer step (every epoch, monitoring ``val/loss``, for ``ReduceLROnPlateau``).
        label_smoothing: Cross-entropy label smoothing in ``[0, 1)``.
        weight_decay: Weight decay of the regular groups (norms and biases get none).

    Raises:
        ValueError: If ``label_smoothing`` or ``weight_decay`` is out of range.

    Example::

        optimizer = partial(torch.optim.AdamW, lr=1e-3)
        module = TransferModule(efficientnet_lite0(), LinearHead(1280, 10), 10, optimizer)
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        label_smoothing: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"module.label_smoothing must be in [0, 1), got {label_smoothing}")
        if weight_decay < 0:
            raise ValueError(f"module.weight_decay must be >= 0, got {weight_decay}")
        self.save_hyperparameters(
            {"num_classes": num_classes, "label_smoothing": label_smoothing, "weight_decay": weight_decay}
        )
        self.backbone = backbone
        heads = {"target": head}
        source_head = backbone.pop_source_head()
        if source_head is not None:
            heads["source"] = source_head.requires_grad_(False)  # a fixed probe of the source task
        self.heads = nn.ModuleDict(heads)
        self.cached_features = False
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        metrics = torchmetrics.MetricCollection(
            {
                "acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro"),
                "f1": torchmetrics.classification.MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location=None, **kwargs: Any):
        """Rebuild the module a ``train.py`` checkpoint describes, and load its weights (``weights_only``).

        The checkpoint's ``tl_lightning`` record (resolved config, class names, preprocessing) says
        what to build (:func:`~tl_lightning.modules.rebuild.load_run_checkpoint`): nothing is downloaded,
        and no constructor argument is needed. A checkpoint without that record (written outside
        ``train.py``) loads the Lightning way, with the constructor arguments given as ``kwargs``.
        The returned module is in eval mode, on the CPU, or moved to ``map_location`` (a device).

        Args:
            checkpoint_path: A ``checkpoints/*.ckpt`` file of a run (or directory, under ``trainer=fsdp``:
                consolidated first, see :func:`~tl_lightning.modules.sharding.readable_checkpoint`).
            map_location: The device to move the module to (``None``: the CPU); a mapping or a
                function (Lightning's other forms) only for a checkpoint without the record.
            **kwargs: Only for a checkpoint without the record: Lightning's ``load_from_checkpoint``
                arguments (``backbone=...``, ``head=...``, ``optimizer=...``, ``strict=...``).

        Raises:
            FileNotFoundError: If ``checkpoint_path`` does not exist.
            TypeError: If the checkpoint holds another module class than ``cls`` (or a subclass),
                ``kwargs`` are given with a checkpoint that describes itself, or its ``map_location`` is
                not a device.
            ValueError: If the weights do not fit the module the record describes, naming the file.

        Example::

            module = TransferModule.load_from_checkpoint("outputs/train/<run>/checkpoints/last.ckpt")
            logits = module(images)
        """
        checkpoint_path = readable_checkpoint(checkpoint_path)  # trainer=fsdp: a directory, consolidated
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        if METADATA_KEY not in checkpoint:
            kwargs = {"weights_only": True, **kwargs}  # safe unless the caller says otherwise
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs).eval()
        if map_location is not None and not isinstance(map_location, str | int | torch.device):
            raise TypeError(
                f"map_location={map_location!r}: a checkpoint that describes its module is rebuilt on the CPU"
                " and moved to one device; give a device (e.g. 'cuda:0'), not a mapping or a function"
            )
        if kwargs:
            raise TypeError(
                f"{str(checkpoint_path)!r} describes its own module (checkpoint[{METADATA_KEY!r}]): "
                f"load it without {sorted(kwargs)}"
            )
        module, _ = load_run_checkpoint(checkpoint_path)
        if not isinstance(module, cls):
            raise TypeError(
                f"{str(checkpoint_path)!r} holds a {type(module).__name__}, not a {cls.__name__}: load it "
                f"with {type(module).__name__}.load_from_checkpoint or TransferModule.load_from_checkpoint"
            )
        return module if map_location is None else module.to(map_location)

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Target-task logits, from images or a batch of token tensors (``{"input_ids": ..., ...}``),
        or from cached backbone features (see ``use_cached_features``)."""
        features = x if self.cached_features else self.backbone(x)
        return self.heads["target"](features)

    def use_cached_features(self) -> None:
        """Take backbone features, not images, as input from now on (``tl_lightning.run.feature_cache``)."""
        self.cached_features = True

    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the pretrained source head (e.g. the 1000 ImageNet classes).

        Raises:
            AttributeError: If the backbone brought no source head.
        """
        if "source" not in self.heads:
            raise AttributeError(f"backbone {self.backbone.name!r} brought no source head")
        return self.heads["source"](self.backbone(x))

    def layer_groups(self) -> dict[str, list[str]]:
        """Parameter names per layer group, ordered input -> output: backbone groups, then heads."""
        groups = {
            f"backbone.{g}": [f"backbone.{n}" for n in names]
            for g, names in self.backbone.layer_groups().items()
        }
        for head_name, head in self.heads.items():
            groups[f"heads.{head_name}"] = [f"heads.{head_name}.{n}" for n, _ in head.named_parameters()]
        return groups

    @staticmethod
    def monitor_modes() -> dict[str, str]:
        """Every metric ``fit`` logs, with the direction that is better (``ModelCheckpoint``'s ``mode``)."""
        return {
            f"{stage}/{name}": "min" if name == "loss" else "max"
            for stage in ("train", "val")
            for name in ("loss", "acc", "f1")
        }

    def _shared_step(
        self,
        batch: tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor],
        metrics: torchmetrics.MetricCollection,
        stage: str,
    ):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        metrics.update(logits.detach(), y)
        size = len(y)  # explicit: Lightning cannot infer it from a dict of token tensors
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train", batch_size=size)
        # update() only, so the values are computed over the whole epoch (on_step would need forward())
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=size)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.train_metrics, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, self.test_metrics, "test")

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp|fsdp_cpu``): shard with FSDP2.

        Each layer group (a transformer layer, a convolutional stage) becomes an FSDP unit, then the whole
        module; the trainer's ``bf16-mixed``/``16-mixed`` precision becomes FSDP2's mixed-precision policy.
        Source-head and multi-task methods other than ``forward`` are registered with FSDP by the callbacks
        that call them. Without a device mesh (any other strategy) nothing changes.
        """
        if self.device_mesh is None:
            return
        precision = self.trainer.precision if self._trainer is not None else "32-true"
        shard_layer_groups(self, self.layer_groups(), self.device_mesh["data_parallel"], precision)

    def configure_optimizers(self):
        groups = named_param_groups(self, self.layer_groups(), self.hparams.weight_decay)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self._build_scheduler(optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config = {"scheduler": scheduler, "interval": "epoch", "monitor": "val/loss"}
        else:
            config = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _build_scheduler(self, optimizer: torch.optim.Optimizer):
        factory = self.scheduler_factory
        target = getattr(factory, "func", factory)
        bound = getattr(factory, "keywords", {})
        wants_total = "total_steps" in inspect.signature(target).parameters and "total_steps" not in bound
        if wants_total:
            return factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return factory(optimizer)
