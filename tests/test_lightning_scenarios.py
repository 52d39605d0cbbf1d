"""The scenarios of Lightning's own fine-tuning callback tests, ported to our callbacks' API.

BatchNorm in eval while frozen, ``train_bn``, nested modules, optimizer groups after unfreezing,
resuming mid-schedule and modules that take no part in the forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from callback_helpers import Recorder, TinyModel, dataloader, make_trainer, state
from torch import nn

from tl_lightning.callbacks import Freeze, GradualUnfreeze

BN = [f"backbone.{i}.1" for i in range(3)]


class ModeProbe(pl.Callback):
    """Records, at every training batch, which BatchNorm layers are in train mode (after other callbacks)."""

    def __init__(self) -> None:
        self.training: list[set[str]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.training.append(
            {n for n, m in pl_module.named_modules() if isinstance(m, nn.BatchNorm1d) and m.training}
        )


def test_batchnorm_in_eval_while_frozen_and_training_once_unfrozen(tmp_path):
    probe = ModeProbe()
    model = TinyModel(optim="all")
    before = state(model)
    make_trainer(tmp_path, 3, [GradualUnfreeze(milestones=[1, 2]), probe]).fit(model, dataloader())
    assert probe.training[::4] == [set(), {"backbone.2.1"}, set(BN)]
    assert torch.equal(before["backbone.0.1.num_batches_tracked"], torch.tensor(0)) and torch.equal(
        state(model)["backbone.0.1.num_batches_tracked"], torch.tensor(4)
    )


@pytest.mark.parametrize("callback", [Freeze(train_bn=True), GradualUnfreeze(milestones=[5], train_bn=True)])
def test_train_bn_trains_only_norm_layers_of_the_frozen_part(tmp_path, callback):
    probe, rec = ModeProbe(), Recorder()
    make_trainer(tmp_path, 1, [callback, probe, rec]).fit(TinyModel(), dataloader())
    assert probe.training == [set(BN)] * 4
    norm_params = {f"{bn}.{p}" for bn in BN for p in ("weight", "bias")}
    assert rec.trainable == [norm_params | {"head.weight", "head.bias"}] * 4


class ConvBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(n_in, n_out, 1)
        self.norm = nn.BatchNorm1d(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Scale(nn.Module):
    """A module holding a parameter directly, with no children."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class NestedModel(TinyModel):
    """``backbone`` nests Sequentials of blocks, a parameter-only module and a flatten + Linear decoder."""

    def __init__(self) -> None:
        super().__init__(optim="trainable")
        self.backbone = nn.Sequential(
            OrderedDict(
                encoder=nn.Sequential(ConvBlock(1, 2), nn.Sequential(ConvBlock(2, 2), ConvBlock(2, 2))),
                scale=Scale(),
                decoder=nn.Sequential(nn.Flatten(), nn.Linear(8, 8)),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x.unsqueeze(1)))


def test_nested_modules_are_frozen_whole_and_unfrozen_by_top_level_child(tmp_path):
    rec = Recorder()
    make_trainer(tmp_path, 1, [Freeze(train_bn=True), rec]).fit(NestedModel(), dataloader())
    # 3 ConvBlocks' norms, however deep, and nothing else of the backbone
    assert sorted(rec.trainable[0] - {"head.weight", "head.bias"}) == sorted(
        f"backbone.encoder.{block}.norm.{p}" for block in ("0", "1.0", "1.1") for p in ("weight", "bias")
    )
    rec = Recorder()
    make_trainer(tmp_path, 4, [GradualUnfreeze(milestones=[1, 2, 3]), rec]).fit(NestedModel(), dataloader())
    counts = [len(t) for t in rec.trainable[::4]]
    assert counts == [2, 2 + 2, 2 + 2 + 1, 2 + 2 + 1 + 12]  # head, decoder, scale, encoder


def test_optimizer_groups_after_each_unfreezing(tmp_path):
    """No group is added mid-run; every parameter is in exactly one named group; trainable ones step."""
    layouts: list[list[tuple[str, int, float]]] = []

    class Groups(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            layouts.append(
                [(g["name"], len(g["params"]), g["lr"]) for g in trainer.optimizers[0].param_groups]
            )
            ids = [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]
            assert sorted(ids) == sorted(id(p) for p in pl_module.parameters())

    model = TinyModel(optim="trainable")
    before = state(model)
    make_trainer(tmp_path, 4, [GradualUnfreeze(milestones=[1, 2, 3]), Groups()]).fit(model, dataloader())
    expected = [("other", 2, 0.1)] + [(f"backbone.{i}", 4, 0.1) for i in range(3)]
    assert layouts == [expected] * 4
    after = state(model)
    assert all(
        not torch.equal(before[f"backbone.{i}.0.weight"], after[f"backbone.{i}.0.weight"]) for i in range(3)
    )


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_mid_schedule_keeps_unfrozen_groups_and_the_optimizer_layout(tmp_path):
    first = Recorder()
    trainer = make_trainer(tmp_path, 2, [GradualUnfreeze(milestones=[1, 3]), first])
    trainer.fit(TinyModel(), dataloader())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = Recorder()
    trainer = make_trainer(tmp_path, 3, [GradualUnfreeze(milestones=[1, 3]), resumed])
    trainer.fit(TinyModel(), dataloader(), ckpt_path=tmp_path / "mid.ckpt")
    # not re-frozen (Lightning #21901): the first resumed batch trains what the last saved one did
    assert resumed.trainable[0] == first.trainable[-1] and "backbone.2.0.weight" in resumed.trainable[0]
    assert resumed.lrs[0].keys() == first.lrs[-1].keys()


class UnusedBranch(TinyModel):
    """The last backbone block is registered but never called."""

    def __init__(self) -> None:
        super().__init__(optim="split")
        self.backbone.append(nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone[:3](x))


def test_unused_module_is_unfrozen_without_error_and_never_moves(tmp_path):
    model = UnusedBranch()
    before = state(model)
    make_trainer(tmp_path, 3, [GradualUnfreeze(milestones=[1, 2], groups_per_milestone=[2, 2])]).fit(
        model, dataloader()
    )
    after = state(model)
    assert model.backbone[3].weight.requires_grad and model.backbone[3].weight.grad is None
    assert torch.equal(before["backbone.3.weight"], after["backbone.3.weight"])  # weight decay skipped it
    assert not torch.equal(before["backbone.0.0.weight"], after["backbone.0.0.weight"])
