"""Stopping after an epoch and resuming from last.ckpt reproduces the uninterrupted run."""

from pathlib import Path

import pytest
import torch
from resume_helpers import last_weights

from tl_lightning.run.pipeline import train

RUN = [
    "backbone=small_cnn",
    "backbone.channels=[8,16,16]",
    "strategy=gradual_unfreeze",
    "callbacks.gradual_unfreeze.milestones=[1,2]",
    "callbacks.gradual_unfreeze.groups_per_milestone=1",
    "callbacks.gradual_unfreeze.warmup_steps=3",
    "trainer.max_epochs=3",
    "++trainer.limit_train_batches=4",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
]


@pytest.mark.parametrize("stop_after", [0, 1], ids=["at_milestone", "between_milestones"])
def test_resume_reproduces_uninterrupted_run(make_cfg, stop_after):
    straight = make_cfg(*RUN, run="straight")
    train(straight)

    interrupted = make_cfg(
        *RUN,
        "+callbacks.stop._target_=resume_helpers.StopAfterEpoch",
        f"+callbacks.stop.epoch={stop_after}",
        run="cut",
    )
    train(interrupted)
    checkpoint = Path(interrupted.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == stop_after

    resumed = make_cfg(*RUN, f"ckpt_path={checkpoint}", run="resumed")
    train(resumed)
    expected, actual = last_weights(straight), last_weights(resumed)
    assert expected.keys() == actual.keys()
    gaps = {k: (expected[k].float() - actual[k].float()).abs().max().item() for k in expected}
    assert max(gaps.values()) <= 1e-6, {k: v for k, v in gaps.items() if v > 1e-6}
    changed = [
        k
        for k in expected
        if k.startswith("backbone.") and not torch.equal(expected[k], last_weights(interrupted)[k])
    ]
    assert changed, "the resumed part must have trained the backbone, or the comparison proves nothing"


def test_resume_under_another_strategy_is_refused_unless_allowed(make_cfg):
    first = make_cfg("backbone=small_cnn", "strategy=discriminative_lr", run="first")
    train(first)
    checkpoint = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["tl_lightning"]["strategy"] == "discriminative_lr"

    other = make_cfg("backbone=small_cnn", "strategy=full_finetune", f"ckpt_path={checkpoint}", run="other")
    with pytest.raises(ValueError, match="strategy=discriminative_lr.*allow_strategy_change=true"):
        train(other)
    assert not (Path(other.paths.output_dir) / "checkpoints").exists(), "refused before training"

    allowed = make_cfg(
        "backbone=small_cnn",
        "strategy=full_finetune",
        f"ckpt_path={checkpoint}",
        "allow_strategy_change=true",
        "trainer.max_epochs=2",
        run="allowed",
    )
    train(allowed)
