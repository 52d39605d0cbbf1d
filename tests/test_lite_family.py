"""EfficientNet-Lite1/2 weights on a real photo, and ``backbone.cut_at`` against a hand-run forward."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from sklearn.datasets import load_sample_image
from torch.nn import functional as F

from tl_lightning.backbones import (
    cut_backbone,
    efficientnet_lite0,
    efficientnet_lite1,
    efficientnet_lite2,
    timm_backbone,
)

PALACE = 698  # ImageNet-1k class index


def _photo(cfg) -> torch.Tensor:
    image = (
        torch.tensor(np.asarray(load_sample_image("china.jpg")), dtype=torch.float32).permute(2, 0, 1) / 255
    )
    x = F.interpolate(image[None], size=cfg.input_size[1:], mode=cfg.interpolation, align_corners=False)
    return (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)


@pytest.mark.parametrize(("factory", "size"), [(efficientnet_lite1, 240), (efficientnet_lite2, 260)])
def test_lite1_lite2_have_real_imagenet_weights(factory, size):
    """The packaged weights classify sklearn's photo of a Chinese palace as ImageNet's 'palace'."""
    backbone = factory()
    cfg = backbone.data_config
    assert cfg.input_size == (3, size, size) and cfg.mean == (0.5,) * 3 and cfg.interpolation == "bicubic"
    head, backbone = backbone.pop_source_head().eval(), backbone.eval()
    with torch.no_grad():
        assert head(backbone(_photo(cfg))).argmax().item() == PALACE
    groups = list(backbone.layer_groups())
    assert groups[0] == "conv_stem+bn1" and groups[-1] == "blocks.6+conv_head+bn2" and len(groups) == 8


@pytest.mark.parametrize("cut_at", ["conv_stem+bn1", "blocks.2", "blocks.4", "blocks.6+conv_head+bn2"])
def test_cut_at_equals_running_the_lower_layers_by_hand(cut_at):
    full = efficientnet_lite0().eval()
    cut = efficientnet_lite0(cut_at=cut_at).eval()
    model = full.model
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        h = model.bn1(model.conv_stem(x))
        if cut_at != "conv_stem+bn1":
            last = 6 if cut_at.startswith("blocks.6") else int(cut_at.split(".")[1])
            h = model.blocks[: last + 1](h)
        if cut_at.endswith("bn2"):
            h = model.bn2(model.conv_head(h))
        expected = h.mean((2, 3))
        got = cut(x)
    assert torch.equal(got, expected)
    assert cut.num_features == expected.shape[1] and cut.pop_source_head() is None
    groups = list(cut.layer_groups())
    assert groups == list(full.layer_groups())[: groups.index(cut_at) + 1] and groups[-1] == cut_at
    names = [n for params in cut.layer_groups().values() for n in params]
    assert sorted(names) == sorted(n for n, _ in cut.named_parameters()), "groups partition the parameters"


def test_cut_removes_later_layers_and_trains():
    cut = efficientnet_lite1(pretrained=False, cut_at="blocks.3")
    full = efficientnet_lite1(pretrained=False)
    assert cut.num_features == 80 and not any(
        "blocks.4" in n or "conv_head" in n for n, _ in cut.named_parameters()
    )
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in full.parameters()) / 4
    cut.train()
    cut(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in cut.parameters())


def test_cut_at_timm_backbone_and_unknown_group_lists_the_groups():
    whole = timm_backbone("resnet18").eval()
    resnet, full = cut_backbone(whole, "layer2.0+layer2.1").eval(), whole.model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(x)))))).mean((2, 3))
        assert torch.equal(resnet(x), expected)
    assert resnet.num_features == 128
    assert timm_backbone("resnet18", cut_at="layer2.0+layer2.1").num_features == 128
    with pytest.raises(ValueError, match=r"cut_at='blocks.9'.*\['conv_stem\+bn1', 'blocks.0'"):
        efficientnet_lite0(pretrained=False, cut_at="blocks.9")


def test_lite_variant_check_and_weights_loaded_by_position():
    from tl_lightning.backbones.timm_models import efficientnet_lite

    with pytest.raises(ValueError, match=r"variant must be one of \[0, 1, 2\]"):
        efficientnet_lite(3)
    packaged = efficientnet_lite2().model.state_dict()
    fresh = timm.create_model("tf_efficientnet_lite2", pretrained=False, num_classes=0).state_dict()
    assert list(packaged) == list(fresh)
    assert not torch.equal(packaged["conv_stem.weight"], fresh["conv_stem.weight"])


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_backbone_configs_build_with_a_cut(make_cfg, name):
    cfg = make_cfg(f"backbone={name}", "backbone.pretrained=false", "backbone.cut_at=blocks.5")
    backbone = instantiate(cfg.backbone)
    assert (
        backbone.name == f"{name}@blocks.5"
        and backbone.num_features == backbone.eval()(torch.randn(1, 3, 32, 32)).shape[1]
    )
