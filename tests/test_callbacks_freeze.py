"""Freeze: feature extraction with frozen normalisation statistics."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from callback_helpers import TinyModel, dataloader, make_trainer, state
from torch import nn

from tl_lightning.callbacks import Freeze


class TrainEveryEpoch(TinyModel):
    """Calls ``self.train()`` at every epoch start, as older Lightning and many user modules do."""

    def on_train_epoch_start(self) -> None:
        self.train()


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state(model).items() if re.match(r"backbone\.\d\.1\.", k)}  # the BatchNorms


def test_freezes_before_configure_optimizers(tmp_path):
    model = TinyModel(optim="trainable")
    before = state(model)
    trainer = make_trainer(tmp_path, 1, [Freeze()])
    trainer.fit(model, dataloader())
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.head.parameters()}
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_frozen_batchnorm_statistics_never_change(tmp_path):
    model = TrainEveryEpoch(optim="all")
    before = bn_state(model)
    make_trainer(tmp_path, 2, [Freeze()]).fit(model, dataloader())
    after = bn_state(model)
    assert before.keys() == after.keys() and len(before) == 15
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_bn_trains_affine_and_statistics_from_first_step(tmp_path):
    model = TinyModel(optim="trainable")
    before = state(model)
    trainable: list[set[str]] = []

    class Probe(Freeze):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            trainable.append(
                {n for n, m in pl_module.named_modules() if isinstance(m, nn.BatchNorm1d) and m.training}
            )

    make_trainer(tmp_path, 1, [Probe(train_bn=True)], max_steps=1).fit(model, dataloader())
    after = state(model)
    assert trainable == [{"backbone.0.1", "backbone.1.1", "backbone.2.1"}]
    for i in range(3):
        for key in ("weight", "running_mean"):
            assert not torch.equal(before[f"backbone.{i}.1.{key}"], after[f"backbone.{i}.1.{key}"])
        assert torch.equal(before[f"backbone.{i}.0.weight"], after[f"backbone.{i}.0.weight"])


def test_missing_module_fails_in_setup_listing_children(tmp_path):
    with pytest.raises(AttributeError, match=r"no module matching 'encoder'.*'backbone', 'head'"):
        make_trainer(tmp_path, 1, [Freeze(modules="encoder")]).fit(TinyModel(), dataloader())


@pytest.mark.parametrize("kwargs", [{"modules": []}, {"train_bn": "yes"}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        Freeze(**kwargs)
