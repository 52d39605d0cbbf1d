"""A kill at any instant of a checkpoint write leaves the last complete checkpoint loadable.

``python train.py`` runs are SIGKILLed while a checkpoint is being written (a partial file exists,
or ``last.ckpt`` just changed), with the run directory on another file system than ``TMPDIR``
(a tmpfs, when running as root) or on the same one; then resumed from ``last.ckpt``. Every
checkpoint left must load, nothing may be left in ``TMPDIR``, and the resumed run cleans up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tl_lightning.run.checkpointing import TMP_SUFFIX, load_checkpoint
from tl_lightning.run.lock import LOCK_NAME

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "backbone=efficientnet_lite0",  # ~70 MB checkpoints with optimizer state: writes take a while
    "strategy=full_finetune",
    "trainer.max_epochs=4",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
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
