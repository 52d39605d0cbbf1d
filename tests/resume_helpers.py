"""Interrupt a pipeline run after an epoch and read the weights it left, for the resume tests."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch


class StopAfterEpoch(pl.Callback):
    """Simulates an interruption: ends ``fit`` after ``epoch`` (0-based), once last.ckpt is written.

    Added to a composed config as ``+callbacks.stop._target_=resume_helpers.StopAfterEpoch``.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def last_weights(cfg) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the run's ``checkpoints/last.ckpt``."""
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True)["state_dict"]
