"""Rebuild a trained module from the description its checkpoint carries, and load its weights.

A ``train.py`` checkpoint stores ``checkpoint["tl_lightning"]`` (the resolved run config, class
names, the backbone's preprocessing). Its config nodes name what to build (``backbone``, ``head``,
``module``, ``adapter``), so the module is rebuilt by Hydra from that data alone: this file needs no
code of the room that trains (``tl_lightning.run``), which is why
``TransferModule.load_from_checkpoint`` (and so every module's) can live here, below it.
``tl_lightning.run.pipeline.rebuild_module`` builds through :func:`module_from_run_config` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

METADATA_KEY = "tl_lightning"

# Import paths of 0.1.0, before the package was regrouped into rooms -> where they live now. A
# checkpoint (or exported safetensors file) written by 0.1.0 names the old paths in its stored
# config; ``upgrade_targets`` rewrites them (every reader of a checkpoint upgrades it: here, and
# tl_lightning.run.checkpointing.load_checkpoint), and run/config_checks.py names the new path when a
# user's own config still uses an old one.
MOVED_PATHS = {
    "tl_lightning.module": "tl_lightning.modules.transfer",
    "tl_lightning.multitask": "tl_lightning.modules.multitask",
    "tl_lightning.adaptation_module": "tl_lightning.modules.domain_adaptation",
    "tl_lightning.heads": "tl_lightning.modules.heads",
    "tl_lightning.optim": "tl_lightning.modules.optim",
    "tl_lightning.adaptation": "tl_lightning.objectives.domain",
    "tl_lightning.pcgrad": "tl_lightning.objectives.pcgrad",
    "tl_lightning._fisher_hooks": "tl_lightning.fisher.layer_hooks",
    "tl_lightning.peft_adapters": "tl_lightning.adapters.peft",
    "tl_lightning.merging": "tl_lightning.adapters.merging",
    # the checkpoint-level half of 0.1.0's merging.py
    "tl_lightning.merging.BACKBONE_PREFIX": "tl_lightning.run.merge.BACKBONE_PREFIX",
    "tl_lightning.merging.CheckpointBases": "tl_lightning.run.merge.CheckpointBases",
    "tl_lightning.merging.backbone_state": "tl_lightning.run.merge.backbone_state",
    "tl_lightning.merging.finetuned_backbone_state": "tl_lightning.run.merge.finetuned_backbone_state",
    "tl_lightning.merging.merge_checkpoints": "tl_lightning.run.merge.merge_checkpoints",
    "tl_lightning.transferability": "tl_lightning.analysis.transferability",
    "tl_lightning.pipeline": "tl_lightning.run.pipeline",
    "tl_lightning.config_checks": "tl_lightning.run.config_checks",
    "tl_lightning.checkpointing": "tl_lightning.run.checkpointing",
    "tl_lightning.run_lock": "tl_lightning.run.lock",
    "tl_lightning.run_guards": "tl_lightning.run.guards",
    "tl_lightning.hydra_callbacks": "tl_lightning.run.hydra_callbacks",
    "tl_lightning.feature_cache": "tl_lightning.run.feature_cache",
    "tl_lightning.inference": "tl_lightning.run.inference",
    "tl_lightning.backbones.checkpoint": "tl_lightning.run.source_checkpoint",
    "tl_lightning.backbones.from_checkpoint": "tl_lightning.run.source_checkpoint.from_checkpoint",
}
SOURCE_HEAD = "heads.source."


def module_from_run_config(
    config: dict, num_classes: int | Mapping[str, int], data_config: dict | None = None
) -> nn.Module:
    """The module a run's resolved config describes, with fresh weights, to load a checkpoint into.

    The checkpoint holds every weight, so the backbone is built with ``pretrained=false`` (nothing
    is downloaded or read), a backbone wrapping another (``backbone=source_checkpoint``) is built from
    its inner ``backbone`` node, and no source head is attached (it only comes with pretrained
    weights and is not part of the fine-tuned model). With an ``adapter`` (``strategy=lora|ia3``)
    the checkpoint holds only what trained, so the base is built from its pretrained weights and
    wrapped by the ``adapter`` node's factory. A multi-task module gets one head per task.

    Args:
        config: ``checkpoint["tl_lightning"]["config"]`` (plain data, interpolations resolved).
        num_classes: Number of target classes, or task name -> number of classes (multi-task).
        data_config: ``checkpoint["tl_lightning"]["data_config"]``: a text backbone recorded with
            ``pooling: auto`` is rebuilt with the pooling the run resolved and trained with.

    Raises:
        ValueError: If ``config`` lacks the ``backbone``, ``head`` or ``module`` node, naming it.

    Example::

        module = module_from_run_config(metadata["config"], len(metadata["class_names"]))
    """
    cfg = OmegaConf.create(config)
    missing = [key for key in ("backbone", "head", "module") if not isinstance(cfg.get(key), DictConfig)]
    if missing:
        raise ValueError(f"the stored run config has no {missing} node; it needs backbone, head and module")
    node = cfg.backbone
    while isinstance(node.get("backbone"), DictConfig) and "_target_" in node.backbone:
        node = node.backbone
    if "pretrained" in node and cfg.get("adapter") is None:
        node = OmegaConf.merge(node, {"pretrained": False})
    if node.get("pooling") == "auto" and (data_config or {}).get("pooling"):
        node = OmegaConf.merge(node, {"pooling": data_config["pooling"]})
    backbone = instantiate(node)
    if cfg.get("adapter") is not None:
        backbone = instantiate(cfg.adapter, backbone=backbone)
    backbone.pop_source_head()
    if isinstance(num_classes, Mapping):
        heads = {task: build_head(cfg.head, backbone.num_features, n) for task, n in num_classes.items()}
        num_classes = dict(num_classes)
    else:
        heads = build_head(cfg.head, backbone.num_features, num_classes)
    return instantiate(cfg.module, backbone=backbone, head=heads, num_classes=num_classes)


def build_head(head_cfg: DictConfig, num_features: int, num_classes: int) -> nn.Module:
    """The ``head`` node built for the backbone's feature size and the class count (sizes it names are
    replaced; ``train`` first checks that they agree).

    Example::

        head = build_head(OmegaConf.create({"_target_": "tl_lightning.modules.LinearHead"}), 1280, 10)
    """
    kept = OmegaConf.masked_copy(head_cfg, [k for k in head_cfg if k not in ("in_features", "num_classes")])
    return instantiate(kept, in_features=num_features, num_classes=num_classes)


def load_run_weights(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, adapter: bool = False
) -> None:
    """Load every weight of ``module`` from ``state_dict``; the source head (not rebuilt) is left out.

    An adapter checkpoint (``strategy=lora|ia3``) leaves the frozen base out: a frozen parameter or a
    backbone buffer the state lacks keeps the value the rebuild gave it (its pretrained weight).

    Args:
        module: From :func:`module_from_run_config`.
        state_dict: ``checkpoint["state_dict"]`` or an exported file's tensors.
        source: The file the weights come from, for error messages.
        adapter: The run config has an ``adapter``: the frozen base may be left out of ``state_dict``.

    Raises:
        ValueError: If the weights do not fit ``module`` (missing, unexpected or mis-shaped keys),
            naming ``source`` and the first keys of each kind.
    """
    own = module.state_dict()
    weights = {k: v for k, v in state_dict.items() if k in own or not k.startswith(SOURCE_HEAD)}
    # every name of a frozen tensor: a tied LM head is the embedding matrix under a second name
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    frozen |= {f"backbone.{n}" for n, _ in getattr(module, "backbone", nn.Module()).named_buffers()}
    missing = sorted(set(own) - set(weights) - (frozen if adapter else set()))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source!r} does not fit the model its config describes: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}"
        )
    module.load_state_dict({**{k: own[k] for k in set(own) - set(weights)}, **weights})


def load_run_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the module of a ``train.py`` checkpoint and load its weights (``weights_only=True``).

    Args:
        path: A ``checkpoints/*.ckpt`` file of a run.

    Returns:
        ``(module, checkpoint["tl_lightning"])``: the module in eval mode on the CPU, and the run's
        description.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file lacks ``checkpoint["tl_lightning"]`` (not written by ``train.py``) or its
            weights do not fit, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    metadata = upgrade_metadata(checkpoint.get(METADATA_KEY)) if isinstance(checkpoint, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("config"), dict):
        raise ValueError(
            f"{str(path)!r} has no {METADATA_KEY!r} run description (written by train.py): pass the "
            "module's constructor arguments (backbone=..., head=..., num_classes=..., optimizer=...)"
        )
    module = module_from_run_config(
        metadata["config"], run_num_classes(checkpoint), metadata.get("data_config")
    )
    adapter = metadata["config"].get("adapter") is not None
    load_run_weights(module, checkpoint.get("state_dict") or {}, str(path), adapter)
    return module.eval(), metadata


def run_num_classes(checkpoint: Mapping) -> int | dict[str, int]:
    """The module's ``num_classes`` argument: as its hyper-parameters recorded it (a task -> count mapping
    for a multi-task module), else the number of stored class names."""
    recorded = (checkpoint.get("hyper_parameters") or {}).get("num_classes")
    if isinstance(recorded, Mapping):
        return dict(recorded)
    return int(recorded) if recorded is not None else len(checkpoint[METADATA_KEY]["class_names"])


def moved_path(target: str) -> str | None:
    """Where the 0.1.0 import path ``target`` lives now, or ``None`` if it did not move.

    Example::

        moved_path("tl_lightning.module.TransferModule")  # 'tl_lightning.modules.transfer.TransferModule'
    """
    for old in sorted(MOVED_PATHS, key=len, reverse=True):
        if target == old or target.startswith(old + "."):
            return MOVED_PATHS[old] + target[len(old) :]
    return None


def upgrade_targets(config: Any) -> Any:
    """A copy of a stored config (plain data) whose ``_target_`` values name today's import paths."""
    if isinstance(config, dict):
        upgraded = {key: upgrade_targets(value) for key, value in config.items()}
        target = upgraded.get("_target_")
        if isinstance(target, str) and moved_path(target) is not None:
            upgraded["_target_"] = moved_path(target)
        return upgraded
    if isinstance(config, list):
        return [upgrade_targets(value) for value in config]
    return config


def upgrade_metadata(metadata: Any) -> Any:
    """``checkpoint["tl_lightning"]`` with its stored config upgraded (:func:`upgrade_targets`); other
    values, a missing config included, are returned as they are."""
    if isinstance(metadata, dict) and isinstance(metadata.get("config"), dict):
        return {**metadata, "config": upgrade_targets(metadata["config"])}
    return metadata
