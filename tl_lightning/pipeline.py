"""``train(cfg)``: the one place that turns a composed Hydra config into objects and runs them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from tl_lightning.checkpointing import (
    METADATA_KEY,
    AtomicCheckpointIO,
    RunMetadata,
    load_checkpoint,
    run_metadata,
)
from tl_lightning.feature_cache import MODES, CachedFeatureDataModule, cache_applies

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Fit, test the best checkpoint, write ``metrics.json`` and return the monitored metric.

    Steps: 1. check the config; 2. seed; 3. build backbone -> data -> head -> module -> callbacks,
    loggers, trainer; 4. fit (optionally resuming from ``ckpt_path``); 5. test the best checkpoint;
    6. write ``metrics.json`` in ``paths.output_dir`` (global rank 0 only).

    Args:
        cfg: The composed config (``conf/train.yaml``).

    Returns:
        The best value of ``cfg.monitor`` (for Hydra sweepers), or ``None`` if never logged.

    Raises:
        ValueError: On a bad config value or a checkpoint from another model, before training.
    """
    started = time.perf_counter()
    _check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    backbone = instantiate(cfg.backbone)
    datamodule = instantiate(cfg.data, data_config=backbone.data_config)
    datamodule.setup("fit")  # an empty or corrupt dataset stops here, before any model work
    head = _build_head(cfg.head, backbone.num_features, datamodule.num_classes)
    module = instantiate(cfg.module, backbone=backbone, head=head, num_classes=datamodule.num_classes)
    callbacks = _instantiate_group(cfg.callbacks, "callbacks")
    callbacks.append(RunMetadata(_run_metadata(cfg, backbone, datamodule)))
    loggers = _instantiate_group(cfg.logger, "logger")
    cached = _feature_cache_mode(cfg, callbacks, datamodule)
    if cached != "off":
        cache_dir = Path(cfg.paths.cache_dir) / "features" if cached == "disk" else None
        datamodule = CachedFeatureDataModule(datamodule, backbone, cache_dir)
        module.use_cached_features()
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    if cfg.ckpt_path:
        _check_resume(cfg, module)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    final_val = _scalars(trainer.callback_metrics, prefix="val/") | _scalars(
        trainer.callback_metrics, "source/"
    )
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
    test_results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)

    best = _best_score(checkpoint, final_val, cfg.monitor)
    if trainer.is_global_zero:
        metrics = {
            "strategy": cfg.strategy_name,
            "feature_cache": cached,
            "train_examples_per_class": round(len(datamodule.train_set) / datamodule.num_classes, 1),
            "monitor": cfg.monitor,
            "best": {cfg.monitor: best},
            "final": final_val,
            "test": test_results[0] if test_results else {},
            "best_checkpoint": best_path,
            "wall_time_s": round(time.perf_counter() - started, 2),
            "params": _parameter_counts(module),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        out = Path(cfg.paths.output_dir) / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2))
        log.info("metrics written to %s: test %s", out, metrics["test"])
    return best


def _check_config(cfg: DictConfig) -> None:
    """Reject values that would only fail (or silently misbehave) after training started."""
    optimizer = cfg.module.optimizer
    for key in ("lr", "weight_decay"):
        value = optimizer.get(key)
        if value is not None and (value < 0 or (key == "lr" and value == 0)):
            raise ValueError(
                f"module.optimizer.{key} must be {'> 0' if key == 'lr' else '>= 0'}, got {value}"
            )
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")


def _run_metadata(cfg: DictConfig, backbone, datamodule) -> dict:
    """``checkpoint["tl_lightning"]`` for this run (see ``tl_lightning.checkpointing.run_metadata``)."""
    class_names = getattr(datamodule, "class_names", None) or [str(i) for i in range(datamodule.num_classes)]
    return run_metadata(
        OmegaConf.to_container(cfg, resolve=True),
        cfg.strategy_name,
        class_names,
        backbone.data_config.as_dict(),
    )


