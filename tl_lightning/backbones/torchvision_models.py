"""torchvision classifiers as backbones, with real layer groups for the common families."""

from __future__ import annotations

import re

import torchvision
from torch import nn

from tl_lightning.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig
from tl_lightning.backbones.hub import is_offline, torch_hub_file

#: Layer-group rules, first match wins, applied to parameter names after the classifier is removed.
#: They give ResNet/ResNeXt/RegNet a stem and one group per stage, EfficientNet/MobileNet/ConvNeXt/Swin
#: a stem and one group per ``features`` entry (blocks, downsamplings, final conv), and ViT a patch
#: embedding, one group per encoder layer and its final norm. Anything else falls back to its
#: top-level module (``layer3``, ``norm``, ``classifier``).
GROUP_RULES = (
    (r"^(conv1|bn1|stem)\.", "stem"),
    (r"^features\.0\.", "stem"),
    (r"^(class_token|conv_proj\.\w+|encoder\.pos_embedding)$", "stem"),
    (r"^encoder\.layers\.(encoder_layer_\d+)\.", r"\1"),
    (r"^encoder\.ln\.", "norm"),
    (r"^(features|trunk_output)\.(\w+)\.", r"\1.\2"),
    (r"^(\w+)", r"\1"),
)


def torchvision_group_of(model: nn.Module) -> dict[str, str]:
    """Layer-group name of every parameter of a torchvision model, by :data:`GROUP_RULES`."""
    group_of = {}
    for name, _ in model.named_parameters():
        pattern, label = next((p, label) for p, label in GROUP_RULES if re.match(p, name))
        group_of[name] = re.match(pattern, name).expand(label)
    return group_of


def torchvision_backbone(
    model_name: str, weights: str | None = "DEFAULT", pretrained: bool = True
) -> Backbone:
    """A torchvision classification model by name, its last ``nn.Linear`` becoming the source head.

    The data config keeps the weights' own evaluation resize (``resize_size``, e.g. 232 before the
    224 crop of ResNet-50 V2) as ``crop_pct``. Offline, weights missing from the torch hub cache
    stop here with the file to download instead of a long retry.

    Args:
        model_name: A name from ``torchvision.models.list_models(torchvision.models)``.
        weights: A weights enum name such as ``"DEFAULT"`` or ``"IMAGENET1K_V1"`` (downloads).
        pretrained: ``False`` ignores ``weights`` and initialises randomly (the scratch strategy).

    Raises:
        ValueError: If the model or weights name is unknown; the message lists the choices.
        RuntimeError: If the weights are not cached and their host cannot be reached.

    Example::

        backbone = torchvision_backbone("resnet50", weights="IMAGENET1K_V2")
    """
    names = torchvision.models.list_models(module=torchvision.models)
    if model_name not in names:
        raise ValueError(
            f"backbone.model_name={model_name!r} is not a torchvision classifier; choices: {names}"
        )
    weights_enum = _weights_enum(model_name, weights) if pretrained and weights is not None else None
    if weights_enum is not None:
        _require_cached_or_online(model_name, weights_enum)
    model = torchvision.models.get_model(model_name, weights=weights_enum)
    classifier_path, classifier = _last_linear(model)
    _replace(model, classifier_path, nn.Identity())
    return Backbone(
        model,
        classifier.in_features,
        torchvision_data_config(weights_enum),
        torchvision_group_of(model),
        source_head=classifier if weights_enum is not None else None,
        name=model_name,
    )


def _weights_enum(model_name: str, weights: str):
    options = torchvision.models.get_model_weights(model_name)
    allowed = ["DEFAULT", *[w.name for w in options]]
    if weights not in allowed:
        raise ValueError(f"backbone.weights={weights!r} unknown for {model_name}; choices: {allowed}")
    return options[weights] if weights != "DEFAULT" else options.DEFAULT


def _require_cached_or_online(model_name: str, weights) -> None:
    path = torch_hub_file(weights.url)
    if not path.is_file() and is_offline(weights.url):
        raise RuntimeError(
            f"backbone.weights={weights.name} of {model_name} are not in the torch hub cache and this "
            f"machine is offline: download {weights.url} to {path} (set TORCH_HOME to move the cache), "
            "or pass backbone.pretrained=false"
        )


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    return linears[-1]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


def torchvision_data_config(weights) -> DataConfig:
    """Mean, std, crop, interpolation and resize (as ``crop_pct``) of a torchvision weights enum.

    Example::

        torchvision_data_config(ResNet50_Weights.IMAGENET1K_V2).resize_size()  # 232
    """
    if weights is None:
        return DataConfig(IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224))
    transforms = weights.transforms()
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    return DataConfig(
        tuple(transforms.mean),
        tuple(transforms.std),
        (3, crop, crop),
        transforms.interpolation.value,
        crop_pct=crop / resize,
    )
