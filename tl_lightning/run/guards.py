"""Guards the pipeline adds to every run: a diverged run stops instead of reporting success."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override


class FiniteLossGuard(pl.Callback):
    """Stop training with ``FloatingPointError`` as soon as the training loss is NaN or infinite.

    Checked after every training batch, on every rank (one rank's non-finite loss stops all of them,
    so no rank is left waiting in a collective). No checkpoint is written after the loss diverged.

    Args:
        hint: Appended to the error message (e.g. which config key sets the learning rate).

    Raises:
        FloatingPointError: From ``on_train_batch_end``, naming the epoch and step.

    Example::

        trainer = pl.Trainer(callbacks=[FiniteLossGuard("lower the learning rate")])
    """

    def __init__(self, hint: str = "") -> None:
        self.hint = hint

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # manual optimisation or a skipped step: nothing to check
        diverged = not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(diverged, all=False):
            raise FloatingPointError(
                f"the training loss is not finite (value {loss.detach().float().cpu().tolist()} on rank "
                f"{trainer.global_rank}) at epoch {trainer.current_epoch}, batch {batch_idx}, global step "
                f"{trainer.global_step}: training diverged and the run was stopped. {self.hint}".rstrip()
            )