def _feature_cache_mode(cfg: DictConfig, callbacks: list, datamodule) -> str:
    """Resolve ``feature_cache`` (auto|off|memory|disk) against what the run actually does.

    Raises:
        ValueError: On an unknown mode, or when caching is forced but the backbone trains or the
            training inputs are random.
    """
    mode = cfg.feature_cache
    if mode not in MODES:
        raise ValueError(f"feature_cache={mode!r} is not one of {list(MODES)}")
    applies = cache_applies(callbacks, datamodule)
    if mode == "auto":
        return "memory" if applies else "off"
    if mode != "off" and not applies:
        raise ValueError(
            f"feature_cache={mode} needs a frozen backbone (strategy=linear_probe) and data.augment=false"
        )
    return mode


def _build_head(head_cfg: DictConfig, num_features: int, num_classes: int) -> torch.nn.Module:
    """The head gets its sizes from the backbone and the data; an explicit mismatch is an error."""
    for key, actual in (("in_features", num_features), ("num_classes", num_classes)):
        given = head_cfg.get(key)
        if given is not None and given != actual:
            source = "the backbone's feature size" if key == "in_features" else "the data's class count"
            raise ValueError(f"head.{key}={given} does not match {source} ({actual}); remove the key")
    head_cfg = OmegaConf.masked_copy(
        head_cfg, [k for k in head_cfg if k not in ("in_features", "num_classes")]
    )
    return instantiate(head_cfg, in_features=num_features, num_classes=num_classes)


def _instantiate_group(group: DictConfig | None, key: str) -> list:
    """Instantiate every entry of a name -> ``_target_`` mapping; ``null`` entries are switched off.

    Raises:
        ValueError: If an entry has no ``_target_`` (never skipped silently).
    """
    objects = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(
                f"{key}.{name} has no _target_; set one or disable the entry with {key}.{name}=null"
            )
        objects.append(instantiate(node))
    return objects


def _check_resume(cfg: DictConfig, module: torch.nn.Module) -> None:
    """Stop before training when ``cfg.ckpt_path`` is unreadable, from another model or another strategy."""
    checkpoint = load_checkpoint(cfg.ckpt_path)
    check_checkpoint_matches(checkpoint, module, cfg.ckpt_path)
    check_same_strategy(checkpoint, cfg.strategy_name, cfg.allow_strategy_change, cfg.ckpt_path)


def check_checkpoint_matches(checkpoint: dict, module: torch.nn.Module, path: str) -> None:
    """Stop before training when a checkpoint's weights do not fit ``module``.

    Raises:
        ValueError: Naming the checkpoint and the first mismatched parameters.
    """
    state = checkpoint.get("state_dict", {})
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if missing or unexpected or shapes:
        raise ValueError(
            f"ckpt_path={path!r} was saved from another model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}"
        )


def check_same_strategy(checkpoint: dict, strategy: str, allow_change: bool, path: str) -> None:
    """Stop before training when resuming a checkpoint written under another strategy.

    A different strategy means different callbacks (freezing, layer-wise learning rates, penalties),
    whose saved state would silently be dropped or misapplied. Checkpoints without
    ``checkpoint["tl_lightning"]`` (written outside ``train``) are not checked.

    Raises:
        ValueError: Naming both strategies and the ``allow_strategy_change`` opt-out.
    """
    saved = checkpoint.get(METADATA_KEY, {}).get("strategy")
    if saved is None or saved == strategy:
        return
    if allow_change:
        log.warning(
            "resuming a strategy=%s checkpoint under strategy=%s (allow_strategy_change)", saved, strategy
        )
        return
    raise ValueError(
        f"ckpt_path={path!r} was written by strategy={saved}, but this run is strategy={strategy}; "
        f"resume with strategy={saved}, or set allow_strategy_change=true to continue under {strategy}"
    )


def _scalars(metrics: dict, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _best_score(checkpoint, final_val: dict[str, float], monitor: str) -> float | None:
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    return final_val.get(monitor)


def _parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }
