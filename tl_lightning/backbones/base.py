"""The :class:`Backbone` contract: a feature extractor that carries its preprocessing and layer groups."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing the backbone's weights expect.

    Args:
        mean: Per-channel mean subtracted after scaling pixels to ``[0, 1]``.
        std: Per-channel standard deviation.
        input_size: ``(channels, height, width)`` the weights were trained at.
        interpolation: Resize mode name understood by ``torch.nn.functional.interpolate``.
        crop_pct: Share of the resized image the evaluation centre crop keeps: images are resized
            to :meth:`resize_size` and then centre-cropped to the input size (timm's ``crop_pct``;
            torchvision's ``resize_size`` 232 for a 224 crop is ``224 / 232``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"data_config.crop_pct must be in (0, 1], got {self.crop_pct}")

    def resize_size(self, crop_size: int | None = None) -> int:
        """Shorter-side length to resize to before centre-cropping ``crop_size`` (default: the input size).

        Example::

            DataConfig(IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224), crop_pct=0.875).resize_size()  # 256
        """
        size = crop_size or self.input_size[-1]
        return math.floor(size / self.crop_pct + 1e-6)  # the epsilon keeps 224 / (224 / 232) at 232

    def as_dict(self) -> dict:
        return asdict(self)


class Backbone(nn.Module):
    """A feature extractor with its preprocessing, layer groups and optional source head.

    Args:
        model: Module mapping ``(B, C, H, W)`` images to ``(B, num_features)`` features.
        num_features: Size of the feature vector.
        data_config: The preprocessing the weights expect.
        group_of: Layer-group name of every parameter name of ``model``. Groups are ordered by the
            first appearance of their parameters, i.e. input -> output.
        source_head: The pretrained classifier on top of ``model``, if the weights bring one.
        name: Human-readable identifier (logged with the run).
        peft_targets: Names of the sub-modules of ``model`` a PEFT adapter (``strategy=lora|ia3``)
            attaches to by default, matched as PEFT's ``target_modules`` list (a module whose path is
            or ends with ``.<name>``); ``None`` when the factory declares none.
    """

    def __init__(
        self,
        model: nn.Module,
        num_features: int,
        data_config: DataConfig,
        group_of: dict[str, str],
        source_head: nn.Module | None = None,
        name: str = "backbone",
        peft_targets: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_features = num_features
        self.data_config = data_config
        self.name = name
        self._group_of = group_of
        self.peft_targets = list(peft_targets) if peft_targets is not None else None
        self.set_source_head(source_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def layer_groups(self) -> dict[str, list[str]]:
        """Parameter names (relative to this module) per layer group, ordered input -> output."""
        groups: dict[str, list[str]] = {}
        for name, _ in self.model.named_parameters():
            groups.setdefault(self._group_of[name], []).append(f"model.{name}")
        return groups

    def set_source_head(self, head: nn.Module | None) -> None:
        """Give the backbone a source classifier, e.g. one trained on an earlier task.

        The head is held, not registered as a sub-module: it is no part of the feature extractor,
        so it stays out of this module's ``state_dict``, parameters and selectors until a
        ``TransferModule`` takes it with :meth:`pop_source_head`.
        """
        object.__setattr__(self, "_source_head", head)

    def pop_source_head(self) -> nn.Module | None:
        """Hand over the pretrained classifier (once); ``None`` when the weights brought none."""
        head = self._source_head
        self.set_source_head(None)
        return head


def copy_linear(layer: nn.Module) -> nn.Linear:
    """A standalone copy of a linear classifier (the source head)."""
    copy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    copy.load_state_dict(layer.state_dict())
    return copy
