"""``train(cfg)``: the one place that turns a composed Hydra config into objects and runs them."""

from __future__ import annotations

import copy
import errno
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from tl_lightning.backbones import TextConfig
from tl_lightning.callbacks._resume import check_resume_callbacks
from tl_lightning.data.text import TextDataModule
from tl_lightning.modules.multitask import MultiTaskModule
from tl_lightning.modules.rebuild import build_head, module_from_run_config
from tl_lightning.run.checkpointing import (
    METADATA_KEY,
    AsyncAtomicCheckpointIO,
    RunMetadata,
    WaitForCheckpointWrites,
    load_checkpoint,
    plain_data_config,
    remove_partial_checkpoints,
    run_metadata,
)
from tl_lightning.run.config_checks import check_config
from tl_lightning.run.feature_cache import (
    MODES,
    CachedFeatureDataModule,
    EvaluateOnCachedFeatures,
    cache_applies,
    evaluation_cache_applies,
)
from tl_lightning.run.guards import FiniteLossGuard
from tl_lightning.run.lock import RunLock
from tl_lightning.run.sharding import is_sharded_trainer
from tl_lightning.run.sync_batchnorm import NormActSyncBatchNorm

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Fit, test the best checkpoint, write ``metrics.json`` and return the monitored metric.

    Steps: 1. check the config; 2. lock ``paths.output_dir`` (one run per directory); 3. seed;
    4. build backbone -> data -> head -> module -> callbacks, loggers, trainer; 5. fit (optionally
    resuming from ``ckpt_path``; a non-finite loss stops it); 6. test the best checkpoint; 7. write
    ``metrics.json`` in ``paths.output_dir`` (global rank 0 only, strict JSON: NaN becomes ``null``).

    Args:
        cfg: The composed config (``conf/train.yaml``).

    Returns:
        The best value of ``cfg.monitor`` (for Hydra sweepers), or ``None`` if never logged.

    Raises:
        ValueError: On a bad config value, a checkpoint from another model or strategy, or a
            strategy schedule the run is too short for, before training.
        FileNotFoundError: On a missing ``ckpt_path`` or EWC ``fisher_path``, before training.
        PermissionError: If ``paths.output_dir`` is not writable, before training.
        RunDirectoryLocked: If another run uses ``paths.output_dir``, before training.
        FloatingPointError: When the training loss becomes NaN or infinite.
    """
    started = time.perf_counter()
    check_config(cfg)
    with _run_directory_lock(cfg.paths.output_dir):
        return _fit_and_test(cfg, started)


def _fit_and_test(cfg: DictConfig, started: float) -> float | None:
    """Steps 3-7 of ``train``, inside the run directory's lock."""
    pl.seed_everything(cfg.seed, workers=True)

    backbone = _with_adapter(cfg, instantiate(cfg.backbone))
    _check_modality(cfg, backbone)
    datamodule = instantiate(cfg.data, data_config=backbone.data_config)
    datamodule.prepare_data()  # downloads (torchvision data), before the ranks read it in setup()
    datamodule.setup("fit")  # an empty or corrupt dataset stops here, before any model work
    head, num_classes = _build_heads(cfg, backbone.num_features, datamodule)
    module = instantiate(cfg.module, backbone=backbone, head=head, num_classes=num_classes)
    _keep_changed_only(cfg, module)
    cfg = _with_monitor_mode(cfg, module)
    loggers = _instantiate_group(cfg.logger, "logger")
    callbacks = _pipeline_callbacks(cfg, _instantiate_group(cfg.callbacks, "callbacks"), loggers)
    if OmegaConf.select(cfg, "adapter") is not None:
        from tl_lightning.adapters.peft import check_adapter_callbacks

        check_adapter_callbacks(callbacks, cfg.strategy_name)
    callbacks += [RunMetadata(_run_metadata(cfg, backbone, datamodule)), _ParameterCountLog()]
    curation = _curation_summary(datamodule)  # data.exclude / data.label_noise, for metrics.json
    cached = _feature_cache_mode(cfg, callbacks, datamodule, module)
    if cached != "off":
        cache_dir = Path(cfg.paths.cache_dir) / "features" if cached == "disk" else None
        splits = ("val", "test") if cached == "evaluation" else ("train", "val", "test")
        datamodule = CachedFeatureDataModule(
            datamodule, backbone, cache_dir, OmegaConf.to_container(cfg.backbone, resolve=True), splits=splits
        )
        if cached == "evaluation":  # training keeps its random inputs; the callback switches per stage
            callbacks.append(EvaluateOnCachedFeatures())
        else:
            module.use_cached_features()
    trainer: pl.Trainer = instantiate(  # the callback: ModelCheckpoint sees pending writes when naming files
        cfg.trainer,
        callbacks=[*callbacks, WaitForCheckpointWrites()],
        logger=loggers or False,
        plugins=_trainer_plugins(cfg),
    )
    if cfg.ckpt_path:
        _check_resume(cfg, module, trainer.callbacks)
    _log_run_config(cfg, trainer.loggers, module)  # after the checks: a run stopped by one leaves no trace

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
            # None: raw text, or free-text responses (task=causal_lm)
            "train_examples_per_class": (
                round(len(datamodule.train_set) / datamodule.num_classes, 1)
                if datamodule.num_classes
                else None
            ),
            "monitor": cfg.monitor,
            "best": {cfg.monitor: best},
            "final": final_val,
            "test": {k: v for results in test_results for k, v in results.items()},  # every test loader
            "best_checkpoint": best_path,
            "wall_time_s": round(time.perf_counter() - started, 2),
            "params": _parameter_counts(module),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        if curation:
            metrics["curation"] = curation
        out = Path(cfg.paths.output_dir) / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(metrics), indent=2, allow_nan=False))
        log.info("metrics written to %s: test %s", out, metrics["test"])
    return best


