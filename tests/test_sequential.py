"""The pieces of experiment=digits_sequential: source checkpoints, probe sets, source retention."""

import json
from pathlib import Path

import pytest
import torch

from tl_lightning.backbones import DataConfig, small_cnn
from tl_lightning.data import DigitsDataModule
from tl_lightning.run.pipeline import train
from tl_lightning.run.source_checkpoint import from_checkpoint

CFG = DataConfig((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (3, 16, 16))


def test_probe_set_is_the_source_runs_test_split():
    source = DigitsDataModule(CFG, image_size=8, classes=[0, 1, 2, 3, 4])
    target = DigitsDataModule(CFG, image_size=8, classes=[5, 6, 7, 8, 9], probe_classes=[0, 1, 2, 3, 4])
    source.setup("fit")
    target.setup("fit")
    assert len(source.test_set) == len(target.probe_set) > 0
    for (x_source, y_source), (x_probe, y_probe) in zip(source.test_set, target.probe_set, strict=True):
        assert torch.equal(x_source, x_probe) and y_source == y_probe
    assert target.num_classes == 5
    with pytest.raises(ValueError, match="probe_classes"):
        DigitsDataModule(CFG, classes=[5, 6], probe_classes=[6, 7])


def test_source_stage_then_target_stage_with_retention(make_cfg, tmp_path):
    source_cfg = make_cfg(
        "backbone=small_cnn",
        "strategy=scratch",
        "data.classes=[0,1,2,3,4]",
        "++trainer.limit_train_batches=6",
        run="source",
    )
    train(source_cfg)
    checkpoint = Path(source_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    trained = torch.load(checkpoint, weights_only=True)["state_dict"]

    backbone = from_checkpoint(str(checkpoint), small_cnn())
    head = backbone.pop_source_head()
    assert all(torch.equal(v, trained[f"backbone.{k}"]) for k, v in backbone.state_dict().items())
    assert torch.equal(head[1].weight, trained["heads.target.1.weight"])

    target_cfg = make_cfg(
        "experiment=digits_sequential",
        "backbone.backbone._target_=tl_lightning.backbones.small_cnn",
        f"backbone.path={checkpoint}",
        "strategy=full_finetune",
        run="target",
    )
    train(target_cfg)
    metrics = json.loads((Path(target_cfg.paths.output_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["source/acc"] <= 1.0
    with pytest.raises(ValueError, match="does not hold this backbone"):
        from_checkpoint(str(checkpoint), small_cnn(channels=(8, 8)))
