"""torchvision backbones: real layer groups, the weights' own resize, and failing fast offline."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tl_lightning.backbones import DataConfig, timm_backbone, torchvision_backbone
from tl_lightning.backbones.hub import torch_hub_file
from tl_lightning.backbones.torchvision_models import torchvision_data_config
from tl_lightning.data import TorchvisionDataModule
from tl_lightning.data.transforms import image_transform

FAMILIES = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "efficientnet_b0": ["stem", *(f"features.{i}" for i in range(1, 9))],
    "mobilenet_v3_small": ["stem", *(f"features.{i}" for i in range(1, 13)), "classifier"],
    "convnext_tiny": ["stem", *(f"features.{i}" for i in range(1, 8)), "classifier"],
    "vit_b_16": ["stem", *(f"encoder_layer_{i}" for i in range(12)), "norm"],
    "swin_t": ["stem", *(f"features.{i}" for i in range(1, 8)), "norm"],
}


@pytest.mark.parametrize("model_name", list(FAMILIES))
def test_common_families_get_stem_stage_and_head_side_groups(model_name):
    backbone = torchvision_backbone(model_name, pretrained=False)
    groups = backbone.layer_groups()
    assert list(groups) == FAMILIES[model_name]
    names = [n for group in groups.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in backbone.named_parameters())
    order = [n for n, _ in backbone.named_parameters()]
    assert [order.index(g[0]) for g in groups.values()] == sorted(order.index(g[0]) for g in groups.values())


def test_torchvision_weights_keep_their_resize_size():
    cfg = torchvision_data_config(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    assert cfg.input_size == (3, 224, 224) and cfg.resize_size() == 232
    assert torchvision_data_config(torchvision.models.ResNet18_Weights.IMAGENET1K_V1).resize_size() == 256


def test_timm_crop_pct_travels_with_the_model():
    backbone = timm_backbone("resnet18", pretrained=False)
    assert backbone.data_config.crop_pct == backbone.model.pretrained_cfg["crop_pct"] == 0.95
    assert backbone.data_config.resize_size() == 235  # timm: floor(224 / 0.95)


def test_eval_transform_resizes_to_resize_size_then_centre_crops():
    """A 232 px image under crop 224 / resize 232 is only cropped: its central 224 pixels, unchanged."""
    cfg = DataConfig((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (3, 224, 224), crop_pct=224 / 232)
    pixels = np.random.default_rng(0).integers(0, 255, (232, 232, 3), dtype=np.uint8)
    x = image_transform(cfg, train=False, augment=False)(Image.fromarray(pixels))
    expected = torch.tensor(pixels[4:228, 4:228] / 255, dtype=torch.float32).permute(2, 0, 1)
    assert torch.allclose(x, expected, atol=1e-6)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub / Hugging Face cache on a machine declared offline."""
    monkeypatch.setenv("TL_LIGHTNING_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_offline_pretrained_weights_fail_fast_naming_the_download(offline):
    with pytest.raises(RuntimeError, match=r"resnet18-f37072fd\.pth.*pretrained=false"):
        torchvision_backbone("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(RuntimeError, match=r"timm/resnet18\.a1_in1k.*pretrained=false"):
        timm_backbone("resnet18", pretrained=True)


def test_offline_torchvision_weights_load_from_the_cache(offline):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    reference = torchvision.models.resnet18()
    path = torch_hub_file(weights.url)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    backbone = torchvision_backbone("resnet18", weights="IMAGENET1K_V1")
    assert torch.equal(backbone.model.conv1.weight, reference.conv1.weight)
    assert torch.equal(backbone.pop_source_head().weight, reference.fc.weight)


def test_torchvision_data_downloads_in_prepare_data_and_fails_fast_offline(offline):
    cfg = DataConfig((0.5,) * 3, (0.5,) * 3, (3, 32, 32))
    data = TorchvisionDataModule("CIFAR10", cfg, root=str(offline / "data"), num_workers=0)
    with pytest.raises(RuntimeError, match=r"prepare_data"):
        data.setup("fit")  # setup never downloads: every DDP rank runs it
    with pytest.raises(RuntimeError, match=r"data\.root=.*offline.*cs\.toronto\.edu"):
        data.prepare_data()
    no_download = TorchvisionDataModule("CIFAR10", cfg, root=str(offline / "data"), download=False)
    with pytest.raises(RuntimeError, match=r"data\.download=false"):
        no_download.prepare_data()
