"""Cut a backbone after one of its layer groups: "use only the lower layers" as one argument."""

from __future__ import annotations

import torch
from torch import nn

from tl_lightning.backbones.base import Backbone

FEATURES = "features"


class CutModel(nn.Module):
    """The layers of a model up to a cut, then global average pooling of their output.

    Args:
        trunk: A traced feature extractor returning ``{"features": tensor}`` at the cut.
        cut_at: Name of the layer group the model is cut after (kept for descriptions).
        channels_last: The output at the cut is ``(B, H, W, C)`` (timm's ``output_fmt="NHWC"``
            models, e.g. Swin) rather than ``(B, C, H, W)``.
    """

    def __init__(self, trunk: nn.Module, cut_at: str, channels_last: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.cut_at = cut_at
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool(self.trunk(x)[FEATURES], self.channels_last)


def pool(features: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``(B, C, H, W)`` -> mean over ``H, W``; ``(B, tokens, C)`` -> mean over tokens; ``(B, C)`` as is."""
    if features.dim() == 4:
        return features.mean((1, 2) if channels_last else (2, 3))
    if features.dim() == 3:
        return features.mean(1)
    return features


def cut_module(model: nn.Module, group: list[str]) -> str:
    """The module whose output ends ``group`` (parameter names of ``model``, ordered input -> output).

    Starts at the module owning the group's last parameter and climbs while the ancestor holds
    only parameters of the group: ``blocks.4.2.bn3.bias`` in group ``blocks.4`` gives ``blocks.4``,
    ``bn1.bias`` in group ``conv_stem+bn1`` gives ``bn1``.
    """
    members = set(group)
    parts = group[-1].split(".")[:-1]
    chosen = ".".join(parts)
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        names = {name for name, _ in model.get_submodule(prefix).named_parameters(prefix=prefix)}
        if not names <= members:
            break
        chosen = prefix
    return chosen


def cut_backbone(backbone: Backbone, cut_at: str) -> Backbone:
    """A new backbone: ``backbone``'s layers up to and including group ``cut_at``, globally pooled.

    The layers after the cut are gone (not merely unused), so are their layer groups; the source
    head is dropped (it reads the full network's features); ``num_features`` is the width at the
    cut. The model is traced with ``torch.fx`` (timm's leaf modules and functions are respected),
    so any backbone whose forward traces can be cut, timm and torchvision CNNs and ViTs included.

    Args:
        backbone: The full backbone.
        cut_at: A name from ``backbone.layer_groups()``.

    Raises:
        ValueError: If ``cut_at`` is not a layer group, listing the groups in order.

    Example::

        lower = cut_backbone(efficientnet_lite0(), "blocks.4")  # lower.num_features == 112
    """
    groups = {
        name: [p.removeprefix("model.") for p in params] for name, params in backbone.layer_groups().items()
    }
    if cut_at not in groups:
        raise ValueError(
            f"backbone.cut_at={cut_at!r} is not a layer group of {backbone.name}; groups, input -> output: "
            f"{list(groups)}"
        )
    from timm.models._features_fx import create_feature_extractor

    model = backbone.model
    trunk = create_feature_extractor(model, {cut_module(model, groups[cut_at]): FEATURES})
    cut = CutModel(trunk, cut_at, channels_last=getattr(model, "output_fmt", "NCHW") == "NHWC")
    kept = {name for name, _ in trunk.named_parameters()}
    group_of = {
        f"trunk.{name}": backbone._group_of[name] for name, _ in model.named_parameters() if name in kept
    }
    num_features = _width(cut, backbone.data_config.input_size)
    return Backbone(cut, num_features, backbone.data_config, group_of, None, name=f"{backbone.name}@{cut_at}")


def _width(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Feature width from one forward pass on zeros in eval mode (BatchNorm statistics untouched)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        width = model(torch.zeros(1, *input_size)).shape[-1]
    model.train(was_training)
    return int(width)
