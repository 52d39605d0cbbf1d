"""The real Hydra config, composed and shrunk, run end to end through ``train(cfg)``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.pipeline import train

ROOT = Path(__file__).resolve().parent.parent


def _metrics(cfg):
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_default_config_trains_and_writes_metrics(make_cfg):
    cfg = make_cfg()
    best = train(cfg)
    metrics = _metrics(cfg)
    assert metrics["strategy"] == cfg.strategy_name
    assert set(metrics["test"]) >= {"test/acc", "test/f1", "test/loss"}
    assert 0.0 <= metrics["test"]["test/acc"] <= 1.0
    assert best == metrics["best"]["val/acc"]
    assert metrics["params"]["total"] > metrics["params"]["trainable"] > 0
    assert Path(metrics["best_checkpoint"]).is_file()
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "overrides",
    [["strategy=scratch"], ["backbone=small_cnn", "strategy=scratch"], ["head=mlp", "logger=tensorboard"]],
    ids=["scratch", "small_cnn", "mlp_tensorboard"],
)
def test_config_combinations_run(make_cfg, overrides):
    cfg = make_cfg(*overrides)
    train(cfg)
    assert _metrics(cfg)["test"]["test/acc"] >= 0.0


def test_linear_probe_leaves_backbone_weights_and_bn_buffers_bitwise_unchanged(make_cfg):
    cfg = make_cfg("strategy=linear_probe", "++trainer.limit_train_batches=6", "feature_cache=off")
    train(cfg)
    trained = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    pretrained = efficientnet_lite0().state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert backbone.keys() == pretrained.keys()
    assert any("running_mean" in k for k in backbone)
    changed = [k for k in pretrained if not torch.equal(backbone[k], pretrained[k])]
    assert changed == []
    head_before = _metrics(cfg)["params"]
    assert head_before["trainable"] == 1280 * 10 + 10


@pytest.mark.slow
def test_ddp_cpu_two_processes_one_output_dir(tmp_path):
    """``trainer=ddp_cpu`` through the real CLI: two gloo processes, one run directory."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "trainer=ddp_cpu",
        "backbone=small_cnn",
        "strategy=scratch",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=4",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        "callbacks.rich_progress_bar=null",
        "data.image_size=32",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "one output directory, not one per rank"
