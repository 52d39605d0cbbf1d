"""``MultiTaskModule``: a shared backbone, a named head per task, ``L = sum_t w_t L_t``, optional PCGrad."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torchmetrics
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

from tl_lightning.backbones import Backbone
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.objectives.pcgrad import pcgrad


def resolve_loss_weights(loss_weights: Mapping[str, float] | None, tasks: list[str]) -> dict[str, float]:
    """Every task's loss weight: ``1.0`` each when ``loss_weights`` is ``None``.

    Raises:
        ValueError: On a name that is not a task, a task without a weight, or a weight that is not a
            finite number ``>= 0``, naming ``module.loss_weights`` and listing the tasks.
    """
    if loss_weights is None:
        return {task: 1.0 for task in tasks}
    given = dict(loss_weights)
    unknown = sorted(set(given) - set(tasks))
    if unknown:
        raise ValueError(f"module.loss_weights names {unknown}, which are not tasks; the tasks are {tasks}")
    missing = [task for task in tasks if task not in given]
    if missing:
        raise ValueError(
            f"module.loss_weights has no weight for {missing}; give one for every task of {tasks} "
            "(or set module.loss_weights=null for 1.0 each)"
        )
    bad = {
        task: w
        for task, w in given.items()
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0
    }
    if bad:
        raise ValueError(f"module.loss_weights must be finite numbers >= 0, got {bad} (tasks {tasks})")
    return {task: float(given[task]) for task in tasks}


def check_pcgrad_strategy(strategy: Strategy) -> None:
    """PCGrad runs on one device only.

    Per-task gradients come from ``torch.autograd.grad``, which bypasses DDP's gradient reduction
    (ranks would silently diverge), so any strategy other than a single device is rejected.

    Raises:
        ValueError: Naming ``module.pcgrad`` and the strategy, with the settings that work.
    """
    if not isinstance(strategy, SingleDeviceStrategy):
        raise ValueError(
            f"module.pcgrad=true needs a single-device run, got trainer.strategy={type(strategy).__name__}: "
            "its per-task gradients bypass DDP's gradient reduction. Use trainer=cpu|gpu with "
            "trainer.devices=1, or set module.pcgrad=false to train the weighted sum under DDP"
        )


class MultiTaskModule(TransferModule):
    """A shared backbone with one head per task (``heads.<task>``), trained on ``sum_t w_t L_t``.

    Training batches are ``{task: (images, labels)}`` (:class:`~tl_lightning.data.MultiTaskDataModule`);
    the images of all tasks go through the backbone as one batch, then each task's features through
    its own head and cross-entropy. Validation and test take one loader per task, in task order.

    Logged per task: ``{train,val,test}/<task>/{loss,acc,f1}`` (epoch values); across tasks:
    ``{val,test}/loss`` (the weighted sum ``sum_t w_t L_t``, as trained), ``{train,val,test}/acc`` and
    ``/f1`` (means over tasks, so ``monitor=val/acc`` keeps the best mean accuracy), and ``train/loss``
    every step.

    With ``pcgrad=True`` the shared (backbone) gradient is PCGrad's (:func:`~tl_lightning.objectives.pcgrad`)
    of the per-task gradients ``w_t grad L_t``, with the tasks visited in an order drawn from
    ``(pcgrad_seed, global_step)``; the heads get their ordinary gradients. It is done in ``backward``,
    first in Lightning's pipeline (backward -> accumulate -> unscale/inf check -> step), on the
    loss Lightning hands over: its factor (``1/accumulate_grad_batches``, the ``GradScaler`` scale)
    is read as ``d loss / d sum_t w_t L_t`` and applied to every task, which PCGrad commutes with.
    Per-task gradients are summed over an accumulation window and the projection of the sums is
    written to ``.grad``, so accumulating ``k`` micro-batches projects the same gradient as one batch
    holding them all (batch statistics such as BatchNorm's aside). One device only
    (:func:`check_pcgrad_strategy`). Cost: one backward pass per task instead of one in all.

    Args:
        backbone: As :class:`~tl_lightning.modules.transfer.TransferModule`.
        head: Task name -> its head (the pipeline builds one per task from ``head`` and the data).
        num_classes: Task name -> number of classes.
        loss_weights: Task name -> ``w_t``; ``None`` for ``1.0`` each.
        pcgrad: Project conflicting task gradients of the shared parameters (PCGrad).
        pcgrad_seed: Seed of PCGrad's task orders.
        *args: The rest of :class:`~tl_lightning.modules.transfer.TransferModule`'s arguments
            (optimizer, scheduler, label_smoothing, weight_decay), positionally.
        **kwargs: The same arguments by name.

    Raises:
        ValueError: If ``head``/``num_classes`` are not per-task mappings of the same tasks, or on bad
            ``loss_weights`` (see :func:`resolve_loss_weights`); in ``training_step``, on a batch that
            does not hold every task.

    Example::

        heads = {"digit": LinearHead(1280, 10), "fashion": LinearHead(1280, 10)}
        classes = {"digit": 10, "fashion": 10}
        module = MultiTaskModule(efficientnet_lite0(), heads, classes, optimizer, pcgrad=True)
    """

    def __init__(
        self,
        backbone: Backbone,
        head: Mapping[str, nn.Module],
        num_classes: Mapping[str, int],
        *args: Any,
        loss_weights: Mapping[str, float] | None = None,
        pcgrad: bool = False,
        pcgrad_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(head, Mapping) or not isinstance(num_classes, Mapping):
            raise ValueError(
                "MultiTaskModule needs one head and class count per task: use a multi-task data module "
                "(data=mnist5k_fashion, tl_lightning.data.MultiTaskDataModule)"
            )
        tasks = list(num_classes)
        if not tasks or set(head) != set(tasks):
            raise ValueError(f"the heads {sorted(head)} and the tasks {tasks} must be the same non-empty set")
        weights = resolve_loss_weights(loss_weights, tasks)
        first = tasks[0]
        super().__init__(backbone, head[first], num_classes[first], *args, **kwargs)
        source = {"source": self.heads["source"]} if "source" in self.heads else {}
        self.heads = nn.ModuleDict({**{task: head[task] for task in tasks}, **source})
        self.tasks = tasks
        self.loss_weights = weights
        self.hparams.update(
            {
                "num_classes": dict(num_classes),
                "loss_weights": weights,
                "pcgrad": pcgrad,
                "pcgrad_seed": pcgrad_seed,
            }
        )
        self.train_metrics, self.val_metrics, self.test_metrics = (
            self._task_metrics(num_classes) for _ in range(3)
        )
        self.train_losses, self.val_losses, self.test_losses = (
            nn.ModuleDict({task: torchmetrics.MeanMetric() for task in tasks}) for _ in range(3)
        )
        self._step_losses: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._task_grads: dict[nn.Parameter, torch.Tensor] = {}  # PCGrad: (tasks, *shape) per parameter

    @staticmethod
    def _task_metrics(num_classes: Mapping[str, int]) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                task: torchmetrics.MetricCollection(
                    {
                        "acc": torchmetrics.classification.MulticlassAccuracy(n, average="micro"),
                        "f1": torchmetrics.classification.MulticlassF1Score(n, average="macro"),
                    }
                )
                for task, n in num_classes.items()
            }
        )

    @override
    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Logits of ``task``'s head."""
        return self.heads[task](self.backbone(x))

    def monitor_modes(self) -> dict[str, str]:
        """Every metric ``fit`` logs (per task and across tasks), with the direction that is better."""
        prefixes = ["", *(f"{task}/" for task in self.tasks)]
        return {
            f"{stage}/{prefix}{name}": "min" if name == "loss" else "max"
            for stage in ("train", "val")
            for prefix in prefixes
            for name in ("loss", "acc", "f1")
        }

    @override
    def setup(self, stage: str) -> None:
        if self.hparams.pcgrad and stage == "fit":
            check_pcgrad_strategy(self.trainer.strategy)

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if not (isinstance(batch, dict) and set(batch) == set(self.tasks)):
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(
                f"MultiTaskModule needs a batch of every task {self.tasks} per step, got {found}: "
                "use tl_lightning.data.MultiTaskDataModule with the same tasks"
            )
        sizes = [len(batch[task][1]) for task in self.tasks]
        features = self.backbone(torch.cat([batch[task][0] for task in self.tasks]))
        weighted = {}
        for task, task_features in zip(self.tasks, features.split(sizes), strict=True):
            y = batch[task][1]
            logits = self.heads[task](task_features)
            loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
            self.train_metrics[task].update(logits.detach(), y)
            self.train_losses[task].update(loss.detach(), weight=len(y))
            weighted[task] = self.loss_weights[task] * loss
        total = torch.stack(list(weighted.values())).sum()
        self._step_losses = (total, weighted)
        self.log("train/loss", total, prog_bar=True, batch_size=sum(sizes))
        return total

    @override
    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if not self.hparams.pcgrad:
            super().backward(loss, *args, **kwargs)
            return
        total, weighted = self._step_losses
        self._step_losses = None
        # 1. Lightning's factor on our loss: 1/accumulate_grad_batches, times the GradScaler scale
        (factor,) = torch.autograd.grad(loss, total, retain_graph=True)
        # 2. per-task gradients of the shared parameters, summed over the accumulation window
        shared = [p for p in self.backbone.parameters() if p.requires_grad]
        if shared:
            self._accumulate_task_grads(shared, [factor * weighted[task] for task in self.tasks])
            self._write_projection(shared)
        # 3. the heads: their ordinary gradients (each head only sees its own task's loss)
        heads = [p for p in self.heads.parameters() if p.requires_grad]
        if heads:
            torch.autograd.backward(loss, inputs=heads)

    def _accumulate_task_grads(self, shared: list[nn.Parameter], losses: list[torch.Tensor]) -> None:
        per_task = [
            torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True) for loss in losses
        ]
        for i, p in enumerate(shared):
            grads = torch.stack([torch.zeros_like(p) if grads[i] is None else grads[i] for grads in per_task])
            self._task_grads[p] = self._task_grads[p] + grads if p in self._task_grads else grads

    def _write_projection(self, shared: list[nn.Parameter]) -> None:
        """``.grad`` of the shared parameters <- PCGrad of the window's per-task gradient sums."""
        flat = torch.cat([self._task_grads[p].flatten(1) for p in shared], dim=1).float()  # fp32 dot products
        seed = np.random.SeedSequence([self.hparams.pcgrad_seed, self.global_step]).generate_state(1)[0]
        combined = pcgrad(list(flat), torch.Generator().manual_seed(int(seed)))
        for p, g in zip(shared, combined.split([p.numel() for p in shared]), strict=True):
            p.grad = g.view_as(p).to(p.dtype)

    @override
    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self._task_grads = {}  # a new accumulation window starts

    @override
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, self.tasks[dataloader_idx], self.val_metrics, self.val_losses)

    @override
    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, self.tasks[dataloader_idx], self.test_metrics, self.test_losses)

    def _evaluate(self, batch, task: str, metrics: nn.ModuleDict, losses: nn.ModuleDict) -> None:
        x, y = batch
        logits = self(x, task)
        metrics[task].update(logits, y)
        losses[task].update(F.cross_entropy(logits, y), weight=len(y))

    @override
    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_metrics, self.train_losses)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics, self.val_losses)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics, self.test_losses)

    def _log_epoch(self, stage: str, metrics: nn.ModuleDict, losses: nn.ModuleDict) -> None:
        """Per-task epoch values, their means (acc, f1) and, outside training, the weighted loss."""
        if not all(losses[task].update_count for task in self.tasks):
            return  # a stage that saw no batch of some task (e.g. limit_val_batches=0)
        values = {}
        for task in self.tasks:
            task_values = {name: value for name, value in metrics[task].compute().items()}
            task_values["loss"] = losses[task].compute()
            values.update({f"{stage}/{task}/{name}": v for name, v in task_values.items()})
            metrics[task].reset()
            losses[task].reset()
        for name in ("acc", "f1"):
            values[f"{stage}/{name}"] = torch.stack(
                [values[f"{stage}/{t}/{name}"] for t in self.tasks]
            ).mean()
        if stage != "train":  # train/loss is logged every step
            values[f"{stage}/loss"] = sum(
                w * values[f"{stage}/{t}/loss"] for t, w in self.loss_weights.items()
            )
        self.log_dict(values, prog_bar=False)
