"""A compact randomly initialised CNN for scratch baselines and fast tests."""

from __future__ import annotations

from torch import nn

from tl_lightning.backbones.base import Backbone, DataConfig


class _ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )


def small_cnn(
    channels: tuple[int, ...] = (16, 32, 64), input_size: int = 32, pretrained: bool = False
) -> Backbone:
    """A compact randomly initialised CNN for scratch baselines and fast tests.

    Args:
        channels: Output channels of each conv-BN-ReLU-pool block (one layer group each).
        input_size: Nominal input resolution recorded in ``data_config``.
        pretrained: Must stay ``False``: there are no weights for this network.

    Raises:
        ValueError: If ``channels`` is empty or has a non-positive entry, or ``pretrained`` is set.
    """
    if pretrained:
        raise ValueError("backbone.pretrained=true: small_cnn has no pretrained weights")
    if not channels or min(channels) <= 0:
        raise ValueError(f"backbone.channels must be positive integers, got {channels}")
    blocks = []
    in_channels = 3
    for out_channels in channels:
        blocks.append(_ConvBlock(in_channels, out_channels))
        in_channels = out_channels
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    data_config = DataConfig((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (3, input_size, input_size))
    return Backbone(
        model,
        in_channels,
        data_config,
        {name: f"block{name.split('.')[0]}" for name, _ in model.named_parameters()},
        name="small_cnn",
    )
