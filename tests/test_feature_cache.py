import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tl_lightning.backbones import small_cnn
from tl_lightning.feature_cache import extract_features
from tl_lightning.pipeline import train

LONGER = [
    "++trainer.limit_train_batches=12",
    "++trainer.limit_val_batches=4",
    "++trainer.limit_test_batches=4",
    "trainer.max_epochs=2",
]


def _run(make_cfg, *overrides):
    cfg = make_cfg("strategy=linear_probe", *LONGER, *overrides, run=overrides[0].replace("=", "-"))
    train(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_cached_linear_probe_matches_uncached(make_cfg, tmp_path):
    uncached = _run(make_cfg, "feature_cache=off")
    cached = _run(make_cfg, "feature_cache=auto")
    assert uncached["feature_cache"] == "off" and cached["feature_cache"] == "memory"
    # the cache leaves the run's RNG stream intact, so only float summation order differs
    assert cached["test"]["test/acc"] == pytest.approx(uncached["test"]["test/acc"], abs=0.01)
    assert cached["test"]["test/loss"] == pytest.approx(uncached["test"]["test/loss"], rel=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=linear_probe", "data.augment=true"],
        ["strategy=full_finetune"],
        ["strategy=gradual_unfreeze", "callbacks.gradual_unfreeze.groups_per_milestone=1"],
    ],
    ids=["random_augmentation", "backbone_trains", "backbone_unfreezes"],
)
def test_cache_is_never_used_when_features_would_change(make_cfg, overrides):
    cfg = make_cfg(*overrides, "backbone=small_cnn", "backbone.pretrained=false")
    train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["feature_cache"] == "off"
    with pytest.raises(ValueError, match="feature_cache=memory needs a frozen backbone"):
        train(make_cfg(*overrides, "backbone=small_cnn", "feature_cache=memory"))


def test_disk_cache_is_keyed_by_weights_and_inputs(tmp_path):
    backbone = small_cnn()
    images = torch.randn(10, 3, 16, 16)
    data = TensorDataset(images, torch.arange(10))
    first = extract_features(backbone, data, 4, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    again = extract_features(backbone, data, 4, tmp_path)
    assert torch.equal(first.tensors[0], again.tensors[0])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1, "second call is a cache hit"
    changed = images.clone()
    changed[0, 0, 0, 0] += 1
    extract_features(backbone, TensorDataset(changed, torch.arange(10)), 4, tmp_path)
    with torch.no_grad():
        backbone.model[0][0].weight.add_(1e-3)
    extract_features(backbone, data, 4, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3, "new inputs and new weights get new keys"
    assert backbone.training, "train mode restored"
