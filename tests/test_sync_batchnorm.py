"""``trainer.sync_batchnorm=true`` keeps every norm layer's function, timm's fused BatchNorm + act too."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from tl_lightning.backbones import efficientnet_lite0, small_cnn, torchvision_backbone
from tl_lightning.run.checkpointing import AsyncAtomicCheckpointIO
from tl_lightning.run.pipeline import _trainer_plugins
from tl_lightning.run.sync_batchnorm import NormActSyncBatchNorm

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
BACKBONES = {
    "efficientnet_lite0": lambda: efficientnet_lite0(),  # timm BatchNormAct2d (BatchNorm + ReLU6)
    "resnet18": lambda: torchvision_backbone("resnet18", pretrained=False),  # torch BatchNorm2d
    "small_cnn": lambda: small_cnn(channels=(8, 16)),
}


def _classes(model: nn.Module) -> list[str]:
    return [f"{name}:{type(m).__name__}" for name, m in model.named_modules()]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_conversion_and_revert_keep_every_layers_function(name):
    model = BACKBONES[name]().eval()
    before, classes = model(IMAGES), _classes(model)
    plugin = NormActSyncBatchNorm()
    synced = plugin.apply(plugin.apply(model))  # a second stage of the same trainer converts again
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert torch.equal(synced(IMAGES), before)  # eval mode: running statistics, no process group needed
    reverted = plugin.revert(synced)
    assert _classes(reverted) == classes
    assert torch.equal(reverted(IMAGES), before)


def test_timm_norm_act_layers_become_synchronised_norm_act_layers():
    model = efficientnet_lite0()
    fused = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    synced = NormActSyncBatchNorm().apply(model)
    assert fused > 0 and sum(isinstance(m, SyncBatchNormAct) for m in synced.modules()) == fused


def test_lightnings_own_conversion_would_drop_the_activations():
    """What the plugin replaces: the comparison above detects the defect it fixes."""
    model = efficientnet_lite0().eval()
    before = model(IMAGES)
    assert not torch.allclose(TorchSyncBatchNorm().apply(model)(IMAGES), before, atol=1e-2)


def test_the_pipelines_trainer_converts_with_the_plugin(make_cfg):
    """``trainer=ddp trainer.sync_batchnorm=true``: the trainer the pipeline builds converts with the plugin.
    (A real run needs GPUs; the conversion the DDP strategy applies at fit and test is tested above.)"""
    cfg = make_cfg(
        "trainer=ddp", "trainer.sync_batchnorm=true", "trainer.accelerator=cpu", "trainer.devices=2"
    )
    with pytest.raises(ValueError, match="trainer.sync_batchnorm=true needs GPUs"):
        _trainer_plugins(cfg)
    cfg.trainer.accelerator = "gpu"
    plugins = _trainer_plugins(cfg)
    assert [type(p) for p in plugins] == [AsyncAtomicCheckpointIO, NormActSyncBatchNorm]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True, plugins=plugins, logger=False
    )
    assert trainer.strategy._layer_sync is plugins[1]
