"""One run per output directory: a live holder stops the second run, a dead one's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tl_lightning.run.lock import LOCK_NAME, RunDirectoryLocked, RunLock
from tl_lightning.run.pipeline import train


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(directory: Path, pid: int, host: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}
    (directory / LOCK_NAME).write_text(json.dumps(holder))


def test_second_lock_on_a_directory_names_the_directory_and_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunDirectoryLocked, match=rf"run'.*in use.*pid {os.getpid()} on host"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [], "no private files left behind"


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    _write_lock(tmp_path / "run", _dead_pid(), host="some-other-node")
    with pytest.raises(RunDirectoryLocked, match="some-other-node"):
        RunLock(tmp_path / "run").acquire()


def test_run_takes_over_a_stale_lock_and_releases_it(make_cfg):
    cfg = make_cfg("backbone=small_cnn", "strategy=scratch")
    run_dir = Path(cfg.paths.output_dir)
    _write_lock(run_dir, _dead_pid())
    train(cfg)
    assert (run_dir / "metrics.json").is_file()
    assert not (run_dir / LOCK_NAME).exists()


def test_run_in_a_directory_held_by_a_live_process_stops_before_training(make_cfg):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg = make_cfg("backbone=small_cnn", "strategy=scratch")
        _write_lock(Path(cfg.paths.output_dir), holder.pid)
        with pytest.raises(RunDirectoryLocked, match=rf"in use by another run \(pid {holder.pid}"):
            train(cfg)
        assert sorted(p.name for p in Path(cfg.paths.output_dir).iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
