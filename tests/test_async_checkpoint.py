"""AsyncAtomicCheckpointIO: writes leave the training thread, stay atomic and in order, removals included."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from tl_lightning.run.checkpointing import TMP_SUFFIX, AsyncAtomicCheckpointIO, WaitForCheckpointWrites
from tl_lightning.run.pipeline import train


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


class _Improving(BoringModel):
    """A tiny model whose monitored metric improves at every validation (a new best each time)."""

    def __init__(self) -> None:
        super().__init__()
        self.validations = 0

    def on_validation_epoch_start(self) -> None:
        self.validations += 1

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.validations))


def _fit_light(io, checkpoints, callbacks=(), **trainer_args) -> ModelCheckpoint:
    best = ModelCheckpoint(
        dirpath=checkpoints,
        filename="epoch{epoch:02d}",
        auto_insert_metric_name=False,
        monitor="score",
        mode="max",
        **trainer_args.pop("top", {}),
    )
    trainer = pl.Trainer(
        limit_train_batches=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        callbacks=[best, *callbacks],
        **trainer_args,
    )
    trainer.fit(_Improving())
    return best


def test_a_failed_write_keeps_the_previous_best(tmp_path, monkeypatch):
    """The disk fills up from the second write on: the failed save of the new best must not be followed
    by the removal of the previous best (queued behind it), so epoch 0's file stays and fit raises."""
    real_save, calls = torch.save, []

    def save_until_full(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(OSError) as raised:
        _fit_light(AsyncAtomicCheckpointIO(), tmp_path, max_epochs=3)
    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch00.ckpt"]


def test_a_second_save_of_one_name_waits_and_is_versioned(tmp_path, monkeypatch):
    """Two validations in one epoch save ``epoch00`` twice; the first write is slow (still pending when
    the second name is picked). With ``WaitForCheckpointWrites`` the second becomes ``epoch00-v1``, as
    with synchronous writes, instead of overwriting the first."""
    real_save = torch.save

    def slow_save(*args, **kwargs):
        time.sleep(0.5)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    best = _fit_light(
        AsyncAtomicCheckpointIO(),
        tmp_path,
        [WaitForCheckpointWrites()],
        max_epochs=1,
        val_check_interval=0.5,
        top={"save_top_k": -1},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch00-v1.ckpt", "epoch00.ckpt"]
    assert sorted(float(v) for v in best.best_k_models.values()) == [1.0, 2.0]


def test_the_snapshot_keeps_state_dict_metadata(tmp_path):
    """``state_dict()._metadata`` (module versions, read by ``load_state_dict``) is written, as the
    synchronous writer writes it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    io = AsyncAtomicCheckpointIO()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [{"state": {}}]}
    io.save_checkpoint(checkpoint, tmp_path / "m.ckpt")
    io.wait()
    io.teardown()
    written = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    assert written._metadata == model.state_dict()._metadata


def test_a_consolidated_sharded_checkpoint_is_written_before_it_is_renamed(make_cfg):
    """``trainer=fsdp_cpu`` with ``save_distributed_checkpoint=false`` hands one consolidated file to the
    background writer; the rename of its partial file waits for the write (before, it ran first and the
    save stopped on ``FileNotFoundError``)."""
    cfg = make_cfg(
        "backbone=small_cnn",
        "strategy=linear_probe",
        "trainer=fsdp_cpu",
        "trainer.devices=1",
        "+trainer.strategy.save_distributed_checkpoint=false",
        "trainer.max_epochs=1",
        "allow_short_schedule=true",
    )
    environment = dict(os.environ)
    try:
        train(cfg)
    finally:
        # one in-process rank: its process group (and the TCP store listening on MASTER_PORT) and the
        # variables Lightning set would otherwise make every later DDP test fail with EADDRINUSE
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch00.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0
