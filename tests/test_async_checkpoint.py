"""AsyncAtomicCheckpointIO: writes leave the training thread, stay atomic and in order, removals included."""

from __future__ import annotations

import errno

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from tl_lightning.run.checkpointing import TMP_SUFFIX, AsyncAtomicCheckpointIO


class _HeavyImproving(BoringModel):
    """One tiny step per epoch, a 48 MiB buffer in every checkpoint (its write and fsync outlast an
    epoch), and a monitored metric that improves every epoch, so each epoch saves a new best file and
    removes the previous one."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ballast", torch.zeros(12 * 2**20))

    def on_train_epoch_end(self) -> None:
        self.log("score", float(self.current_epoch))


def _fit(io, checkpoints, epochs: int = 6) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        callbacks=[
            ModelCheckpoint(dirpath=checkpoints, filename="best-{epoch}", monitor="score", mode="max")
        ],
    )
    trainer.fit(_HeavyImproving())
    return trainer


def test_removals_wait_for_the_writes_before_them(tmp_path):
    """Every epoch writes a new best and removes the previous one: exactly the last best remains, complete.
    (Lightning's own AsyncCheckpointIO removes at once, ahead of pending writes: the same run left stale
    bests behind when tried.)"""
    checkpoints = tmp_path / "checkpoints"
    trainer = _fit(AsyncAtomicCheckpointIO(), checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch=5.ckpt"]
    assert trainer.checkpoint_callback.best_model_path == str(checkpoints / "best-epoch=5.ckpt")
    assert torch.load(checkpoints / "best-epoch=5.ckpt", weights_only=True)["epoch"] == 5


def test_a_checkpoint_holds_the_weights_of_when_it_was_asked_for(tmp_path):
    """The write runs later, but what it writes is the snapshot taken at the call; a load waits for it."""
    io = AsyncAtomicCheckpointIO()
    weights = torch.arange(4.0)
    io.save_checkpoint({"state_dict": {"w": weights}}, tmp_path / "a.ckpt")
    weights.add_(100)  # the next optimizer step, in place
    assert torch.equal(io.load_checkpoint(tmp_path / "a.ckpt")["state_dict"]["w"], torch.arange(4.0))
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.wait()
    assert not (tmp_path / "a.ckpt").exists() and not list(tmp_path.glob(f".*{TMP_SUFFIX}"))
    io.teardown()


def test_a_failed_write_stops_fit_with_its_error(tmp_path):
    """A write that fails in the background (here: the checkpoint directory's place is a file) raises
    out of ``fit`` at the latest when it ends, and leaves no partial file."""
    blocker = tmp_path / "checkpoints"
    blocker.write_text("not a directory")
    with pytest.raises(OSError) as raised:
        _fit(AsyncAtomicCheckpointIO(), blocker, epochs=2)
    assert raised.value.errno in (errno.ENOTDIR, errno.EEXIST)
    assert blocker.read_text() == "not a directory"
    assert not list(tmp_path.glob(f".*{TMP_SUFFIX}"))
