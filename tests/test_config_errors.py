"""Bad configuration stops before training with a message naming the key."""

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException

from tl_lightning.run.pipeline import train


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["module.optimizer.lr=-0.1"], ValueError, "module.optimizer.lr"),
        (
            ["backbone=timm", "backbone.model_name=not_a_net", "backbone.pretrained=false"],
            ValueError,
            "not_a_net",
        ),
        (["data=image_folder", "data.root=/nonexistent/images"], FileNotFoundError, "data.root"),
        (["+head.in_features=77"], ValueError, "head.in_features=77"),
        (["data.train_per_class=1000"], ValueError, "data.train_per_class=1000"),
        (["+callbacks.broken.patience=3"], ValueError, "callbacks.broken has no _target_"),
        (["ckpt_path=/nonexistent.ckpt"], FileNotFoundError, "ckpt_path"),
    ],
    ids=[
        "negative_lr",
        "unknown_timm",
        "missing_dir",
        "head_mismatch",
        "too_few_examples",
        "no_target",
        "no_ckpt",
    ],
)
def test_bad_values_fail_before_training(make_cfg, overrides, error, message):
    cfg = make_cfg(*overrides)
    with pytest.raises((error, InstantiationException), match=message):
        train(cfg)


def test_unknown_key_and_unknown_strategy_are_rejected(make_cfg):
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        make_cfg("module.not_a_key=1")
    with pytest.raises(ConfigCompositionException, match="linear_probe"):
        make_cfg("strategy=nope")  # the message lists the available strategies


def test_checkpoint_from_another_model_is_rejected(make_cfg, tmp_path):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"backbone.model.0.weight": torch.zeros(3)}}, other)
    cfg = make_cfg(f"ckpt_path={other}")
    with pytest.raises(ValueError, match="another model"):
        train(cfg)
