"""One run per output directory: a live holder stops the second run, a dead one's lock is taken over."""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tl_lightning.run.lock import LOCK_NAME, RunDirectoryLocked, RunLock
from tl_lightning.run.pipeline import train


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(directory: Path, pid: int, host: str | None = None, **extra: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "earlier", **extra}
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


RACERS, ROUNDS = 8, 20


def _race(directories: list[Path], barrier, results, index: int) -> None:
    """One racer: in every round, try to take the stale lock as the others do, report whether it got it."""
    for number, directory in enumerate(directories):
        lock = RunLock(directory)
        barrier.wait(timeout=60)  # all racers start together
        try:
            lock.acquire()
            outcome = "held"
        except RunDirectoryLocked:
            outcome = "refused"
        except Exception as error:  # reported, so the test fails naming it
            outcome = repr(error)
        barrier.wait(timeout=60)  # every racer has tried; the winners still hold the lock
        results.put((number, index, outcome))
        lock.release()


def test_racing_runs_take_over_a_stale_lock_one_at_a_time(tmp_path):
    """8 processes released together on a stale lock, 20 times: each time exactly one holds it.

    The stale holder's record is padded to 4 MB, so reading it takes a while: that is the window in
    which a run that judged the lock stale deleted the lock another run had just created (both ran on).
    """
    directories = [tmp_path / f"round{number}" for number in range(ROUNDS)]
    dead = _dead_pid()
    for directory in directories:
        _write_lock(directory, dead, note=" " * 4_000_000)
    context = multiprocessing.get_context("fork")  # the racers need nothing but run/lock.py: no re-import
    barrier, results = context.Barrier(RACERS), context.Queue()
    racers = [
        context.Process(target=_race, args=(directories, barrier, results, index)) for index in range(RACERS)
    ]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=120) for _ in range(RACERS * ROUNDS)]
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    unexpected = {outcome for _, _, outcome in outcomes} - {"held", "refused"}
    assert not unexpected, unexpected
    holders = {
        number: sorted(i for n, i, outcome in outcomes if n == number and outcome == "held")
        for number in range(ROUNDS)
    }
    wrong = {number: held for number, held in holders.items() if len(held) != 1}
    assert not wrong, f"rounds whose stale lock was held by other than exactly one racer: {wrong}"
    assert all(sorted(p.name for p in directory.iterdir()) == [] for directory in directories)


def test_lock_file_naming_no_holder_is_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_bytes(b"\xff\xfe not a holder")
    with RunLock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_live_lock_of_another_user_is_named_not_called_unwritable():
    """A user who may not write another user's lock file still reads who holds the directory."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as a second user")
    other_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*other_user, sys.executable, "-c", "import tl_lightning.run.lock"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("the second user cannot run this interpreter or read this checkout (a private directory)")
    shared = Path(tempfile.mkdtemp(prefix="tl-lock-"))  # not under tmp_path: that is private to root
    try:
        shared.chmod(0o777)
        held = RunLock(shared / "run").acquire()
        (shared / "run").chmod(0o777)
        assert (shared / "run" / LOCK_NAME).stat().st_mode & 0o777 == 0o644  # root's, not writable by others
        code = f"from tl_lightning.run.lock import RunLock; RunLock({str(shared / 'run')!r}).acquire()"
        result = subprocess.run([*other_user, sys.executable, "-c", code], capture_output=True, text=True)
        assert "RunDirectoryLocked" in result.stderr and f"pid {os.getpid()}" in result.stderr, result.stderr
        held.release()
    finally:
        shutil.rmtree(shared)
