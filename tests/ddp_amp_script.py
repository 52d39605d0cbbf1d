"""Two gloo processes fine-tune with GradualUnfreeze under 32, bf16-mixed and 16-mixed, with accumulation.

Usage: ``python tests/ddp_amp_script.py OUT_DIR`` writes ``rank0.pt`` and ``rank1.pt``: for each case
``"<precision>/acc<k>"`` the weights after every optimizer step and the loss scale (16-mixed).

Everything in ``backbone`` and ``unused`` is unfrozen at optimizer step 1, after DDP wrapped the
model, so only GradualUnfreeze averages those gradients; ``unused`` takes part in no loss. Under
16-mixed (a CPU ``GradScaler``) rank 1 turns the gradient of ``backbone.0.weight`` into inf during
optimizer step ``INJECT_STEP``: both ranks must skip that step. Both processes are forked from this
one and set ``LOCAL_RANK`` themselves, so Lightning does not launch processes and one process group
serves every case.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from gloo_launch import run_two_workers
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks import GradualUnfreeze

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
ACCUMULATE = (1, 2)
INJECT_STEP = 2


class Net(pl.LightningModule):
    """Backbone, a selected module no loss uses, and a head; AdamW with weight decay."""

    def __init__(self, inject: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.inject = inject
        self.backbone[0].weight.register_hook(self._maybe_overflow)

    def _maybe_overflow(self, grad: torch.Tensor) -> torch.Tensor:
        hit = self.inject and self.global_rank == 1 and self.trainer.global_step == INJECT_STEP
        return torch.full_like(grad, float("inf")) if hit else grad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


class StepRecorder(pl.Callback):
    """Weights and loss scale after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step > len(self.weights):
            self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.scales.append(scaler.get_scale() if scaler is not None else 1.0)


def _run(precision: str, accumulate: int, out: Path) -> dict[str, Any]:
    model = Net(inject=precision == "16-mixed")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if precision == "16-mixed":
        extra: dict[str, Any] = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    else:
        extra = {"precision": precision}
    recorder = StepRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        callbacks=[GradualUnfreeze(["backbone", "unused"], milestones=[1], unit="step"), recorder],
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **extra,
    )
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))
    trainer.fit(model, DataLoader(data, batch_size=4))  # DistributedSampler: 32 samples per rank
    return {"initial": initial, "weights": recorder.weights, "scales": recorder.scales}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "LOCAL_RANK": str(rank)}
    )
    out = Path(out_dir)
    results = {
        f"{precision}/acc{accumulate}": _run(precision, accumulate, out)
        for precision in PRECISIONS
        for accumulate in ACCUMULATE
    }
    torch.save(results, out / f"rank{rank}.pt")


def main(out_dir: str) -> None:
    run_two_workers(_worker, out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
