"""SourceRetention compares the source head with the original model's predictions."""

import pytest
import torch
from callback_helpers import make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks.retention import SourceRetention


class Tiny(LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lr = lr
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
        self.heads = nn.ModuleDict({"source": nn.Linear(16, 6), "target": nn.Linear(16, 2)})

    def forward(self, x):
        return self.heads["target"](self.backbone(x))

    def source_logits(self, x):
        return self.heads["source"](self.backbone(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(n: int, classes: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, classes, (n,), generator=g)), 8
    )


def _fit(tmp_path, model, callbacks, max_epochs=1) -> Trainer:
    trainer = make_trainer(tmp_path, max_epochs, callbacks)
    trainer.fit(model, _loader(32, 2, 1), _loader(8, 2, 2))
    return trainer


def test_at_fit_start_the_model_agrees_with_itself(tmp_path):
    retention = SourceRetention(_loader(24, 6, 3))
    seen = {}

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.backbone[3].eval()  # a mixed train/eval state must come back exactly
            modes = [m.training for m in pl_module.modules()]
            seen.update(retention.evaluate(pl_module))
            seen["modes_restored"] = modes == [m.training for m in pl_module.modules()]

    _fit(tmp_path, Tiny(lr=1.0), [retention, AtStart()])
    assert seen["agreement"] == 1.0
    assert seen["kl"].abs() < 1e-6
    assert seen["modes_restored"]


def test_training_hard_on_the_target_drifts_from_the_source(tmp_path):
    callback = SourceRetention(_loader(64, 6, 3))
    original = Tiny(lr=0.0).eval()
    trainer = _fit(tmp_path, Tiny(lr=5.0), [callback], max_epochs=3)
    with torch.no_grad():
        expected = torch.cat([original.source_logits(x) for x, _ in _loader(64, 6, 3)])
    torch.testing.assert_close(callback.state_dict()["reference"], expected)  # captured before training
    assert trainer.callback_metrics["source/agreement"] < 0.9
    assert trainer.callback_metrics["source/kl"] > 0.01


def test_accuracy_with_source_labels(tmp_path):
    model = Tiny(lr=0.0)
    probe = _loader(24, 6, 3)
    trainer = _fit(tmp_path, model, [SourceRetention(probe, has_labels=True)])
    model.eval()
    with torch.no_grad():
        correct = sum((model.source_logits(x).argmax(-1) == y).sum() for x, y in probe)
    assert trainer.callback_metrics["source/acc"] == correct / 24
    assert "source/agreement" not in trainer.callback_metrics


def test_resume_keeps_the_original_reference(tmp_path):
    first = SourceRetention(_loader(24, 6, 3))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, 1, [first, checkpoint], enable_checkpointing=True)
    trainer.fit(Tiny(lr=5.0), _loader(32, 2, 1), _loader(8, 2, 2))
    resumed = SourceRetention(_loader(24, 6, 3))
    trainer = make_trainer(tmp_path, 2, [resumed])
    trainer.fit(Tiny(lr=5.0), _loader(32, 2, 1), _loader(8, 2, 2), ckpt_path=tmp_path / "last.ckpt")
    assert torch.equal(resumed.state_dict()["reference"], first.state_dict()["reference"])


def test_rejects_shuffled_probe_and_missing_method(tmp_path):
    with pytest.raises(ValueError, match="shuffle=False"):
        SourceRetention(DataLoader(TensorDataset(torch.randn(4, 4)), shuffle=True))
    with pytest.raises(AttributeError, match="method 'teacher'"):
        _fit(tmp_path, Tiny(lr=0.0), [SourceRetention(_loader(8, 6, 3), source_forward="teacher")])


def test_two_instances_keep_their_own_reference_and_metrics(tmp_path):
    def pair():
        return [SourceRetention(_loader(24, 6, 3)), SourceRetention(_loader(16, 6, 4), prefix="other")]

    first = pair()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(tmp_path, 1, [*first, checkpoint], enable_checkpointing=True)
    trainer.fit(Tiny(lr=5.0), _loader(32, 2, 1), _loader(8, 2, 2))
    assert {"source/kl", "other/kl"} <= set(trainer.callback_metrics)
    resumed = pair()
    make_trainer(tmp_path, 2, resumed).fit(
        Tiny(lr=5.0), _loader(32, 2, 1), _loader(8, 2, 2), ckpt_path=tmp_path / "last.ckpt"
    )
    for before, after in zip(first, resumed, strict=True):
        assert torch.equal(after.state_dict()["reference"], before.state_dict()["reference"])
    assert [len(r.state_dict()["reference"]) for r in resumed] == [24, 16]
