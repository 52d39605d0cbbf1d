"""Hydra callbacks of ``train.py`` (``conf/hydra/default.yaml``): checks before Hydra touches the disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class WritableOutputDir(Callback):
    """Stop with a one-line message when the run (or sweep) directory cannot be written.

    Hydra creates the directory before the job starts, so without this check a read-only file
    system ends in a traceback from ``pathlib``. The message is the last line of the output.

    Raises:
        SystemExit: Naming the directory and the key that sets it.

    Example (``conf/hydra/default.yaml``)::

        callbacks:
          writable_output_dir:
            _target_: tl_lightning.run.hydra_callbacks.WritableOutputDir
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


def _check_writable(directory: str, key: str) -> None:
    """The directory, or its nearest existing ancestor (where it will be created), must be writable."""
    existing = Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):  # False on a read-only file system, even for root
        raise SystemExit(
            f"error: the output directory {directory!r} cannot be created or written: {str(existing)!r} is "
            f"read-only (read-only file system or no write permission); set {key}=<a writable directory>"
        )
