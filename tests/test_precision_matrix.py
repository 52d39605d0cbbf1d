"""EWC and L2SP take the same first step under every precision, with fused and unfused optimizers.

Lightning unscales 16-mixed gradients before ``on_before_optimizer_step`` except for optimizers that
unscale inside ``step`` (``fused=True``); a penalty added there in the wrong scale is 65,536x too weak.
The weights are moved away from the anchors right after it is taken, and the penalty is strong, so the
penalty dominates the first step's gradient and a wrongly scaled one changes it completely, while the
reduced-precision forward pass only perturbs the small loss gradient.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from callback_helpers import make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks import EWC, L2SP

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
LR = 0.01
PENALISED = {"ewc": ("backbone.",), "l2sp": ("backbone.", "heads.target.")}


class Net(LightningModule):
    def __init__(self, optimizer: str, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleDict({"source": nn.Linear(16, 4), "target": nn.Linear(16, 3)})
        self.optimizer, self.fused = optimizer, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["target"](self.backbone(x))

    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["source"](self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.optimizer](self.parameters(), lr=LR, fused=self.fused)


class MoveAwayFromAnchor(Callback):
    """After the penalty took its anchor: shift every weight by ±0.1, so the penalty gradient is large."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(torch.randn(p.shape, generator=g).sign() * 0.1)


def _penalty(name: str) -> Callback:
    if name == "ewc":
        return EWC(lambda_=100.0, modules="backbone", fisher_samples=16)
    return L2SP(alpha=100.0, beta=100.0, pretrained="backbone", new="heads.target")


def _first_step(
    penalty: str, precision: str, optimizer: str, fused: bool, root: Any
) -> dict[str, torch.Tensor]:
    """The weights' change in the first optimizer step."""
    model = Net(optimizer, fused)
    if precision == "16-mixed":
        extra: dict[str, Any] = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    else:
        extra = {"precision": precision}
    mover = MoveAwayFromAnchor()
    before: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer = make_trainer(root, 1, [_penalty(penalty), mover, Snapshot()], max_steps=1, **extra)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    trainer.fit(model, DataLoader(data, batch_size=16))
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("reference")
    return {
        (penalty, optimizer): _first_step(penalty, "32-true", optimizer, False, root)
        for penalty in ("ewc", "l2sp")
        for optimizer in OPTIMIZERS
    }


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("penalty", ["ewc", "l2sp"])
def test_first_step_matches_the_32_bit_unfused_one(reference, tmp_path, penalty, precision, optimizer, fused):
    expected = reference[(penalty, optimizer)]
    update = _first_step(penalty, precision, optimizer, fused, tmp_path)
    penalised = [n for n in expected if n.startswith(PENALISED[penalty])]
    assert len(penalised) == {"ewc": 4, "l2sp": 6}[penalty]
    for name in penalised:  # the others follow the loss gradient alone, whose precision differs
        step = expected[name]
        assert step.abs().max() > 0, name
        torch.testing.assert_close(update[name], step, rtol=2e-2, atol=2e-2 * step.abs().max().item())
