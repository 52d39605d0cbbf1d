"""Resuming without a callback that laid out the optimizer's groups fails naming the callback."""

from __future__ import annotations

import pytest
import torch
from callback_helpers import TinyModel, dataloader, make_trainer

from tl_lightning.callbacks import L2SP, GradualUnfreeze, LayerwiseLR
from tl_lightning.callbacks._resume import check_resume_callbacks


@pytest.fixture
def checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, 1, [GradualUnfreeze(milestones=[1])])
    trainer.fit(TinyModel(), dataloader())
    path = tmp_path / "unfreeze.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_lightning_alone_gives_no_hint(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="different number of parameter groups"):
        make_trainer(tmp_path, 2, []).fit(TinyModel(), dataloader(), ckpt_path=checkpoint)


def test_missing_layout_callback_is_named(checkpoint):
    saved = torch.load(checkpoint, weights_only=True)
    with pytest.raises(ValueError, match=r"GradualUnfreeze\{'modules': \['backbone'\]\}.*lacks it"):
        check_resume_callbacks(saved, [L2SP()], str(checkpoint))
    with pytest.raises(ValueError, match="GradualUnfreeze"):  # other arguments: another layout
        check_resume_callbacks(saved, [GradualUnfreeze("backbone.0", milestones=[1])], str(checkpoint))


def test_same_callbacks_resume(tmp_path, checkpoint):
    callbacks = [GradualUnfreeze(milestones=[1])]
    check_resume_callbacks(torch.load(checkpoint, weights_only=True), callbacks, str(checkpoint))
    trainer = make_trainer(tmp_path, 2, callbacks)
    trainer.fit(TinyModel(), dataloader(), ckpt_path=checkpoint)
    assert trainer.current_epoch == 2 and callbacks[0].stage == 1


def test_missing_layerwise_lr_is_named_and_other_factors_refused(tmp_path):
    trainer = make_trainer(tmp_path, 1, [LayerwiseLR(decay=0.5)])
    trainer.fit(TinyModel(), dataloader())
    path = tmp_path / "layerwise.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=r"LayerwiseLR\{'modules': \['backbone'\]\}.*lacks it"):
        check_resume_callbacks(saved, [], str(path))
    with pytest.raises(ValueError, match="factors .* differ"):
        make_trainer(tmp_path, 2, [LayerwiseLR(decay=0.9)]).fit(TinyModel(), dataloader(), ckpt_path=path)
    resumed = make_trainer(tmp_path, 2, [LayerwiseLR(decay=0.5)])
    resumed.fit(TinyModel(), dataloader(), ckpt_path=path)
    assert resumed.current_epoch == 2