@contextmanager
def _run_directory_lock(output_dir: str) -> Iterator[None]:
    """Hold ``output_dir``'s ``RunLock`` in the launching process (global rank 0) only.

    DDP ranks > 0 (started by Lightning's launcher or torchrun, which set ``RANK``/``LOCAL_RANK``)
    re-run ``train`` inside the same run and must not compete for the lock rank 0 holds.

    Raises:
        PermissionError: If ``output_dir`` cannot be written, saying so.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    lock = RunLock(output_dir)
    try:
        lock.acquire()
    except PermissionError as error:
        raise PermissionError(
            f"paths.output_dir={output_dir!r} is not writable ({error.strerror}): choose a writable "
            f"directory with paths.output_dir=... (or hydra.run.dir=... with train.py)"
        ) from error
    except OSError as error:
        if error.errno != errno.EROFS:
            raise
        raise PermissionError(
            f"paths.output_dir={output_dir!r} is on a read-only file system: choose a writable "
            f"directory with paths.output_dir=... (or hydra.run.dir=... with train.py)"
        ) from error
    try:
        yield
    finally:
        lock.release()


def _curation_summary(datamodule) -> dict:
    """What ``data.exclude`` / ``data.exclude_top`` / ``data.label_noise`` did to the training split
    (rows excluded and the file, labels flipped); empty when nothing was done or the data has no such keys."""
    curated = getattr(datamodule, "curated", None)
    return dict(curated.summary) if curated is not None else {}


def _trainer_plugins(cfg: DictConfig) -> list:
    """Atomic checkpoint writes in a background thread always; with ``trainer.sync_batchnorm=true``, a
    conversion that keeps timm's fused BatchNorm + activation layers (Lightning's own drops the activations).

    Raises:
        ValueError: On ``trainer.sync_batchnorm=true`` with ``trainer.accelerator=cpu`` (torch's
            ``SyncBatchNorm`` runs on GPUs only).
    """
    plugins = [AsyncAtomicCheckpointIO()]
    if OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False):
        if OmegaConf.select(cfg, "trainer.accelerator") == "cpu":
            raise ValueError(
                "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU kernel): use "
                "trainer=ddp, or set trainer.sync_batchnorm=false with trainer.accelerator=cpu"
            )
        plugins.append(NormActSyncBatchNorm())
    return plugins


def _check_modality(cfg: DictConfig, backbone: torch.nn.Module) -> None:
    """Text backbones (``data_config`` a ``TextConfig``) need text data, image backbones image data.

    Raises:
        ValueError: Naming both ``_target_`` values and the configs that fit.
    """
    text_backbone = isinstance(backbone.data_config, TextConfig)
    text_data = issubclass(get_class(cfg.data._target_), TextDataModule)
    if text_backbone != text_data:
        backbone_kind, data_kind = ("text", "image") if text_backbone else ("image", "text")
        fits = "data=rotten_tomatoes|text_files|hf_dataset" if text_backbone else "backbone=hf_encoder"
        raise ValueError(
            f"backbone {cfg.backbone._target_} takes {backbone_kind} but data {cfg.data._target_} gives "
            f"{data_kind}: use {fits}"
        )


def _with_monitor_mode(cfg: DictConfig, module: torch.nn.Module) -> DictConfig:
    """Check ``monitor`` against what the module logs and resolve ``monitor_mode: auto`` from it.

    Returns:
        ``cfg`` itself, or a copy with ``monitor_mode`` set to ``min`` or ``max``.

    Raises:
        ValueError: On a metric the module does not log (listing those it does), or a mode that
            would keep the worst checkpoint.
    """
    modes = module.monitor_modes() if hasattr(module, "monitor_modes") else {}
    if modes and cfg.monitor not in modes:
        raise ValueError(
            f"monitor={cfg.monitor!r} is not a metric {type(module).__name__} logs; one of {list(modes)}"
        )
    derived = modes.get(cfg.monitor)
    if cfg.monitor_mode == "auto":
        if derived is None:
            raise ValueError(
                f"monitor_mode=auto cannot tell whether {cfg.monitor} is better high or low; set min or max"
            )
        cfg = copy.deepcopy(cfg)  # the caller's config stays as given
        cfg.monitor_mode = derived
    elif derived is not None and cfg.monitor_mode != derived:
        raise ValueError(
            f"monitor_mode={cfg.monitor_mode} would keep the worst {cfg.monitor} checkpoint "
            f"({cfg.monitor} is better when {'lower' if derived == 'min' else 'higher'}); "
            f"set monitor_mode={derived} or auto"
        )
    return cfg


@rank_zero_only
def _log_run_config(cfg: DictConfig, loggers: list, module: torch.nn.Module) -> None:
    """Give every logger the resolved config as hyper-parameters, so trackers can group runs by them.

    Called once every check has passed, just before fitting (a tracker run is opened by the first call).

    The config is flattened to dotted keys (``strategy_name``, ``module.optimizer.lr``,
    ``backbone.model_name``, ``data.train_per_class``, ``seed``, ``trainer.max_epochs``, ...) with plain
    values (lists as their text); the ``logger`` node itself is left out (a tracking URI may carry a
    token). The module's own hyper-parameters (``save_hyperparameters``) come along, under their names:
    Lightning logs them again when fitting starts, with the same values, and TensorBoard's hparams
    dashboard keeps the first set a run writes.
    """
    if not loggers:
        return
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("logger", None)
    params = dict(getattr(module, "hparams_initial", {}))
    stack = [("", resolved)]
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict) and value:
                stack.append((f"{prefix}{key}.", value))
            else:
                params[f"{prefix}{key}"] = str(value) if isinstance(value, list | dict) else value
    for logger in loggers:
        logger.log_hyperparams(dict(sorted(params.items())))


def _pipeline_callbacks(cfg: DictConfig, callbacks: list, loggers: list) -> list:
    """The configured callbacks, adjusted to the run, plus the guards every run gets.

    * ``LearningRateMonitor`` needs a logger: with ``logger=none`` it is left out (logged at INFO).
    * A ``FiniteLossGuard`` stops a run whose training loss goes NaN or infinite.
    * Partial checkpoint files of killed runs are removed from checkpoint directories (rank 0, which
      holds the run directory's lock).
    """
    if not loggers:
        dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
        if dropped:
            log.info("logger=none: leaving out LearningRateMonitor, which needs a logger")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if rank_zero_only.rank == 0:
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                for path in remove_partial_checkpoints(callback.dirpath):
                    log.warning("removed %s, a partial checkpoint of an interrupted run", path)
    # progress bars last: at on_train_epoch_end the bar computes the epoch's synced metrics on rank 0 only,
    # so a callback's collectives after it (LayerDriftMonitor under trainer=fsdp) would meet that sync
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)] + bars
    lr = OmegaConf.select(cfg, "module.optimizer.lr", default=None)
    hint = f"Lower module.optimizer.lr (now {lr}) or check the data for NaN/inf values."
    return [*callbacks, FiniteLossGuard(hint)]


def _run_metadata(cfg: DictConfig, backbone, datamodule) -> dict:
    """``checkpoint["tl_lightning"]`` for this run (see ``tl_lightning.run.checkpointing.run_metadata``)."""
    class_names = getattr(datamodule, "class_names", None) or [str(i) for i in range(datamodule.num_classes)]
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("logger", None)  # a tracking URI may carry a token; a checkpoint or an export travels
    if (config.get("data") or {}).get("max_length") == "data":  # the limit chosen from the training texts
        config["data"]["max_length"] = datamodule.used_max_length  # is what predict and exports must use
    return run_metadata(
        config,
        cfg.strategy_name,
        class_names,
        backbone.data_config.as_dict(),
    )


def _feature_cache_mode(cfg: DictConfig, callbacks: list, datamodule, module) -> str:
    """Resolve ``feature_cache`` (auto|off|memory|disk) against what the run actually does.

    ``auto`` gives ``memory`` (every split on cached features), ``evaluation`` (a frozen backbone with
    random training inputs: validation and test on cached features, training on the images) or ``off``.

    Raises:
        ValueError: On an unknown mode, or when caching is forced but the backbone trains or the
            training inputs are random.
    """
    mode = cfg.feature_cache
    if mode not in MODES:
        raise ValueError(f"feature_cache={mode!r} is not one of {list(MODES)}")
    applies = cache_applies(callbacks, datamodule, module)
    if mode == "auto":  # under FSDP2 the frozen backbone is sharded and run, not cached (run/sharding.py)
        if is_sharded_trainer(cfg):
            return "off"
        if applies:
            return "memory"
        return "evaluation" if evaluation_cache_applies(callbacks, datamodule, module) else "off"
    if mode != "off" and not applies:
        raise ValueError(
            f"feature_cache={mode} needs a frozen backbone (strategy=linear_probe) and data.augment=false"
        )
    return mode


def _build_heads(cfg: DictConfig, num_features: int, datamodule) -> tuple:
    """``(head, num_classes)`` for the module: one head per task for multi-task data (``task_classes``).

    Raises:
        ValueError: If multi-task data meets a module that is not a ``MultiTaskModule``, naming both.
    """
    task_classes = getattr(datamodule, "task_classes", None)
    if task_classes is None:
        return _build_head(cfg.head, num_features, datamodule.num_classes), datamodule.num_classes
    if not issubclass(get_class(cfg.module._target_), MultiTaskModule):
        raise ValueError(
            f"data {cfg.data._target_} has tasks {list(task_classes)}, but module._target_="
            f"{cfg.module._target_} trains one: use strategy=multitask|multitask_pcgrad"
        )
    heads = {task: _build_head(cfg.head, num_features, n) for task, n in task_classes.items()}
    return heads, task_classes


def _build_head(head_cfg: DictConfig, num_features: int, num_classes: int) -> torch.nn.Module:
    """The head gets its sizes from the backbone and the data; an explicit mismatch is an error."""
    for key, actual in (("in_features", num_features), ("num_classes", num_classes)):
        given = head_cfg.get(key)
        if given is not None and given != actual:
            source = "the backbone's feature size" if key == "in_features" else "the data's class count"
            raise ValueError(f"head.{key}={given} does not match {source} ({actual}); remove the key")
    return build_head(head_cfg, num_features, num_classes)


def rebuild_module(
    config: dict, num_classes: int | dict[str, int], data_config: dict | None = None
) -> torch.nn.Module:
    """The module a run's resolved config describes, to load a trained checkpoint into.

    The checkpoint holds every weight, so the backbone is built with ``pretrained=false`` (nothing
    is downloaded or read), a backbone wrapping another (``backbone=from_checkpoint``) is built from
    its inner ``backbone`` node, and no source head is attached (it only comes with pretrained
    weights and is not part of the fine-tuned model). With an ``adapter`` (``strategy=lora|ia3``)
    the checkpoint holds only what trained, so the base is built from its pretrained weights and
    wrapped with the same adapter (see ``tl_lightning.adapters.peft``).

    Args:
        config: ``checkpoint["tl_lightning"]["config"]`` (plain data, interpolations resolved).
        num_classes: Number of target classes (``len(class_names)``), or task -> classes (multi-task).
        data_config: ``checkpoint["tl_lightning"]["data_config"]``: a text backbone recorded with
            ``pooling: auto`` is rebuilt with the pooling the run resolved and trained with, not the
            one ``auto`` would resolve to today.

    Raises:
        ValueError: If ``config`` lacks the ``backbone``, ``head`` or ``module`` node, naming it.
    """
    module = module_from_run_config(config, num_classes, data_config)  # as load_from_checkpoint builds
    _keep_changed_only(OmegaConf.create(config), module)
    return module


def _with_adapter(cfg: DictConfig, backbone: torch.nn.Module) -> torch.nn.Module:
    """``strategy=lora|ia3``: the backbone wrapped by the ``adapter`` node's PEFT factory (else as given).

    Raises:
        ValueError: If the backbone is not built from pretrained weights (``backbone.pretrained``):
            adapter checkpoints leave the base out and rebuild it from those weights.
    """
    node = OmegaConf.select(cfg, "adapter")
    if node is None:
        return backbone
    if OmegaConf.select(cfg, "backbone.pretrained") is not True:
        raise ValueError(
            f"strategy={OmegaConf.select(cfg, 'strategy_name')} adapts a pretrained base: it needs "
            f"backbone.pretrained=true (got {OmegaConf.select(cfg, 'backbone.pretrained')}); "
            "train a random network with strategy=scratch"
        )
    return instantiate(node, backbone=backbone)


def _keep_changed_only(cfg: DictConfig, module: torch.nn.Module) -> None:
    """With an ``adapter``, checkpoints hold what trains only (``adapters.peft.keep_changed_only``)."""
    if OmegaConf.select(cfg, "adapter") is not None:
        from tl_lightning.adapters.peft import keep_changed_only

        keep_changed_only(module)


def pretrained_backbone(config: dict) -> torch.nn.Module:
    """The backbone a run's resolved config describes, with the weights its fine-tune started from.

    Unlike :func:`rebuild_module`, the recorded node is built as it is (``pretrained=true`` reads the
    packaged weights, ``from_checkpoint`` its source checkpoint); the source head is dropped. Task
    arithmetic (``tl_lightning.adapters.merging``) takes its base weights from here.

    Raises:
        ValueError: If ``config`` lacks the ``backbone`` node.
    """
    cfg = OmegaConf.create(config)
    if not isinstance(cfg.get("backbone"), DictConfig):
        raise ValueError("the stored run config has no backbone node")
    backbone = instantiate(cfg.backbone)
    backbone.pop_source_head()
    return backbone


def rebuild_transform(config: dict, data_config: dict) -> Callable:
    """PIL image -> model input, as the run's data module prepared its evaluation images.

    Asks the class that ``config["data"]["_target_"]`` names (``eval_transform``), without building
    the data module: its data need not exist where the trained model is used.

    Raises:
        ValueError: If the stored ``data._target_`` has no ``eval_transform``, naming it.
    """
    data = config.get("data") or {}
    target = data.get("_target_")
    data_class = get_class(target) if target else None
    if not callable(getattr(data_class, "eval_transform", None)):
        raise ValueError(
            f"data._target_={target!r} in the stored config has no eval_transform(data_config, image_size); "
            "derive the data module from tl_lightning.data.ClassificationDataModule"
        )
    return data_class.eval_transform(data_config, data.get("image_size"))


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


def _check_resume(cfg: DictConfig, module: torch.nn.Module, callbacks: list[pl.Callback]) -> None:
    """Stop before training when ``cfg.ckpt_path`` is unreadable, from another model or another strategy,
    or needs a callback that laid out its optimizer groups and this run lacks."""
    checkpoint = load_checkpoint(cfg.ckpt_path)
    check_checkpoint_matches(checkpoint, module, cfg.ckpt_path)
    check_same_preprocessing(checkpoint, module, cfg.ckpt_path)
    check_same_strategy(checkpoint, cfg.strategy_name, cfg.allow_strategy_change, cfg.ckpt_path)
    if not cfg.allow_strategy_change:  # a permitted change of strategy drops its callbacks on purpose
        check_resume_callbacks(checkpoint, callbacks, cfg.ckpt_path)


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


def check_same_preprocessing(checkpoint: dict, module: torch.nn.Module, path: str) -> None:
    """Stop before training when the backbone would prepare inputs otherwise than the checkpoint's run did.

    The checkpoint records its backbone's resolved preprocessing (``data_config``: normalisation, input
    size; tokenizer, maximum length, pooling). A rebuild that resolves differently (``pooling: auto``
    following a sentence-transformers config that an older version ignored, say) would continue or
    test another function with the same weights. Checkpoints without the record are not checked.

    Raises:
        ValueError: Naming the checkpoint, each differing key with both values, and the override.
    """
    stored = (checkpoint.get(METADATA_KEY) or {}).get("data_config")
    backbone = getattr(module, "backbone", None)
    if not isinstance(stored, dict) or not hasattr(backbone, "data_config"):
        return
    current = plain_data_config(backbone.data_config.as_dict())
    differ = {k: (stored[k], current.get(k)) for k in stored if stored[k] != current.get(k)}
    if differ:
        keys = ", ".join(f"{k}: {was!r} in the checkpoint, {now!r} now" for k, (was, now) in differ.items())
        raise ValueError(
            f"ckpt_path={path!r} was trained with other preprocessing than this run's backbone gives "
            f"({keys}); set the backbone's keys to the checkpoint's (e.g. backbone.pooling=<as stored>)"
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


def _json_safe(value):
    """``value`` with every NaN or infinite float replaced by ``None`` (``metrics.json`` is strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(metrics: dict, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _best_score(checkpoint, final_val: dict[str, float], monitor: str) -> float | None:
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    return final_val.get(monitor)


class _ParameterCountLog(pl.Callback):
    """Log ``trainable parameters: N of M (P%)`` when training starts.

    At ``on_train_start``, after every callback's ``setup`` and ``on_fit_start`` froze (``Freeze``,
    ``GradualUnfreeze``) or re-applied a resumed stage, so the count is what the first step trains.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            counts = _parameter_counts(pl_module)
            log.info(
                "trainable parameters: %d of %d (%.3g%%)",
                counts["trainable"],
                counts["total"],
                100 * counts["trainable_fraction"],
            )


def _parameter_counts(module: torch.nn.Module) -> dict[str, int | float]:
    params = list(module.parameters())
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return {"trainable": trainable, "total": total, "trainable_fraction": round(trainable / max(total, 1), 6)}
