"""Checkpoints that survive a kill at any instant and describe the run that wrote them.

* ``AtomicCheckpointIO`` writes every checkpoint to a temporary file *next to* its destination,
  fsyncs it and renames it over the destination, so the previous checkpoint stays intact until the
  new one is complete, whatever file system the run directory is on (Lightning's own save goes
  through a temporary file in ``TMPDIR`` and copies it over the destination).
* ``RunMetadata`` stores ``checkpoint["tl_lightning"]``: the resolved config, the strategy, the class
  names and the backbone's preprocessing, as plain data (loadable with ``weights_only=True``), so
  ``predict.py``/``export.py`` can rebuild the model and a resume can check it runs the same recipe.
* ``load_checkpoint`` reads a checkpoint with ``weights_only=True`` and names the file when it is
  truncated or not a checkpoint at all; a checkpoint written before the package was regrouped into
  rooms (0.1.0) has the ``_target_`` paths of its stored config upgraded (``MOVED_PATHS``).
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from typing_extensions import override

METADATA_KEY = "tl_lightning"
TMP_SUFFIX = ".tmp-partial"

# Import paths of 0.1.0, before the package was regrouped into rooms -> where they live now. A
# checkpoint (or exported safetensors file) written by 0.1.0 names the old paths in its stored
# config; ``upgrade_targets`` rewrites them, and ``check_config`` names the new path when a user's
# own config still uses an old one.
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<dir>/.<name>.<pid>.tmp-partial``, fsync, then ``os.replace`` onto the destination.

    A kill or a full disk mid-write leaves the destination as it was (the previous complete
    checkpoint, or nothing) and at worst a partial file in the same directory, which
    ``remove_partial_checkpoints`` deletes at the start of the next run. A full disk (or quota)
    raises an ``OSError`` (``ENOSPC``/``EDQUOT``) naming the file system and the checkpoint and
    saying that the previous checkpoint is kept, instead of torch's ``unexpected pos`` error.

    Example::

        trainer = pl.Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}"
            )
        destination = Path(path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, destination)
        except BaseException as error:
            written = partial.stat().st_size if partial.exists() else 0
            partial.unlink(missing_ok=True)
            full = _out_of_space(error)
            if full is None:
                raise
            raise OSError(full.errno, _out_of_space_message(full.errno, destination, written)) from error
        _fsync_directory(destination.parent)


def _out_of_space(error: BaseException) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT`` error behind ``error`` (torch's writer replaces it with a RuntimeError)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def _out_of_space_message(code: int, destination: Path, written: int) -> str:
    mount = destination.parent.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    problem = "no space left" if code == errno.ENOSPC else "disk quota exceeded"
    kept = (
        f"the previous checkpoint {destination.name} there is kept, unchanged"
        if destination.exists()
        else f"no file was written at {destination.name}"
    )
    return (
        f"{problem} on the file system mounted at {mount} while writing checkpoint {destination} "
        f"(stopped after {written:,} bytes of it); {kept}. Free space there (or write the run to "
        "another disk, paths.output_dir=...) and resume from the last checkpoint with ckpt_path=..."
    )


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_checkpoints(directory: str | Path) -> list[Path]:
    """Delete the partial files a killed ``AtomicCheckpointIO`` write left in ``directory``.

    Only call this while holding the run directory's lock: another live run's partial file would
    otherwise be deleted under it.

    Returns:
        The deleted paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    partials = sorted(directory.glob(f".*{TMP_SUFFIX}"))
    for path in partials:
        path.unlink(missing_ok=True)
    return partials


class RunMetadata(pl.Callback):
    """Write ``metadata`` (plain data) into every checkpoint under ``checkpoint["tl_lightning"]``.

    Args:
        metadata: A mapping of plain Python values (dicts, lists, str, numbers, bool, None).

    Example::

        trainer = pl.Trainer(callbacks=[RunMetadata({"strategy": "linear_probe", "class_names": ["a", "b"]})])
    """

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[METADATA_KEY] = self.metadata


def run_metadata(config: dict, strategy: str, class_names: list[str], data_config: dict) -> dict[str, Any]:
    """The ``checkpoint["tl_lightning"]`` layout (the contract ``predict.py`` and ``export.py`` read).

    Args:
        config: The resolved run config (``OmegaConf.to_container(cfg, resolve=True)``).
        strategy: ``cfg.strategy_name``.
        class_names: Target class names, index order.
        data_config: The backbone's preprocessing as a plain dict (tuples become lists).
    """
    return {
        "config": config,
        "strategy": strategy,
        "class_names": [str(c) for c in class_names],
        "data_config": plain_data_config(data_config),
    }


def plain_data_config(data_config: dict) -> dict:
    """A backbone's preprocessing (``data_config.as_dict()``) as a checkpoint stores it: tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.

    The run metadata of a checkpoint written by 0.1.0 is upgraded (:func:`upgrade_metadata`).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is truncated, corrupt, or holds more than plain tensors and data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain data; refusing to "
            f"load it (weights_only=True): {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); use an earlier checkpoint"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a Lightning checkpoint (a {type(checkpoint).__name__})"
        )
    if METADATA_KEY in checkpoint:
        checkpoint[METADATA_KEY] = upgrade_metadata(checkpoint[METADATA_KEY])
    return checkpoint
