"""Tiny deterministic models, data and trainers shared by the callback tests and the DDP script."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_SAMPLES = 32
BATCH_SIZE = 8  # 4 steps per epoch


def block(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU())


class TinyModel(pl.LightningModule):
    """``backbone`` = three Linear+BN+ReLU blocks (layer groups ``backbone.0..2``), ``head`` = Linear.

    Args:
        optim: ``"trainable"`` passes only parameters that require grad, in one group (Lightning's
            fine-tuning example); ``"all"`` passes every parameter; ``"split"`` passes trainable
            parameters in a weight-decay group and a no-decay group (biases and norms).
        scheduler: ``optimizer -> lr_scheduler config dict`` or None.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        seed: Seeds the weights.
    """

    def __init__(
        self,
        optim: str = "trainable",
        scheduler: Callable[[torch.optim.Optimizer], dict[str, Any]] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(block(4, 8), block(8, 8), block(8, 8))
        self.head = nn.Linear(8, 3)
        self.optim, self.scheduler, self.optimizer_name, self.lr = optim, scheduler, optimizer, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optim == "all":
            params: Any = self.parameters()
        elif self.optim == "trainable":
            params = [p for p in self.parameters() if p.requires_grad]
        else:
            named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
            params = [
                {"params": [p for n, p in named if p.ndim > 1], "weight_decay": 1e-2},
                {"params": [p for n, p in named if p.ndim <= 1], "weight_decay": 0.0},
            ]
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if hasattr(scheduler, "step_update"):  # a timm scheduler, stepped per optimizer update
            scheduler.step_update(num_updates=self.global_step)
        else:
            super().lr_scheduler_step(scheduler, metric)


def timm_cosine(optimizer: torch.optim.Optimizer, warmup_lr_init: float = 0.0) -> dict[str, Any]:
    """timm's cosine schedule with a 3-step warm-up over 12 optimizer steps, as a Lightning config."""
    from timm.scheduler import CosineLRScheduler

    scheduler = CosineLRScheduler(
        optimizer, t_initial=12, warmup_t=3, warmup_lr_init=warmup_lr_init, lr_min=0.0, t_in_epochs=False
    )
    return {"scheduler": scheduler, "interval": "step"}


def dataloader(seed: int = 1, n: int = N_SAMPLES) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)


def make_trainer(root: Any, max_epochs: int, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "callbacks": callbacks,
        "default_root_dir": root,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recorder(pl.Callback):
    """Records, before every training batch, each group's lr and which parameters require grad."""

    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []
        self.trainable: list[set[str]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.lrs.append(
            {g.get("name", "other"): g["lr"] for opt in trainer.optimizers for g in opt.param_groups}
        )
        self.trainable.append({n for n, p in pl_module.named_parameters() if p.requires_grad})


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples (a checkpoint, a callback's state)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in tensors_in(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in tensors_in(value)]
    return []
