"""A kill at any instant of a checkpoint write leaves the last complete checkpoint loadable.

``python train.py`` runs are SIGKILLed while a checkpoint is being written (a partial file exists,
or ``last.ckpt`` just changed), with the run directory on another file system than ``TMPDIR``
(a tmpfs, when running as root) or on the same one; then resumed from ``last.ckpt``. Every
checkpoint left must load, nothing may be left in ``TMPDIR``, and the resumed run cleans up.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from tl_lightning.run.checkpointing import TMP_SUFFIX, AtomicCheckpointIO, load_checkpoint
from tl_lightning.run.lock import LOCK_NAME

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "backbone=efficientnet_lite0",  # ~70 MB checkpoints with optimizer state: writes take a while
    "strategy=full_finetune",
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "+trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "data.image_size=32",
    "data.batch_size=8",
]


def _start(run_dir: Path, tmpdir: Path, *overrides: str) -> subprocess.Popen:
    env = os.environ | {"TMPDIR": str(tmpdir)}
    cmd = [sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _kill_during_a_write(process: subprocess.Popen, checkpoints: Path, rng: random.Random) -> None:
    """Wait for a complete ``last.ckpt``, then SIGKILL at a random instant of the next write."""
    last = checkpoints / "last.ckpt"
    deadline = time.monotonic() + 120
    while _stamp(last) is None:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.005)
    first = _stamp(last)
    while not (list(checkpoints.glob(f".*{TMP_SUFFIX}")) or _stamp(last) != first):
        assert process.poll() is None, "the run ended before a second checkpoint write"
        assert time.monotonic() < deadline, "no second checkpoint write"
        time.sleep(0.001)
    time.sleep(rng.uniform(0.0, 0.01))
    process.send_signal(signal.SIGKILL)
    process.wait()


def _assert_checkpoints_load(checkpoints: Path) -> int:
    paths = sorted(checkpoints.glob("*.ckpt"))
    assert "last.ckpt" in [p.name for p in paths]
    for path in paths:
        assert "state_dict" in load_checkpoint(path), path  # raises, naming the file, if truncated
    return load_checkpoint(checkpoints / "last.ckpt")["epoch"]


def _orphans(tmpdir: Path) -> list[Path]:
    """Files over 1 MB in TMPDIR (other libraries may keep small caches there)."""
    return sorted(p for p in tmpdir.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000)


@pytest.fixture(params=["tmpfs", "same_fs"])
def run_root(request, tmp_path):
    """Where the run directory lives: a tmpfs (another file system than TMPDIR) or tmp_path."""
    if request.param == "same_fs":
        yield tmp_path / "runs"
        return
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the run directory needs root; the same_fs variant still runs")
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768m", "tmpfs", str(mount)]).returncode:
        pytest.skip("running as root without permission to mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_kill_during_checkpoint_writes_keeps_last_complete_checkpoint(run_root, tmp_path):
    rng = random.Random(int(os.environ.get("KILL_SEED", time.time_ns() % 10_000)))
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    run_dir = run_root / "run"
    checkpoints = run_dir / "checkpoints"

    _kill_during_a_write(_start(run_dir, tmpdir), checkpoints, rng)
    epoch = _assert_checkpoints_load(checkpoints)
    assert _orphans(tmpdir) == [], "checkpoint-sized orphans in TMPDIR"

    resumed = _start(run_dir, tmpdir, f"ckpt_path={checkpoints / 'last.ckpt'}")
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read().decode()[-3000:]
    assert _assert_checkpoints_load(checkpoints) == 3 > epoch
    assert list(checkpoints.glob(f".*{TMP_SUFFIX}")) == [], "partial files of the killed run are removed"
    assert not (run_dir / LOCK_NAME).exists()
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 4
    assert _orphans(tmpdir) == []


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (needs root): a file system that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("running as root without permission to mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


class _FillDisk(pl.Callback):
    """At the start of epoch 1, write zeros next to the checkpoints until the file system is full."""

    def __init__(self, filler: Path) -> None:
        self.filler = filler

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 1:
            return
        with open(self.filler, "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError as error:
                assert error.errno == errno.ENOSPC


def test_a_full_disk_names_itself_and_keeps_the_previous_checkpoint(small_fs):
    """A checkpoint write on a full file system: ENOSPC naming the file system and the checkpoint,
    saying the previous one is kept; it is, unchanged and loadable, and no partial file is left."""
    checkpoints = small_fs / "checkpoints"
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            _FillDisk(small_fs / "filler"),
            ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False),
        ],
        default_root_dir=small_fs,
    )
    with pytest.raises(OSError) as raised:
        trainer.fit(BoringModel())
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert f"no space left on the file system mounted at {small_fs}" in message, message
    assert f"while writing checkpoint {checkpoints / 'last.ckpt'}" in message, message
    assert "previous checkpoint last.ckpt there is kept" in message, message
    assert "enforce fail" not in message
    (small_fs / "filler").unlink()
    assert load_checkpoint(checkpoints / "last.ckpt")["epoch"] == 0
    assert list(checkpoints.glob(f".*{TMP_SUFFIX}")) == []
