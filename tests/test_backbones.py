import re

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image
from torch.nn import functional as F

from tl_lightning.backbones import efficientnet_lite0, small_cnn, timm_backbone, torchvision_backbone
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule

DAISY = 985  # ImageNet-1k class index


def test_efficientnet_lite0_has_real_imagenet_weights():
    """The packaged weights classify a real photo of a daisy as ImageNet's 'daisy'."""
    backbone = efficientnet_lite0()
    assert not any("source" in key for key in backbone.state_dict()), (
        "the source head is held, not a sub-module"
    )
    source_head = backbone.pop_source_head().eval()
    backbone.eval()
    cfg = backbone.data_config
    image = (
        torch.tensor(np.asarray(load_sample_image("flower.jpg")), dtype=torch.float32).permute(2, 0, 1) / 255
    )
    x = F.interpolate(image[None], size=cfg.input_size[1:], mode=cfg.interpolation, align_corners=False)
    x = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = source_head(backbone(x))
    assert logits.argmax().item() == DAISY
    random_head = efficientnet_lite0(pretrained=False)
    assert random_head.pop_source_head() is None


def test_data_config_travels_with_the_weights():
    cfg = efficientnet_lite0(pretrained=False).data_config
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)
    assert cfg.interpolation == "bicubic" and cfg.input_size == (3, 224, 224)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: efficientnet_lite0(pretrained=False),
        lambda: small_cnn(),
        lambda: torchvision_backbone("resnet18", pretrained=False),
    ],
    ids=["efficientnet_lite0", "small_cnn", "torchvision_resnet18"],
)
def test_layer_groups_partition_parameters_input_to_output(factory):
    backbone = factory()
    groups = backbone.layer_groups()
    names = [n for group in groups.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in backbone.named_parameters())
    order = [n for n, _ in backbone.named_parameters()]
    firsts = [order.index(group[0]) for group in groups.values()]
    assert firsts == sorted(firsts), "groups must be ordered input -> output"
    assert len(groups) >= 3
    features = backbone(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, backbone.num_features)


def test_efficientnet_groups_are_stem_stages_head():
    groups = list(efficientnet_lite0(pretrained=False).layer_groups())
    assert groups[0] == "conv_stem+bn1"
    assert groups[1:7] == [f"blocks.{i}" for i in range(6)]
    assert groups[-1].startswith("blocks.6")


def test_unknown_model_names_are_rejected_with_choices():
    with pytest.raises(ValueError, match="not a timm model"):
        timm_backbone("efficientnet_b99")
    with pytest.raises(ValueError, match="not a torchvision classifier"):
        torchvision_backbone("resnet1000")
    with pytest.raises(ValueError, match="choices"):
        torchvision_backbone("resnet18", weights="NOPE")


@pytest.mark.parametrize(
    ("name", "family"),
    [("resnet9000", "resnet"), ("efficientnet_b99", "efficientnet"), ("ViT_base_patch16_22", "vit_base")],
)
def test_unknown_timm_names_offer_real_timm_names_close_to_them(name, family):
    """Not an empty list: timm names that exist and resemble the name, and a pattern to see more."""
    import timm

    with pytest.raises(ValueError, match=f"backbone.model_name='{name}' is not a timm model") as raised:
        timm_backbone(name)
    message = str(raised.value)
    offered = re.findall(r"'([a-z0-9_]+)'", message.split("closest timm names:")[1])
    names = [n for n in offered if timm.is_model(n)]
    assert len(names) >= 3 and all(family in n for n in names[:3]), message
    assert "timm.list_models('*" in message


def test_a_name_like_no_timm_name_says_so_and_how_to_list_them():
    with pytest.raises(ValueError) as raised:
        timm_backbone("qqqqzzzz")
    message = str(raised.value)
    assert "no timm name is close to it" in message and "timm.list_models(" in message
    assert "[]" not in message, message


def test_module_param_groups_are_named_and_split_decay():
    module = TransferModule(
        efficientnet_lite0(), LinearHead(1280, 10), 10, torch.optim.AdamW, weight_decay=0.05
    )
    optimizer = module.configure_optimizers()
    names = [g["name"] for g in optimizer.param_groups]
    assert len(names) == len(set(names))
    assert "heads.target" in names and "heads.target/no_decay" in names
    assert "backbone.conv_stem+bn1/no_decay" in names
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in module.parameters()}, "every parameter, frozen or not, is in a group"
    for group in optimizer.param_groups:
        expected = 0.0 if group["name"].endswith("/no_decay") else 0.05
        assert group["weight_decay"] == expected
        if expected:
            assert all(p.ndim > 1 for p in group["params"])
    assert not any(p.requires_grad for p in module.heads["source"].parameters())
