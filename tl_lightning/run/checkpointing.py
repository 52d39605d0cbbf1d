"""Checkpoints that survive a kill at any instant and describe the run that wrote them.

* ``AtomicCheckpointIO`` writes every checkpoint to a temporary file *next to* its destination,
  fsyncs it and renames it over the destination, so the previous checkpoint stays intact until the
  new one is complete, whatever file system the run directory is on (Lightning's own save goes
  through a temporary file in ``TMPDIR`` and copies it over the destination).
* ``AsyncAtomicCheckpointIO`` (what ``train`` uses) does the same writes in a background thread, in
  the order they were asked for, removals included, while training goes on.
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
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from typing_extensions import override

from tl_lightning.modules.rebuild import (  # noqa: F401 (re-exported: run/ reads checkpoints through here)
    METADATA_KEY,
    MOVED_PATHS,
    moved_path,
    upgrade_metadata,
    upgrade_targets,
)
from tl_lightning.modules.sharding import readable_checkpoint

TMP_SUFFIX = ".tmp-partial"


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


class AsyncAtomicCheckpointIO(AsyncCheckpointIO):
    """:class:`AtomicCheckpointIO`'s writes in one background thread, so training does not wait for them.

    Lightning's ``AsyncCheckpointIO`` copies the checkpoint's tensors on the calling thread (a snapshot
    the next optimizer step cannot change) and hands the write to a single worker thread. Here removals
    (``ModelCheckpoint`` deleting the previous best after saving the new one) go through that thread too,
    so they happen after every write asked for before them, and a load first waits for pending writes.
    Each write is still atomic (temporary file next to the destination, fsync, rename): a kill at any
    instant leaves the previous complete checkpoint. Every write has finished when ``fit`` ends
    (Lightning calls :meth:`teardown`); a failed write (a full disk) raises at the next save, load or
    removal, or at the end of ``fit``, with :class:`AtomicCheckpointIO`'s message; after it, nothing
    more is written or removed (the previous best is kept). The snapshot keeps every state dict's
    ``_metadata``. Pair it with :class:`WaitForCheckpointWrites` so ``ModelCheckpoint`` sees pending
    files when it picks a name.

    Example::

        trainer = pl.Trainer(plugins=[AsyncAtomicCheckpointIO()], callbacks=[WaitForCheckpointWrites()])
    """

    def __init__(self) -> None:
        super().__init__(AtomicCheckpointIO())
        self._pending: list[str] = []  # destinations of the queued writes, in order

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self._ensure_setup()
        self._raise_failure()
        snapshot = _snapshot(checkpoint)  # on the calling thread: the next step cannot change it
        self._pending.append(str(path))
        self._executor.submit(self._write, snapshot, path, storage_options)

    def _write(self, checkpoint: dict[str, Any], path, storage_options: Any | None) -> None:
        try:
            if self._error is None:  # after a failed write, nothing more is written or removed
                self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options)
        except BaseException as error:
            self._error = error
        finally:
            self._pending.remove(str(path))

    @property
    def pending(self) -> tuple[str, ...]:
        """Destinations of the writes queued or running (their files may not be on disk yet)."""
        return tuple(self._pending)

    @override
    def remove_checkpoint(self, path) -> None:
        self._ensure_setup()
        self._executor.submit(self._remove, path)
        self._raise_failure()

    def _remove(self, path) -> None:
        if self._error is not None:  # the write that replaces ``path`` failed: keep the previous file
            return
        try:
            self.checkpoint_io.remove_checkpoint(path)
        except BaseException as error:
            self._error = error

    @override
    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def wait(self) -> None:
        """Block until every write and removal asked for so far is done.

        Raises:
            OSError: What a failed write raised (e.g. a full disk), naming the checkpoint.
        """
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error


def _snapshot(value: Any) -> Any:
    """A copy of ``value``'s tensors (detached clones) in the same containers; a state dict keeps its
    ``_metadata`` (module versions, which ``load_state_dict`` passes to modules that upgrade old layouts)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        copy = type(value)((key, _snapshot(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            copy._metadata = value._metadata
        return copy
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_snapshot(item) for item in value)
    return value


class WaitForCheckpointWrites(pl.Callback):
    """Let :class:`AsyncAtomicCheckpointIO`'s pending writes land before ``ModelCheckpoint`` picks a name.

    ``ModelCheckpoint`` picks a free name (``name``, ``name-v1``, ...) by looking at the disk, where a
    queued write is not yet; a second save of the same name would overwrite the first instead of
    being versioned. Lightning runs checkpoint callbacks after every other callback, so this one's
    hooks come first: it waits (only when a write is still pending) at the end of validation and of
    the training epoch, and after a training batch when a checkpoint callback saves every
    ``n`` training steps. A write still overlaps the training up to the next save point.

    Example::

        trainer = pl.Trainer(plugins=[AsyncAtomicCheckpointIO()], callbacks=[WaitForCheckpointWrites()])
    """

    @staticmethod
    def _wait(trainer: pl.Trainer) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AsyncAtomicCheckpointIO) and io.pending:
            io.wait()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if any(getattr(c, "_every_n_train_steps", 0) for c in trainer.checkpoint_callbacks):
            self._wait(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wait(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wait(trainer)


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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.

    The run metadata of a checkpoint written by 0.1.0 is upgraded (:func:`upgrade_metadata`).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is truncated, corrupt, or holds more than plain tensors and data.
    """
    path = readable_checkpoint(path)  # a trainer=fsdp|fsdp_cpu checkpoint directory: consolidated once
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
