"""Hydra glue of ``train.py``: checks before Hydra touches the disk; no empty directory after a failure."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


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


def remove_unused_run_dir(output_dir: str | os.PathLike, job_name: str) -> bool:
    """Delete a failed run's directory if it holds nothing but what Hydra wrote into it.

    Hydra creates the run directory, its ``.hydra/`` (the composed config) and ``<job_name>.log``
    before the job starts, so a run stopped by a config check would otherwise leave an empty
    timestamped directory behind. ``train.py`` calls this only when the config check failed and the
    directory is the timestamped one Hydra made for this run (no ``hydra.run.dir`` override), never for
    a run that started training. A directory holding anything else (a checkpoint, ``metrics.json``,
    logger output, another run's lock) is left as it is, and the current working directory is never
    removed.

    Args:
        output_dir: The run directory (``hydra.runtime.output_dir``).
        job_name: ``hydra.job.name``; the log file Hydra writes is ``<job_name>.log``.

    Returns:
        Whether the directory was removed.

    Example::

        try:
            return train(cfg)
        except Exception:
            remove_unused_run_dir(HydraConfig.get().runtime.output_dir, HydraConfig.get().job.name)
            raise
    """
    directory = Path(output_dir).absolute()
    hydra_own = {".hydra", f"{job_name}.log"}
    if not directory.is_dir() or Path.cwd().absolute().is_relative_to(directory):
        return False
    if not {entry.name for entry in directory.iterdir()} <= hydra_own:
        return False
    shutil.rmtree(directory / ".hydra", ignore_errors=True)
    (directory / f"{job_name}.log").unlink(missing_ok=True)
    try:
        directory.rmdir()  # fails if anything appeared meanwhile: then it stays
    except OSError:
        return False
    log.info("removed %s: the run failed before writing anything into it", directory)
    return True
